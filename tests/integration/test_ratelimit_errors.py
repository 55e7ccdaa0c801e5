"""The rate limiter tells an unavailable store from a bug.

An unreachable store answers UNAVAILABLE (Envoy lets the request through
unless failure_mode_deny) and counts the fail-open; anything else is a bug:
counted, and the RPC fails with INTERNAL instead of posing as an outage.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import REGISTRY

from services.core.server import serving
from services.launcher.processes import reserve_port
from services.usage.service import UsageService, UsageSettings
from tests import mtls


def _request(key_id: str) -> rls_pb2.RateLimitRequest:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="key_id", value=key_id)
    return rls_pb2.RateLimitRequest(
        domain="tokenmesh", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
    )


def _fail_open() -> float:
    return REGISTRY.get_sample_value("tokenmesh_ratelimit_fail_open_total") or 0.0


def _fail_closed() -> float:
    return REGISTRY.get_sample_value("tokenmesh_ratelimit_fail_closed_total") or 0.0


def _errors() -> float:
    labels = {"stage": "decide"}
    return REGISTRY.get_sample_value("tokenmesh_ratelimit_errors_total", labels) or 0.0


@contextlib.asynccontextmanager
async def _limiter(
    redis_url: str, limits_url: str, failure_mode_deny: bool = False
) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    settings = UsageSettings(
        ratelimit_failure_mode_deny=failure_mode_deny,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        ratelimit_redis_url=limits_url,
        usage_stream=f"s:{uuid.uuid4().hex}",
    )
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            yield rls_pb2_grpc.RateLimitServiceStub(channel)


async def test_an_unreachable_store_is_unavailable_and_counted_as_fail_open(redis_url):
    fail_open, errors = _fail_open(), _errors()
    async with _limiter(redis_url, f"redis://127.0.0.1:{reserve_port()}/0") as limiter:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await limiter.ShouldRateLimit(_request(f"key_{uuid.uuid4().hex[:8]}"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _fail_open() == fail_open + 1 and _errors() == errors


async def test_under_failure_mode_deny_an_unreachable_store_counts_as_fail_closed(redis_url):
    # The edge refuses these requests (its failure_mode_deny reads the same setting):
    # counted as let through, they set off the fail-open alert for refusals.
    fail_open, fail_closed = _fail_open(), _fail_closed()
    unreachable = f"redis://127.0.0.1:{reserve_port()}/0"
    async with _limiter(redis_url, unreachable, failure_mode_deny=True) as limiter:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await limiter.ShouldRateLimit(_request(f"key_{uuid.uuid4().hex[:8]}"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (_fail_open(), _fail_closed()) == (fail_open, fail_closed + 1)


async def test_a_bug_is_internal_and_counted_not_reported_as_an_outage(redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    # The script meets a window of the wrong type: Redis is fine, our data is not.
    await client.set(f"tm:ratelimit:rpm:{key}", "not a sorted set", ex=60)
    fail_open, errors = _fail_open(), _errors()
    try:
        async with _limiter(redis_url, redis_url) as limiter:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await limiter.ShouldRateLimit(_request(key))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "WRONGTYPE" not in (info.value.details() or "")  # nothing internal leaks
            # Other keys are unaffected.
            ok = await limiter.ShouldRateLimit(_request(f"key_{uuid.uuid4().hex[:8]}"))
            assert ok.overall_code == rls_pb2.RateLimitResponse.OK
    finally:
        await client.delete(f"tm:ratelimit:rpm:{key}")
        await client.aclose()
    assert _errors() == errors + 1 and _fail_open() == fail_open
