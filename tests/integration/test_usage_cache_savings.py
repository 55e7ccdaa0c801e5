"""Usage reports show what the response cache saved, per key (v1 GetUsage, additive fields)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.core.server import serving
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tests.integration.test_usage import _drain, _event, _headers, _meter, _publish
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as rpc


@pytest.fixture
async def stream_and_client(redis_url: str) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    client = aioredis.from_url(redis_url)
    yield f"usage-test:{uuid.uuid4().hex}", client
    await client.aclose()


def _served(request_id: str, key: str, tenant: str, completion: int, billed_completion: int):
    """A cache hit billed prompt_only (billed_completion 0) or full."""
    event = _event(request_id, key, tenant, 10, billed_completion)
    event.cached = True
    event.served_usage.CopyFrom(
        types_pb2.TokenUsage(
            prompt_tokens=10, completion_tokens=completion, total_tokens=10 + completion
        )
    )
    return event


async def test_cache_savings_are_summed_per_key_and_per_model(stream_and_client, redis_url):
    stream, client = stream_and_client
    run = uuid.uuid4().hex[:8]
    key, other, tenant = f"key_{run}", f"key_o{run}", f"t{run}"
    events = [
        _event(f"miss-{run}", key, tenant, 10, 8),
        _served(f"hit1-{run}", key, tenant, 8, 0),
        _served(f"hit2-{run}", key, tenant, 8, 8),  # billing full: nothing unbilled
        _event(f"plain-{run}", other, tenant, 10, 8),
    ]
    await _publish(client, stream, *events, events[1])  # a replay counts once
    meter = _meter(client, stream, "c1")
    await meter.ensure_group()
    await _drain(meter)
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=stream,
    )
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            stub = rpc.UsageServiceStub(channel)
            own = await stub.GetUsage(pb.GetUsageRequest(), metadata=_headers(key, tenant))
            assert own.requests == 3
            assert (own.cached_requests, own.cached_completion_tokens) == (2, 16)
            assert own.cache_unbilled_tokens == 8
            assert own.completion_tokens == 16  # billed: the miss and the full-billed hit
            [model] = own.by_model
            assert model.totals.cached_requests == 2
            assert model.totals.cached_completion_tokens == 16
            assert model.totals.cache_unbilled_tokens == 8
            theirs = await stub.GetUsage(pb.GetUsageRequest(), metadata=_headers(other, tenant))
            assert (theirs.requests, theirs.cached_requests) == (1, 0)
            assert theirs.cache_unbilled_tokens == 0
