"""A dead worker's token reservations are given back by the workers still alive.

A worker killed with requests running (kill -9, the OOM killer) reconciled
nothing: their reservations (prompt + max_tokens each) stayed charged to the
key's month until the month ended. Now each worker lists its open reservations
under its holder name and keeps a liveness key; a holder whose key expired is
dead, and any live worker's reaper takes its reservations back. Real Redis, the
real budget scripts, a real worker in-process for the wiring. A killed process
stops refreshing its liveness key: the tests let it expire (or delete it).
"""

from __future__ import annotations

import asyncio
import calendar
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.redis_service import text
from services.core.tasks import Supervisor
from services.inference.budget import HOLDERS_KEY, Limits, TokenBudgets
from services.inference.reservation_reaper import ReservationReaper, alive_key
from tests.integration.conftest import inference_settings, month_charged, start_inference
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

LIMITS = Limits(tokens_per_minute=10_000, monthly_tokens=10_000)


@pytest.fixture
async def client(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(own_redis)
    yield redis
    await redis.aclose()


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _month_used(budgets: TokenBudgets, key: str) -> int:
    return await month_charged(budgets.redis, key)


async def _dead(client: aioredis.Redis, holder: str) -> None:
    """Waits until `holder`'s liveness key expired (its process stopped refreshing it)."""

    async def expired() -> bool:
        return not await client.exists(alive_key(holder))

    await _until(expired)


async def test_a_dead_holders_open_reservations_are_given_back_once(
    client: aioredis.Redis,
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    dead = TokenBudgets(client, holder="w-dead:1")
    alive = TokenBudgets(client, holder="w-alive:1")
    dead_reaper, alive_reaper = ReservationReaper(dead, ttl_s=1), ReservationReaper(alive)
    await dead_reaper.beat()
    await alive_reaper.beat()
    now = time.time()
    await dead.reserve(key, LIMITS, "running-1", 3000, now, "a1", listed=True)
    await dead.reserve(key, LIMITS, "running-2", 2000, now, "a2", listed=True)
    await dead.reserve(key, LIMITS, "ended", 1000, now, "a3", listed=True)
    await dead.reconcile(key, "ended", 1000, 400, now)  # it ended: 400 used
    assert await _month_used(dead, key) == 5400
    assert await alive_reaper.reap() == 0  # its holder is alive: its requests run
    assert await _month_used(dead, key) == 5400

    await _dead(client, "w-dead:1")
    assert await alive_reaper.reap() == 2
    assert await _month_used(dead, key) == 400  # the ended request's use stays
    assert not await client.exists(TokenBudgets.open_key("w-dead:1"))
    assert b"w-dead:1" not in await client.smembers(HOLDERS_KEY)
    assert await alive_reaper.reap() == 0  # once
    # The minute window gave them back too: what the key has left fits.
    await alive.reserve(key, LIMITS, "fits", 9600, time.time(), "a4", listed=True)


async def test_reapers_at_once_give_a_reservation_back_once(client: aioredis.Redis) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    dead = TokenBudgets(client, holder="w-dead:2")
    reapers = [ReservationReaper(TokenBudgets(client, holder=f"w-{n}:2")) for n in range(3)]
    await ReservationReaper(dead, ttl_s=1).beat()
    now = time.time()
    for n in range(20):
        await dead.reserve(key, LIMITS, f"r{n}", 100, now, f"a{n}", listed=True)
    await _dead(client, "w-dead:2")
    refunded = await asyncio.gather(*(reaper.reap() for reaper in reapers))
    assert sum(refunded) == 20
    assert await _month_used(dead, key) == 0


async def test_a_frozen_worker_that_wakes_after_its_reservations_were_taken_back_is_billed_its_use(
    client: aioredis.Redis,
) -> None:
    # Frozen past its liveness (a long pause, a partition): its reservation was taken
    # back; its request then ends and reconciles, charged what it used.
    key = f"key_{uuid.uuid4().hex[:8]}"
    frozen = TokenBudgets(client, holder="w-frozen:3")
    await ReservationReaper(frozen, ttl_s=1).beat()
    now = time.time()
    await frozen.reserve(key, LIMITS, "long", 3000, now, "a1", listed=True)
    await _dead(client, "w-frozen:3")
    assert await ReservationReaper(TokenBudgets(client, holder="w-other:3")).reap() == 1
    assert await _month_used(frozen, key) == 0
    await frozen.reconcile(key, "long", 3000, 120, now)
    assert await _month_used(frozen, key) == 120


async def test_a_reconciled_reservation_is_never_taken_back(client: aioredis.Redis) -> None:
    # A reaper reads the open reservations, then the request reconciles, then the
    # reaper takes back what it read: nothing, the request is billed its use.
    key = f"key_{uuid.uuid4().hex[:8]}"
    slow = TokenBudgets(client, holder="w-slow:4")
    now = time.time()
    await slow.reserve(key, LIMITS, "done", 3000, now, "a1", listed=True)
    read = await client.hgetall(TokenBudgets.open_key("w-slow:4"))
    await slow.reconcile(key, "done", 3000, 200, now)
    reaper_budgets = TokenBudgets(client, holder="w-reaper:4")
    for field, value in read.items():
        assert not await reaper_budgets.take_back_open("w-slow:4", text(field), text(value))
    assert await _month_used(slow, key) == 200


async def test_a_job_item_replayed_on_another_worker_keeps_its_charge_when_the_first_is_reaped(
    client: aioredis.Redis,
) -> None:
    # The jobs service tries `<job>:<n>` again on worker B once worker A died with it:
    # B takes the reservation over and reconciles it. A's reaper must leave it (it
    # refunded B's whole charge: the item ran and was metered, the month read 0).
    key = f"key_{uuid.uuid4().hex[:8]}"
    first = TokenBudgets(client, holder="w-first:5")
    second = TokenBudgets(client, holder="w-second:5")
    await ReservationReaper(first, ttl_s=1).beat()
    await ReservationReaper(second).beat()
    now = time.time()
    await first.reserve(key, LIMITS, "job-1:0", 3000, now, "a1", listed=True)
    await second.reserve(key, LIMITS, "job-1:0", 3000, now, "a2", listed=True)  # the replay
    await second.reconcile(key, "job-1:0", 3000, 300, now, run="finished")
    assert await _month_used(first, key) == 300
    await _dead(client, "w-first:5")
    assert await ReservationReaper(TokenBudgets(client, holder="w-third:5")).reap() == 0
    assert await _month_used(first, key) == 300
    assert not await client.exists(TokenBudgets.open_key("w-first:5"))


async def test_a_replay_that_dies_too_is_given_back_once(client: aioredis.Redis) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    first = TokenBudgets(client, holder="w-first:6")
    second = TokenBudgets(client, holder="w-second:6")
    for budgets in (first, second):
        await ReservationReaper(budgets, ttl_s=1).beat()
    now = time.time()
    await first.reserve(key, LIMITS, "job-2:0", 3000, now, "a1", listed=True)
    await second.reserve(key, LIMITS, "job-2:0", 3000, now, "a2", listed=True)
    await _dead(client, "w-first:6")
    await _dead(client, "w-second:6")
    assert await ReservationReaper(TokenBudgets(client, holder="w-third:6")).reap() == 1
    assert await _month_used(first, key) == 0


async def test_an_entry_the_scripts_did_not_write_is_dropped_not_fatal(
    client: aioredis.Redis,
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    dead = TokenBudgets(client, holder="w-dead:7")
    await ReservationReaper(dead, ttl_s=1).beat()
    await dead.reserve(key, LIMITS, "r1", 500, time.time(), "a1", listed=True)
    await client.hset(TokenBudgets.open_key("w-dead:7"), "not json", "either")
    await _dead(client, "w-dead:7")
    assert await ReservationReaper(TokenBudgets(client, holder="w-live:7")).reap() == 1
    assert await _month_used(dead, key) == 0
    assert not await client.exists(TokenBudgets.open_key("w-dead:7"))


async def test_a_worker_lists_a_running_requests_reservation_and_clears_it_when_it_ends(
    tmp_path: Path, own_redis: str, client: aioredis.Redis
) -> None:
    settings = inference_settings(tmp_path, own_redis, test_engine_step_ms=20)
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [(contract.KEY_ID_HEADER, key), (contract.MONTHLY_TOKENS_HEADER, "100000")]
    async with await start_inference(settings) as (service, channel):
        assert service._reaper is not None
        holder = service._reaper.budgets.holder
        assert holder.startswith(f"{settings.worker_id}:")
        open_key = TokenBudgets.open_key(holder)

        async def alive() -> bool:
            return bool(await client.exists(alive_key(holder)))

        await _until(alive)
        request = pb.GenerateRequest(model="deterministic-test", prompt="a", max_output_tokens=100)
        stream = rpc.InferenceServiceStub(channel).Generate(request, metadata=identity)
        await stream.read()  # it runs: its reservation is open

        assert await client.hlen(open_key) == 1
        while await stream.read() is not grpc.aio.EOF:
            pass

        async def cleared() -> bool:  # reconciled in the background
            return await client.hlen(open_key) == 0

        await _until(cleared)
    # A clean stop ends the holder at once: anything left open is taken back now.
    assert not await alive()


async def test_a_stopped_reaper_does_not_bring_its_holder_back(client: aioredis.Redis) -> None:
    # Its loop ran on after stop() deleted the liveness key, and its next refresh
    # wrote it back: what was left open waited out the TTL.
    reaper = ReservationReaper(TokenBudgets(client, holder="w-stop:8"), every_s=0.02)
    supervisor = Supervisor("test")
    reaper.start(supervisor)

    async def alive() -> bool:
        return bool(await client.exists(alive_key("w-stop:8")))

    await _until(alive)
    await reaper.stop()
    for _ in range(25):  # 25 of its periods
        assert not await alive()
        await asyncio.sleep(0.02)
    await supervisor.stop()


def _next_month_start(now: float) -> float:
    tm = time.gmtime(now)
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


async def _month_at(client: aioredis.Redis, key: str, at: float) -> int:
    return int(await client.get(TokenBudgets.month_key(key, at)) or 0)


async def test_a_job_items_retry_past_a_months_end_reconciles_in_its_charges_month(
    client: aioredis.Redis,
) -> None:
    # Worker A reserved `<job>:<n>` a second before the month's end and died; B's retry
    # two seconds into the next month took the charge over. Reconciled in B's month,
    # the old month kept all 3000 and the new one read -2700: 2700 tokens over budget.
    key = f"key_{uuid.uuid4().hex[:8]}"
    end = _next_month_start(time.time())
    first = TokenBudgets(client, holder="w-first:7")
    second = TokenBudgets(client, holder="w-second:7")
    await first.reserve(key, LIMITS, "job-3:0", 3000, end - 1.0, "a1", listed=True)
    taken = await second.reserve(key, LIMITS, "job-3:0", 3000, end + 2.0, "a2", listed=True)
    assert taken.reserved_at == end - 1.0  # the charge's month
    await second.reconcile(key, "job-3:0", 3000, 300, taken.reserved_at, run="finished")
    assert (await _month_at(client, key, end - 1.0), await _month_at(client, key, end)) == (
        300,
        0,
    )


async def test_a_retry_past_a_months_end_that_dies_too_is_given_back_in_its_month(
    client: aioredis.Redis,
) -> None:
    # The retry's holder lists the charge's time, so its reaper refunds that month.
    key = f"key_{uuid.uuid4().hex[:8]}"
    end = _next_month_start(time.time())
    first = TokenBudgets(client, holder="w-first:8")
    second = TokenBudgets(client, holder="w-second:8")
    for budgets in (first, second):
        await ReservationReaper(budgets, ttl_s=1).beat()
    await first.reserve(key, LIMITS, "job-4:0", 3000, end - 1.0, "a1", listed=True)
    await second.reserve(key, LIMITS, "job-4:0", 3000, end + 2.0, "a2", listed=True)
    await _dead(client, "w-first:8")
    await _dead(client, "w-second:8")
    assert await ReservationReaper(TokenBudgets(client, holder="w-third:8")).reap() == 1
    assert (await _month_at(client, key, end - 1.0), await _month_at(client, key, end)) == (0, 0)


async def test_a_live_holder_is_not_reaped_after_redis_comes_back(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis away longer than the holders' TTL lets every liveness key lapse, live ones
    too. The first reaper back beat and reaped at once, while its live peers' loops
    slept out their period: it took back the running reservations of workers that were
    neither dead nor frozen, and their room was admitted twice."""
    monkeypatch.setattr(
        "services.inference.reservation_reaper.AFTER_FAILURE_S", 0.05, raising=False
    )
    key = f"key_{uuid.uuid4().hex[:8]}"
    live = TokenBudgets(client, holder=f"w-live:{key}")
    peer = TokenBudgets(client, holder=f"w-peer:{key}")
    await live.reserve(key, LIMITS, "running", 800, attempt="a1", listed=True)
    outage, failed, reaped_after = True, set(), []
    real_beat, real_reap = ReservationReaper.beat, ReservationReaper.reap

    async def beat(self: ReservationReaper) -> None:
        if outage:
            failed.add(self.budgets.holder)
            raise ConnectionError("Redis away")
        await real_beat(self)

    async def reap(self: ReservationReaper) -> int:
        refunded = await real_reap(self)
        reaped_after.append(refunded)
        return refunded

    monkeypatch.setattr(ReservationReaper, "beat", beat)
    monkeypatch.setattr(ReservationReaper, "reap", reap)
    supervisor = Supervisor("test")
    # The live worker's period is long (its loop slept it out after the failure), the
    # peer's short: the peer's reaper is the first back.
    ReservationReaper(live, every_s=5.0, ttl_s=3).start(supervisor)
    ReservationReaper(peer, every_s=0.2, ttl_s=3).start(supervisor)
    try:
        await _until(lambda: _true(failed == {live.holder, peer.holder}))
        await client.delete(alive_key(live.holder))  # lapsed during the outage
        outage = False
        await _until(lambda: _true(bool(reaped_after)))  # the peer reaped since
        assert await client.exists(alive_key(live.holder))
        assert await _month_used(live, key) == 800  # still charged: its request runs
        assert reaped_after == [0]
    finally:
        await supervisor.stop()


async def _true(value: bool) -> bool:
    return value
