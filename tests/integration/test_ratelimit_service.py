"""The RateLimitService against a real Redis: tiers, tenants, all-or-nothing windows."""

from __future__ import annotations

import uuid

import grpc
import grpc.aio
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.core.server import serving
from services.usage.service import UsageService, UsageSettings

OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
BIG, SCARCE = f"big-{uuid.uuid4().hex[:6]}", f"scarce-{uuid.uuid4().hex[:6]}"  # fresh windows


def _request(**entries: str) -> rls_pb2.RateLimitRequest:
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()
        ]
    )
    return rls_pb2.RateLimitRequest(domain="tokenmesh", descriptors=[descriptor])


@pytest.fixture
async def limiter(redis_url):
    settings = UsageSettings(
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        default_rpm=5,
        tier_rpm=("premium=3",),
        tenant_rpm=4,
        tenant_overrides=(f"{BIG}=6",),
        model_rpm=(f"{SCARCE}=2",),
        usage_stream=f"s:{uuid.uuid4().hex}",
    )
    async with serving(UsageService(settings), settings) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield rls_pb2_grpc.RateLimitServiceStub(channel)


async def test_tier_defaults_apply_to_keys_without_a_limit(limiter):
    key = f"key_{uuid.uuid4().hex[:8]}"
    codes = [
        (await limiter.ShouldRateLimit(_request(key_id=key, tier="premium"))).overall_code
        for _ in range(4)
    ]
    assert codes == [OK, OK, OK, OVER]


async def test_a_tenant_limit_spans_its_keys_and_rejections_count_nowhere(limiter):
    tenant = f"t{uuid.uuid4().hex[:6]}"
    keys = [f"key_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    codes = [
        (await limiter.ShouldRateLimit(_request(key_id=keys[i % 2], tenant=tenant))).overall_code
        for i in range(5)
    ]
    assert codes == [OK, OK, OK, OK, OVER]  # tenant limit 4 across both keys
    reply = await limiter.ShouldRateLimit(_request(key_id=keys[0], tenant=f"{tenant}-other"))
    assert reply.overall_code == OK
    key_status = reply.statuses[0]
    assert key_status.limit_remaining == 5 - 3  # the rejected request did not count for the key


async def test_tenant_overrides_and_model_limits(limiter):
    tenant = f"other-{uuid.uuid4().hex[:4]}"
    key = lambda: f"key_{uuid.uuid4().hex[:8]}"  # noqa: E731 - a fresh key per request
    codes = [
        (await limiter.ShouldRateLimit(_request(key_id=key(), tenant=tenant))).overall_code
        for _ in range(5)
    ]
    assert codes == [OK] * 4 + [OVER]  # no override: the tenant default of 4
    big = [
        (await limiter.ShouldRateLimit(_request(key_id=key(), tenant=BIG))).overall_code
        for _ in range(7)
    ]
    assert big == [OK] * 6 + [OVER]
    scarce = [await limiter.ShouldRateLimit(_request(key_id=key(), model=SCARCE)) for _ in range(3)]
    assert [r.overall_code for r in scarce] == [OK, OK, OVER]
    assert scarce[2].statuses[1].current_limit.name == "model_requests_per_minute"
    assert f"model {SCARCE}".encode() in scarce[2].raw_body
