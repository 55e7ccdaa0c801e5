"""The minute window's running sum: exact after every change, O(1) per reservation.

Each reservation summed the key's whole window (HVALS) and a refusal walked it member
by member: O(the key's requests in the last minute) of the durable Redis's single
thread per request, so one busy key with a tokens_per_minute budget saturated it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.core.errors import ResourceExhausted, TokenmeshError
from services.inference import budget, shadow
from services.inference.budget import Limits, TokenBudgets


@pytest.fixture
async def budgets(redis_url: str) -> AsyncIterator[TokenBudgets]:
    client = aioredis.from_url(redis_url)
    yield TokenBudgets(client)
    await client.aclose()


def _key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


async def _assert_sum_is_the_windows(budgets: TokenBudgets, key: str) -> int:
    """Asserts the window's sum holds its amounts' sum and count; returns the sum."""
    _, amounts_key, _ = budgets._keys(key, time.time())
    amounts = [int(v) for v in await budgets.redis.hvals(amounts_key)]
    tokens, entries = await budgets.redis.hmget(budgets._sum_key(key), "tokens", "entries")
    assert tokens is not None and entries is not None, "no running sum"
    assert (int(tokens), int(entries)) == (sum(amounts), len(amounts))
    return sum(amounts)


async def _redis_now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _fill_window(
    client: aioredis.Redis,
    key: str,
    count: int,
    amount: int,
    at_ms: int,
    step_ms: int = 0,
    prefix: str = "old",
) -> None:
    """Writes `count` reservations into a key's window as an earlier release's script
    did (window and amounts, no running sum)."""
    window = f"tm:budget:{key}:tpm"
    for start in range(0, count, 5000):
        chunk = range(start, min(start + 5000, count))
        async with client.pipeline(transaction=False) as pipe:
            pipe.zadd(window, {f"{prefix}{n}": at_ms + n * step_ms for n in chunk})
            pipe.hset(f"{window}:amounts", mapping={f"{prefix}{n}": amount for n in chunk})
            await pipe.execute()


async def test_the_sum_follows_every_reserve_reconcile_forget_and_expiry(budgets):
    key, limits = _key(), Limits(tokens_per_minute=1000)
    window, amounts, _ = budgets._keys(key, time.time())
    for n, amount in enumerate((10, 20, 30, 40, 50)):
        await budgets.reserve(key, limits, f"r{n}", amount, attempt=f"a{n}")
        await _assert_sum_is_the_windows(budgets, key)
    await budgets.reconcile(key, "r1", 20, 5)  # used less than it reserved
    assert await _assert_sum_is_the_windows(budgets, key) == 135
    await budgets.reconcile(key, "r2", 30, 0, run="unfinished")  # given back: 0
    assert await _assert_sum_is_the_windows(budgets, key) == 105
    assert await budgets.forget(key, "r3", time.time(), attempt="a3")
    assert await _assert_sum_is_the_windows(budgets, key) == 65
    # r0 and r4 reserved more than a minute ago (by Redis's clock): the next
    # reservation expires them, and their amounts leave the sum.
    old = await _redis_now_ms(budgets.redis) - 61_000
    await budgets.redis.zadd(window, {"r0": old, "r4": old}, xx=True)
    await budgets.reserve(key, limits, "r5", 7, attempt="a5")
    assert await _assert_sum_is_the_windows(budgets, key) == 5 + 0 + 7
    assert not await budgets.redis.hexists(amounts, "r0")
    # The given-back r2 reserves anew: its window entry is replaced, not added.
    await budgets.reserve(key, limits, "r2", 33, attempt="a2-again")
    assert await _assert_sum_is_the_windows(budgets, key) == 5 + 33 + 7
    # And the sum is what admits: exactly tokens_per_minute, never one more.
    await budgets.reserve(key, limits, "r6", 1000 - 45, attempt="a6")
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "r7", 1, attempt="a7")
    assert await _assert_sum_is_the_windows(budgets, key) == 1000


async def test_a_window_an_earlier_release_wrote_is_summed_once_and_exactly(budgets):
    """An upgrade under load: the window has no sum yet. The first reservation builds it
    from the amounts; a reservation the sum cannot see (an earlier release's script,
    still running during a rolling upgrade) makes the next one build it again."""
    key, limits = _key(), Limits(tokens_per_minute=1000)
    await _fill_window(budgets.redis, key, 9, 100, await _redis_now_ms(budgets.redis))
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "over", 101)
    assert await _assert_sum_is_the_windows(budgets, key) == 900
    await budgets.reserve(key, limits, "fits", 50)
    now_ms = await _redis_now_ms(budgets.redis)
    await _fill_window(budgets.redis, key, 1, 50, now_ms, prefix="older-worker")
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "over-again", 1)
    assert await _assert_sum_is_the_windows(budgets, key) == 1000


async def test_a_refusal_that_would_need_more_than_the_oldest_few_answers_when_all_expire(
    budgets,
):
    """The retry-after walk reads at most RETRY_WALK of the oldest reservations; past
    them it answers when the newest expires (never early: the request fits then)."""
    walk = budget.RETRY_WALK
    key, count = _key(), 4 * walk
    start = await _redis_now_ms(budgets.redis) - 40_000
    await _fill_window(budgets.redis, key, count, 1, start, step_ms=100)
    limits = Limits(tokens_per_minute=count)
    with pytest.raises(ResourceExhausted) as refused:
        await budgets.reserve(key, limits, "big", 2 * walk)
    exact_s = (start + 2 * walk * 100 + 60_000 - await _redis_now_ms(budgets.redis)) / 1000
    assert exact_s - 1 <= (refused.value.retry_after_s or 0) <= 60
    with pytest.raises(ResourceExhausted) as refused:  # within the walk: exact
        await budgets.reserve(key, limits, "small", 3)
    assert 19 <= (refused.value.retry_after_s or 0) <= 21  # when old0..old2 expire


async def _evalsha_usec_per_call(client: aioredis.Redis) -> float:
    stats = await client.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec_per_call"])


async def test_a_reservation_costs_redis_the_same_however_full_the_window(own_redis):
    """20,000 reservations in the key's last minute: a reservation, admitted or refused,
    keeps Redis busy a few tens of µs (it was ~5 ms admitted, ~20 ms refused: the whole
    window summed, and walked, each time). Measured by Redis itself (commandstats), on
    a Redis of its own; the bound is generous against a shared machine's noise."""
    client = aioredis.from_url(own_redis)
    try:
        budgets, key = TokenBudgets(client), _key()
        await _fill_window(client, key, 20_000, 50, await _redis_now_ms(client) - 1000)
        roomy, full = Limits(tokens_per_minute=10**9), Limits(tokens_per_minute=20_000 * 50)
        await budgets.reserve(key, roomy, "first", 50)  # builds the sum (once)
        await client.config_resetstat()
        for n in range(40):
            await budgets.reserve(key, roomy, f"admitted{n}", 50)
        for n in range(40):
            with pytest.raises(ResourceExhausted):
                await budgets.reserve(key, full, f"refused{n}", 50)
        assert await _evalsha_usec_per_call(client) < 1000
        assert await _assert_sum_is_the_windows(budgets, key) == 20_041 * 50
    finally:
        await client.aclose()


async def test_a_shadow_copys_budget_read_uses_the_running_sum(own_redis):
    """A copy's read of its caller's budgets (services.inference.shadow) summed the
    whole window on every copy, as reservations did: ~5 ms of Redis a copy at 20,000
    reservations in the minute. It reads the running sum now, and agrees with it."""
    client = aioredis.from_url(own_redis)
    try:
        budgets, key = TokenBudgets(client), _key()
        caller_budgets = shadow.CallerBudgets(budgets)
        await _fill_window(client, key, 20_000, 50, await _redis_now_ms(client) - 1000)
        await budgets.reserve(key, Limits(tokens_per_minute=10**9), "first", 50)  # the sum
        window_total = await _assert_sum_is_the_windows(budgets, key)
        caller = shadow.CopyCaller(key, Limits(tokens_per_minute=window_total + 10))
        await client.config_resetstat()
        for _ in range(40):
            await caller_budgets.check(caller, 10, "m", "1")  # exactly fits
        assert await _evalsha_usec_per_call(client) < 1000
        with pytest.raises(TokenmeshError):
            await caller_budgets.check(caller, 11, "m", "1")  # one token over
    finally:
        await client.aclose()
