"""A spent monthly token budget is OpenAI's `insufficient_quota`, a rate refusal its
`rate_limit_exceeded`: clients (LangChain, LiteLLM, user code) tell "stop" from "wait"
by the code. Both were our own (`token_budget_exceeded`, `rate_limited`)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis.asyncio as aioredis

from services.core.errors import ResourceExhausted
from services.inference.budget import Limits, TokenBudgets
from services.inference.openai import errors
from services.usage.ratelimit import Limit, WindowStatus


@pytest.fixture
async def budgets(redis_url):
    client = aioredis.from_url(redis_url)
    yield TokenBudgets(client)
    await client.aclose()


async def _refusal(budgets: TokenBudgets, limits: Limits) -> dict[str, object]:
    key = f"k-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ResourceExhausted) as refused:
        for n in range(3):
            await budgets.reserve(key, limits, f"r{n}", 60, time.time())
    return dict(errors.from_status(refused.value.to_status())["error"])


async def test_a_spent_monthly_budget_is_insufficient_quota(budgets):
    error = await _refusal(budgets, Limits(monthly_tokens=100))
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")


async def test_a_spent_minute_budget_stays_a_rate_limit(budgets):
    error = await _refusal(budgets, Limits(tokens_per_minute=100))
    assert (error["type"], error["code"]) == ("rate_limit_error", "token_budget_exceeded")


def test_a_request_rate_refusal_is_rate_limit_exceeded():
    window = WindowStatus(Limit("requests_per_minute", "key k", "w", 60), 60, 10, over=True)
    error = errors.from_status(window.error().to_status())["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
