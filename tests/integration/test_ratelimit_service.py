"""The RateLimitService against a real Redis: tiers, tenants, all-or-nothing windows, leases."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from services.core.server import serving
from services.usage import ratelimit
from services.usage.leases import LEASE_TTL_S, SETTLE_INTERVAL_S
from services.usage.ratelimit import RateLimitServicer, RequestLimiter, latest_freed
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tests.integration.test_budgets_window_sum import _redis_now_ms

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
        pki_dir=mtls.pki_dir(),
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
        async with mtls.aio_channel(running.port, peer="usage") as channel:
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


@contextlib.asynccontextmanager
async def _replicas(redis_url: str, count: int) -> AsyncIterator[list[Any]]:
    """`count` usage services on one Redis, as several replicas run behind the edge."""
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=f"s:{uuid.uuid4().hex}",
    )
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for _ in range(count):
            running = await stack.enter_async_context(serving(UsageService(settings), settings))
            channel = await stack.enter_async_context(mtls.aio_channel(running.port, peer="usage"))
            stubs.append(rls_pb2_grpc.RateLimitServiceStub(channel))
        yield stubs


def _decisions(path: str) -> float:
    """The limiter's decision counter (the services here run in this process)."""
    return REGISTRY.get_sample_value("tokenmesh_ratelimit_decisions_total", {"path": path}) or 0.0


async def _window(redis_url: str, key: str) -> list[Any]:
    """The (member, score) pairs of a key's request window."""
    client = aioredis.from_url(redis_url)
    try:
        return list(await client.zrange(f"tm:ratelimit:rpm:{key}", 0, -1, withscores=True))
    finally:
        await client.aclose()


async def test_leased_admissions_count_every_request_and_settle_to_their_own_times(redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"  # 6400/min: leases of 32 slots
    async with _replicas(redis_url, 1) as (limiter,):
        started_ms = time.time() * 1000
        before = {path: _decisions(path) for path in ("lease", "redis")}
        replies = []
        for _ in range(40):
            replies.append(await limiter.ShouldRateLimit(_request(key_id=key, rpm="6400")))
            await asyncio.sleep(0.002)
        assert [r.overall_code for r in replies] == [OK] * 40
        leased, read = (_decisions(path) - before[path] for path in ("lease", "redis"))
        assert leased + read == 40
        assert leased >= 30  # 2 reads: one per lease of 32
        # One replica: remaining falls by one per request, across leases.
        assert [r.statuses[0].limit_remaining for r in replies] == list(range(6399, 6359, -1))
        # Reserved slots count at once: every admitted request is in the window.
        assert len(await _window(redis_url, key)) >= 40
        # The unused reservations are released once the lease expires and a settle runs.
        deadline = time.monotonic() + LEASE_TTL_S + 5.0
        while len(window := await _window(redis_url, key)) > 40:
            assert time.monotonic() < deadline, len(window)
            await asyncio.sleep(SETTLE_INTERVAL_S)
        assert len(window) == 40
        scores = sorted(score for _, score in window)
        assert scores[0] >= started_ms - 1
        # Each at its own admission time (2 ms apart), not at its lease's grant time.
        # Not strictly in order: a lease's admissions are timed on Redis's clock as the
        # replica last estimated it (its offset includes a call's latency), so where
        # a read re-estimates it, on a loaded machine, a few can land a ms or two out
        # of order or on the same ms (CI met one).
        assert len(set(scores)) >= 30, scores
        assert scores[-1] - scores[0] >= 40, scores  # spread over the ~80 ms of requests


async def test_replicas_sharing_leases_admit_exactly_the_limit(redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"  # 640/min: leases of 10 slots below 320
    async with _replicas(redis_url, 2) as limiters:

        async def caller(limiter: Any) -> list[int]:
            return [
                (await limiter.ShouldRateLimit(_request(key_id=key, rpm="640"))).overall_code
                for _ in range(400)
            ]

        results = await asyncio.gather(*(caller(limiters[i % 2]) for i in range(4)))
    codes = [code for result in results for code in result]
    assert codes.count(OK) == 640
    assert codes.count(OVER) == 1600 - 640
    assert len(await _window(redis_url, key)) == 640  # shutdown settled every lease


async def test_leases_off_every_decision_reads_the_window(redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        lease_size=0,
        # Not the session mesh's stream (its meter would share the mesh's group).
        usage_stream=f"s:{uuid.uuid4().hex}",
    )
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            limiter = rls_pb2_grpc.RateLimitServiceStub(channel)
            for n in range(1, 4):
                await limiter.ShouldRateLimit(_request(key_id=key, rpm="6400"))
                assert len(await _window(redis_url, key)) == n


async def test_no_lease_is_granted_above_half_a_limit_so_none_holds_back_other_replicas(redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"  # 640/min
    async with _replicas(redis_url, 2) as (one, other):
        for _ in range(600):
            assert (await one.ShouldRateLimit(_request(key_id=key, rpm="640"))).overall_code == OK
        await asyncio.sleep(LEASE_TTL_S + 3 * SETTLE_INTERVAL_S)  # its own leases settle
        # A lease here would reserve slots the first replica then cannot use.
        assert (await other.ShouldRateLimit(_request(key_id=key, rpm="640"))).overall_code == OK
        codes = [
            (await one.ShouldRateLimit(_request(key_id=key, rpm="640"))).overall_code
            for _ in range(40)
        ]
    assert codes == [OK] * 39 + [OVER]


@pytest.mark.parametrize("skew_s", [61.0, -120.0])
async def test_a_replica_whose_clock_is_off_still_admits_exactly_the_limit(
    redis_url, monkeypatch, skew_s
):
    """Windows were scored by each replica's own clock. One 61 s ahead dropped the
    others' hits as expired; one 120 s behind added hits the others dropped at once.
    Both admitted past the limit; Redis's clock (TIME) now scores every window."""
    from services.usage import ratelimit

    key = f"key_{uuid.uuid4().hex[:8]}"
    entries = (("key_id", key),)
    client = aioredis.from_url(redis_url)
    on_time = ratelimit.RequestLimiter(client, default_rpm=10, redis_url=redis_url)
    off = ratelimit.RequestLimiter(client, default_rpm=10, redis_url=redis_url)
    real_time = time.time
    try:
        admitted = 0
        for n in range(12):  # the two replicas take turns
            replica = off if n % 2 else on_time
            if replica is off:
                monkeypatch.setattr(ratelimit.time, "time", lambda: real_time() + skew_s)
            statuses = await replica.decide(entries)
            monkeypatch.setattr(ratelimit.time, "time", real_time)
            assert statuses is not None
            admitted += not any(s.over for s in statuses)
            if replica is off:
                assert all(1 <= s.reset_s <= 60 for s in statuses)  # on Redis's clock too
        assert admitted == 10
    finally:
        monkeypatch.setattr(ratelimit.time, "time", real_time)
        await on_time.close()
        await off.close()
        await client.aclose()


async def test_a_refunded_request_leaves_the_window_leased_or_not(redis_url):
    """A worker gives back the count of a try Envoy retries elsewhere (where it counts):
    from its lease's slots, or from Redis when it was counted there."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    entries = (("key_id", key), ("rpm", "6400"))  # leases of 32 slots
    client = aioredis.from_url(redis_url)
    limiter = RequestLimiter(client, default_rpm=60, lease_size=32)
    try:
        first = await limiter.count(entries)  # asks Redis, which grants a lease
        second = await limiter.count(entries)  # admitted from the lease
        assert first is not None and second is not None
        (_, in_redis), (_, leased) = first, second
        assert in_redis is not None and in_redis.lease is None
        assert leased is not None and leased.lease is not None
        for hit in (in_redis, leased):
            await limiter.refund(hit)
        # Once the lease is settled, neither request is in the window.
        deadline = time.monotonic() + LEASE_TTL_S + 5.0
        while window := await _window(redis_url, key):
            assert time.monotonic() < deadline, window
            await asyncio.sleep(SETTLE_INTERVAL_S)
    finally:
        await limiter.close()
        await client.aclose()


async def test_a_refund_during_a_redis_stall_holds_the_refusal_briefly_and_lands_after(
    own_redis,
):
    """A worker refusing a try Envoy retries waited for its refund up to 1 s while
    Redis stalled (the client's retry with it); it now waits 50 ms and the refund
    finishes behind the refusal, once Redis answers."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(own_redis)
    limiter = RequestLimiter(client, default_rpm=60, redis_url=own_redis)  # no leases
    try:
        counted = await limiter.count((("key_id", key),))
        assert counted is not None and counted[1] is not None
        assert len(await _window(own_redis, key)) == 1
        await client.execute_command("CLIENT", "PAUSE", "600", "ALL")  # a stalled Redis
        started = time.monotonic()
        await limiter.refund(counted[1])
        assert time.monotonic() - started < 0.3  # 0.6 s (the stall) before
        deadline = time.monotonic() + 5.0
        while await _window(own_redis, key):  # taken back once Redis answers again
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await limiter.close()
        await client.aclose()


@pytest.mark.parametrize("failure_mode_deny", [False, True])
async def test_a_decision_cut_during_a_redis_stall_leaves_no_lease_behind(
    own_redis, failure_mode_deny
):
    """Envoy gives up on a decision after 0.25 s; the script, already sent, runs once
    Redis answers again and reserved a lease's 32 slots that no lease held, for 60 s:
    a brownout whose grants were all cut left a key about half its limit. They are
    taken back now, and the request's own count too where it was refused (deny)."""
    key = f"key_{uuid.uuid4().hex[:8]}"  # 6400/min: a decision asks for 32 slots
    client = aioredis.from_url(own_redis)
    limiter = RequestLimiter(
        client, 1, redis_url=own_redis, lease_size=32, failure_mode_deny=failure_mode_deny
    )
    try:
        await limiter.decide((("key_id", "warm"),))  # the hot path's connection made
        await client.execute_command("CLIENT", "PAUSE", "400", "ALL")  # a stalled Redis
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limiter.decide((("key_id", key), ("rpm", "6400"))), 0.25)
        assert not limiter.leases.holds_any()
        deadline = time.monotonic() + 2.0
        while len(await _window(own_redis, key)) < 33:  # the cut script ran: 1 hit + 32
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        kept = 0 if failure_mode_deny else 1  # let through (fail-open): it counts
        deadline = time.monotonic() + 10.0
        while len(await _window(own_redis, key)) != kept:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await limiter.close()
        await client.aclose()


async def test_decisions_cut_by_the_hundred_take_back_a_bounded_number_at_once(own_redis):
    """Each cut decision took its slots back in a task of its own, retried for ~47 s:
    a stall at 200 decisions a second held 400 tasks and filled the pool."""
    client = aioredis.from_url(own_redis)
    limiter = RequestLimiter(client, 1, redis_url=own_redis, lease_size=32)
    try:
        await limiter.decide((("key_id", "warm"),))
        await client.execute_command("CLIENT", "PAUSE", "800", "ALL")
        cut = [
            asyncio.wait_for(limiter.decide((("key_id", f"k{i}"), ("rpm", "6400"))), 0.2)
            for i in range(200)
        ]
        await asyncio.gather(*cut, return_exceptions=True)
        assert 0 < len(limiter._cut_forgets) <= ratelimit.MAX_CUT_FORGETS
    finally:
        await limiter.close()
        await client.aclose()


@contextlib.asynccontextmanager
async def _servicer(redis_url: str, **limits: Any) -> AsyncIterator[Any]:
    client = aioredis.from_url(redis_url)
    servicer = RateLimitServicer(client, redis_url=redis_url, lease_size=0, **limits)
    try:
        yield servicer, client
    finally:
        await servicer.close()
        await client.aclose()


async def test_a_request_two_windows_refuse_gets_one_retry_after_of_the_one_freed_last(redis_url):
    # One Retry-After per refusing window (10 and 50 here) reached the client: two
    # contradicting fields, and a body naming whichever window came last; the worker
    # answered the first window's 10 s, and a client that waited it was refused again.
    tenant, model = f"t{uuid.uuid4().hex[:6]}", f"m{uuid.uuid4().hex[:6]}"
    async with _servicer(redis_url, default_rpm=600, tenant_rpm=2, model_rpm={model: 2}) as (
        servicer,
        client,
    ):
        now = await _redis_now_ms(client)
        await client.zadd(f"tm:ratelimit:tenant:{tenant}", {"a": now - 50_000, "b": now - 50_000})
        await client.zadd(f"tm:ratelimit:model:{model}", {"c": now - 10_000, "d": now - 10_000})
        entries = {"key_id": f"key_{uuid.uuid4().hex[:8]}", "tenant": tenant, "model": model}
        answer = await servicer.ShouldRateLimit(_request(**entries), None)
        retry_after = [h.value for h in answer.response_headers_to_add if h.key == "retry-after"]
        assert answer.overall_code == OVER and len(retry_after) == 1
        assert 49 <= int(retry_after[0]) <= 51, retry_after
        assert b"model_requests_per_minute" in answer.raw_body
        windows = await servicer.decide(tuple(entries.items()))
        worst = latest_freed(windows)
        assert worst is not None and worst.limit.name == "model_requests_per_minute"


async def test_a_refusal_after_a_limit_was_lowered_waits_until_enough_entries_expired(redis_url):
    # Ten requests admitted 5 s apart under rpm=20, then the key's limit is 3: eight
    # must expire before a request fits (45 s), but the refusal said 10 s (the oldest).
    key = f"key_{uuid.uuid4().hex[:8]}"
    async with _servicer(redis_url, default_rpm=600) as (servicer, client):
        now = await _redis_now_ms(client)
        await client.zadd(
            f"tm:ratelimit:rpm:{key}", {f"h{i}": now - 50_000 + 5_000 * i for i in range(10)}
        )
        (window,) = await servicer.decide((("key_id", key), ("rpm", "3")))
        assert window.over and 44 <= window.reset_s <= 46, window.reset_s


async def test_a_lease_whose_settle_failed_leaves_no_slot_before_its_admissions(redis_url):
    # A settle that failed (a Redis stall) dropped its lease: the used slots kept the
    # reservation's score and left the window up to a second before the requests they
    # admitted, letting up to a lease's worth of requests over the limit.
    client = aioredis.from_url(redis_url)
    limiter = RequestLimiter(client, default_rpm=6400, redis_url=redis_url, lease_size=32)
    failed = asyncio.Event()

    async def stalled(**_: Any) -> None:
        failed.set()
        raise RedisConnectionError("stalled")

    limiter._settle_script = stalled  # noqa: SLF001 - Redis refuses the settle
    key = f"key_{uuid.uuid4().hex[:8]}"
    try:
        granted_at = await _redis_now_ms(client)
        for _ in range(11):  # one decision in Redis (its lease granted), ten from the lease
            (window,) = await limiter.decide((("key_id", key),))
            assert not window.over
        async with asyncio.timeout(10):
            await failed.wait()
        (window_key,) = [k async for k in client.scan_iter(match=f"tm:ratelimit:*{key}*")]
        scores = [score for _, score in await client.zrange(window_key, 0, -1, withscores=True)]
        leased = sorted(scores)[1:]  # the first decision's own slot aside
        assert len(leased) == 32 and min(leased) >= granted_at + LEASE_TTL_S * 1000, leased[:3]
        # Nor does the window's key go before them: it expired a window after the
        # decision, up to a second before the slots scored ahead.
        ttl_ms = await client.pttl(window_key)
        assert await _redis_now_ms(client) + ttl_ms >= max(leased) + 60_000, ttl_ms
    finally:
        await limiter.close()
        await client.aclose()
