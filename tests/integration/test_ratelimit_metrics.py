"""Refusals are counted per limit (tokenmesh_ratelimit_over_limit_total{limit})."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from tests.integration.test_ratelimit_service import OK, OVER, _request, limiter  # noqa: F401


def _over(limit: str) -> float:
    return REGISTRY.get_sample_value("tokenmesh_ratelimit_over_limit_total", {"limit": limit}) or 0


async def test_each_refusal_counts_under_the_limit_that_refused_it(limiter):  # noqa: F811
    tenant = f"t{uuid.uuid4().hex[:6]}"
    keys = [f"key_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    before = _over("tenant_requests_per_minute"), _over("requests_per_minute")
    codes = [
        (await limiter.ShouldRateLimit(_request(key_id=keys[i % 2], tenant=tenant))).overall_code
        for i in range(6)
    ]
    assert codes == [OK, OK, OK, OK, OVER, OVER]  # the tenant's limit is 4
    assert _over("tenant_requests_per_minute") == before[0] + 2
    assert _over("requests_per_minute") == before[1]
