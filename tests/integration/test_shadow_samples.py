"""Samples and shadow traffic on a real worker (mTLS, real Redis): a tenant's sampled
request is sampled once, under its tenant; its shadow copy, metered to the shadow
account, is never sampled (its sample landed in one stream shared by every tenant)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import model_routing
from services.core import contract
from services.core.redis_service import text
from services.inference import shadow
from services.inference.pipeline import content, samples
from services.inference.service import InferenceService
from services.router.policies import PolicyCatalog, SampleSettings
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import policy_pb2

MODEL = "deterministic-test"


@pytest.fixture
async def worker(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[InferenceService, Any]]:
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (service, ch):
        yield service, rpc.InferenceServiceStub(ch)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def _generate(stub: Any, request_id: str, metadata: dict[str, str]) -> str:
    """Sends one Generate over the aio stub; returns the version that served it."""
    request = pb.GenerateRequest(
        model=MODEL,
        request_id=request_id,
        prompt="call +1 415 555 2671 now",
        max_output_tokens=4,
        sampling=resources.SamplingParams(temperature=0, seed=1),
    )
    version = ""
    async for message in stub.Generate(request, metadata=tuple(metadata.items())):
        if message.HasField("model"):
            version = message.model.version
    return str(version)


async def _usage_events(client: aioredis.Redis, stream: str, request_id: str) -> int:
    entries: Any = await client.xrange(stream)
    return sum(1 for _, fields in entries if text(fields[b"request_id"]) == request_id)


async def _samples_of(client: aioredis.Redis, request_id: str) -> dict[str, list[str]]:
    """Returns every samples stream holding a sample of `request_id`: its versions."""
    found: dict[str, list[str]] = {}
    async for key in client.scan_iter(match=f"{samples.STREAM_PREFIX}*", count=1000):
        entries: Any = await client.xrange(key)
        for _, fields in entries:
            sample = policy_pb2.Sample.FromString(fields[b"sample"])
            if sample.request_id == request_id:
                found.setdefault(text(key), []).append(sample.model.version)
    return found


async def test_a_shadow_copy_is_never_sampled_and_its_live_request_once_under_its_tenant(
    worker: tuple[InferenceService, Any], client: aioredis.Redis
) -> None:
    service, stub = worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    catalog = PolicyCatalog(client)
    await catalog.set_samples(SampleSettings(tenant, 1.0, "admin-key", time.time(), "ticket 1"))
    await service.policies.refresh()
    # What the edge sends: the live request to version 1, marked as shadowed, and
    # Envoy's copy of it to version 2, with the caller's identity and request ids.
    request_id = uuid.uuid4().hex
    live = {
        contract.TENANT_HEADER: tenant,
        contract.KEY_ID_HEADER: f"key-{tenant}",
        model_routing.ROUTE_MODEL_HEADER: MODEL,
        model_routing.ROUTE_VERSION_HEADER: "1",
        shadow.REQUEST_ID_HEADER: request_id,
        contract.SHADOWED_HEADER: "2",
    }
    copy = {**live, contract.SHADOW_HEADER: "2"}
    del copy[contract.SHADOWED_HEADER]
    assert await _generate(stub, request_id, copy) == "2"
    assert await _generate(stub, request_id, live) == "1"
    # Both usage events are out (a sample's write starts before its request's event),
    # and every sample write started has ended.
    stream = service.settings.usage_stream
    async with asyncio.timeout(10):
        while await _usage_events(client, stream, request_id) < 2 or content._SAMPLE_WRITES:
            await asyncio.sleep(0.02)
    assert await _samples_of(client, request_id) == {samples.stream_key(tenant): ["1"]}
    assert samples.stream_key(contract.SHADOW_TENANT) not in await _samples_of(client, request_id)
