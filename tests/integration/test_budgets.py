"""Token budgets against a real Redis: exact, never early, never over."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from services.core.errors import ResourceExhausted
from services.inference.budget import Limits, TokenBudgets


@pytest.fixture
async def budgets(redis_url):
    client = aioredis.from_url(redis_url)
    yield TokenBudgets(client)
    await client.aclose()


async def test_exactly_n_tokens_per_minute(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(tokens_per_minute=100)
    for i in range(4):
        await budgets.reserve(key, limits, f"r{i}", 25)  # 100 exactly: no early lock-out
    with pytest.raises(ResourceExhausted) as info:
        await budgets.reserve(key, limits, "r5", 1)
    assert info.value.reason == "TOKEN_BUDGET_EXCEEDED"
    assert 50 <= (info.value.retry_after_s or 0) <= 60
    await budgets.reconcile(key, "r0", 25, 5)  # r0 used only 5: 20 come back
    await budgets.reserve(key, limits, "r6", 20)
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "r7", 1)


async def test_monthly_quota_counts_actual_usage(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=30)
    await budgets.reserve(key, limits, "a", 30)
    await budgets.reconcile(key, "a", 30, 12)
    await budgets.reserve(key, limits, "b", 18)
    with pytest.raises(ResourceExhausted) as info:
        await budgets.reserve(key, limits, "c", 1)
    assert "monthly_tokens=30" in info.value.message


async def test_a_budget_at_80_percent_is_named_in_a_warning(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(tokens_per_minute=100, monthly_tokens=1000)
    assert await budgets.reserve(key, limits, "a", 50) == ""
    assert await budgets.reserve(key, limits, "b", 30) == "tokens_per_minute 80/100"
    assert await budgets.reserve(key, Limits(monthly_tokens=100), "c", 5) == "monthly_tokens 85/100"
