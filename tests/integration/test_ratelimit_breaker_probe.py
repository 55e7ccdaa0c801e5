"""Every rate-limit call that takes the store breaker's probe records its outcome.

A call after the breaker's open time is its probe (services/core/breaker.py):
until the probe records how the store answered, every other call fails at once
for PROBE_S (10 s). A refund (a worker refusing a try Envoy retries) and a
decision that met a bug took the probe and recorded nothing: the breaker stayed
open for 10 s while Redis answered, every decision failing open (uncounted),
or refused with failure_mode_deny. Real Redis; the breaker runs on a test clock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis

from services.core.breaker import Breaker
from services.usage.ratelimit import RequestLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.from_url(own_redis)
    yield redis_client
    await redis_client.aclose()


def _opened(limiter: RequestLimiter, clock: Clock) -> Breaker:
    """Gives `limiter` a breaker on `clock`, opened as by a Redis stall (failures in a
    row over more than span_s), with its open time over: the next call probes."""
    breaker = limiter.breaker = Breaker("ratelimit", clock=clock)
    for _ in range(breaker.failures):
        breaker.failed()
        clock.now += breaker.span_s
    assert breaker.is_open
    clock.now += breaker.open_s
    return breaker


async def _window(client: aioredis.Redis, key: str) -> list[bytes]:
    members = await client.zrange(f"tm:ratelimit:rpm:{key}", 0, -1)
    return cast(list[bytes], members)


async def test_a_refund_that_probes_closes_the_breaker(own_redis, client):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limiter = RequestLimiter(client, default_rpm=60, redis_url=own_redis)  # no leases
    clock = Clock()
    try:
        counted = await limiter.count((("key_id", key),))
        assert counted is not None and counted[1] is not None
        breaker = _opened(limiter, clock)
        await limiter.refund(counted[1])  # the probe: Redis answers it
        deadline = time.monotonic() + 3.0
        while await _window(client, key) or breaker.is_open:  # the refund lands and records
            assert time.monotonic() < deadline, "Redis answered the probe; the breaker is open"
            await asyncio.sleep(0.01)
        clock.now += 1.0  # within PROBE_S: the old code failed this decision at once
        statuses = await limiter.decide((("key_id", key),))
        assert statuses is not None and statuses[0].used == 1  # counted in Redis
    finally:
        await limiter.close()


async def test_a_decision_that_meets_a_bug_while_probing_releases_the_probe(own_redis, client):
    broken, healthy = f"key_{uuid.uuid4().hex[:8]}", f"key_{uuid.uuid4().hex[:8]}"
    # A window of the wrong type: Redis answers (with an error), our data is at fault.
    await client.set(f"tm:ratelimit:rpm:{broken}", "not a sorted set", ex=60)
    limiter = RequestLimiter(client, default_rpm=60, redis_url=own_redis)
    clock = Clock()
    try:
        breaker = _opened(limiter, clock)
        with pytest.raises(Exception) as bug:  # noqa: PT011 - INTERNAL at the RPC boundary
            await limiter.decide((("key_id", broken),))
        assert "unavailable" not in str(bug.value).lower(), "a bug posed as an outage"
        assert not breaker.is_open
        clock.now += 1.0
        statuses = await limiter.decide((("key_id", healthy),))
        assert statuses is not None and statuses[0].used == 1
    finally:
        await limiter.close()
