"""A worker killed between recording a request and reconciling its reservation.

Recording (the usage event in the worker's spool) comes first, the reconcile
reaches Redis a moment later. A kill -9 in between left the reservation open,
a reaper gave all of it back, and the key's month missed the tokens the meter
billed: the fault suite measured 7 tokens under after one kill. Now the worker
restarted on the same spool (its successor) reconciles such requests from their
spooled events, whether or not a reaper took them back first, and takes back
the rest of its predecessor's reservations at once. Real Redis, real spools,
the real budget scripts; the predecessor "dies" by stopping without settling.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.core.tasks import Supervisor
from services.inference.admission import token_usage
from services.inference.budget import HOLDERS_KEY, Limits, TokenBudgets
from services.inference.reservation_reaper import (
    HOLDERS_FILE,
    ReservationReaper,
    alive_key,
    read_incarnations,
)
from services.inference.usage_log import UsageLog
from tests.integration.test_budget_reaper import _month_used, _until
from tokenmesh.inference.v1 import inference_pb2

LIMITS = Limits(tokens_per_minute=100_000, monthly_tokens=100_000)
STREAM = "test:successor:usage"


@pytest.fixture
async def client(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(own_redis)
    yield redis
    await redis.aclose()


def _event(key: str, request_id: str, prompt: int, completion: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=request_id,
        event_id=request_id,
        key_id=key,
        usage=token_usage(prompt, completion),
        finish_unix_ms=int(time.time() * 1000),
    )


class Worker:
    """One incarnation of a worker: its spool, its budgets' holder and its reaper."""

    def __init__(self, client: aioredis.Redis, spool: Path, name: str) -> None:
        self.log = UsageLog(spool, client, STREAM, 1 << 20, lock_wait_s=5)
        self.budgets = TokenBudgets(client, holder=f"w-1:{name}")
        self.reaper = ReservationReaper(self.budgets, every_s=0.05, ttl_s=60, spool=self.log)
        self.supervisor = Supervisor(name)
        self.ended = False

    def start(self) -> None:
        self.reaper.start(self.supervisor)

    async def record(self, key: str, request_id: str, used: tuple[int, int]) -> None:
        """Reserves 1,000 tokens for a request, runs it, and records its usage event;
        its reconcile never starts (the worker is killed first)."""
        await self.budgets.reserve(
            key, LIMITS, request_id, 1000, time.time(), uuid.uuid4().hex, listed=True
        )
        self.log.append(_event(key, request_id, *used))

    async def killed(self) -> None:
        """Ends like a kill -9 as far as budgets go: nothing settled, nothing taken
        back, its liveness key left to expire (deleted here: it did)."""
        if self.ended:
            return
        self.ended = True
        await self.supervisor.stop()
        await self.log.stop(timeout_s=0)  # ships nothing: it was killed
        await self.budgets.redis.delete(alive_key(self.budgets.holder))


@pytest.fixture
async def workers(client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Callable[[str], Worker]]:
    """Makes worker incarnations on one spool; ends those a failed test left running."""
    made: list[Worker] = []

    def make(name: str) -> Worker:
        made.append(Worker(client, tmp_path / "w-1", name))
        return made[-1]

    yield make
    for worker in made:
        await worker.killed()


async def test_a_successor_reconciles_what_its_killed_predecessor_recorded(
    tmp_path: Path, client: aioredis.Redis, workers: Callable[[str], Worker]
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    first = workers("first")
    first.start()
    await first.record(key, "recorded", (3, 4))  # 7 tokens, its reconcile lost
    await first.record(key, "settled", (2, 3))
    await first.budgets.reconcile(key, "settled", 1000, 5)  # this one landed
    await first.budgets.reserve(key, LIMITS, "cut", 1000, time.time(), "a-cut", listed=True)
    assert await _month_used(first.budgets, key) == 2005
    await first.killed()

    second = workers("second")
    second.start()
    assert names_now(tmp_path) == [first.budgets.holder, second.budgets.holder]

    async def settled() -> bool:
        return not await client.exists(TokenBudgets.open_key(first.budgets.holder))

    await _until(settled)
    # The recorded request is charged its use, the settled one once, the cut one
    # (no event: its client saw it fail) nothing: at once, not after the TTL.
    assert await _month_used(second.budgets, key) == 7 + 5
    assert first.budgets.holder.encode() not in await client.smembers(HOLDERS_KEY)
    await _until(lambda: _true(names_now(tmp_path) == [second.budgets.holder]))
    await second.killed()


def names_now(spool: Path) -> list[str]:
    return [one.holder for one in read_incarnations(spool / "w-1")]


async def _true(value: bool) -> bool:
    return value


async def test_a_successor_charges_a_recorded_request_a_reaper_gave_back_first(
    tmp_path: Path, client: aioredis.Redis, workers: Callable[[str], Worker]
) -> None:
    # The worker came back after its liveness lapsed: another worker's reaper gave
    # the whole reservation back first (month 0, 7 tokens billed).
    key = f"key_{uuid.uuid4().hex[:8]}"
    first = workers("first")
    first.start()
    await first.record(key, "recorded", (3, 4))
    await first.killed()
    other = ReservationReaper(TokenBudgets(client, holder="w-2:other"))
    assert await other.reap() == 1
    assert await _month_used(first.budgets, key) == 0

    second = workers("second")
    second.start()

    async def charged() -> bool:
        return await _month_used(second.budgets, key) == 7

    await _until(charged)
    await _until(lambda: _true(names_now(tmp_path) == [second.budgets.holder]))
    assert await _month_used(second.budgets, key) == 7  # once
    await second.killed()


async def test_a_job_item_taken_over_by_its_replay_is_left_to_the_replay(
    tmp_path: Path, client: aioredis.Redis, workers: Callable[[str], Worker]
) -> None:
    # A job item recorded by the killed worker and tried again on another worker
    # under the same id: the replay holds the charge now, and reconciles it.
    key = f"key_{uuid.uuid4().hex[:8]}"
    first = workers("first")
    first.start()
    await first.record(key, "job-1:0", (3, 4))
    await first.killed()
    replay = TokenBudgets(client, holder="w-2:replay")
    await ReservationReaper(replay).beat()  # a live worker
    await replay.reserve(key, LIMITS, "job-1:0", 1000, time.time(), "a-replay", listed=True)
    assert await _month_used(replay, key) == 1000

    second = workers("second")
    second.start()
    await _until(lambda: _true(names_now(tmp_path) == [second.budgets.holder]))
    assert await _month_used(replay, key) == 1000  # the replay's, untouched
    await replay.reconcile(key, "job-1:0", 1000, 7, run="finished")
    assert await _month_used(replay, key) == 7
    await second.killed()


async def test_a_spool_that_names_no_holder_is_a_first_start(
    tmp_path: Path, client: aioredis.Redis, workers: Callable[[str], Worker]
) -> None:
    worker = workers("only")
    worker.start()
    assert (tmp_path / "w-1" / HOLDERS_FILE).exists()
    assert names_now(tmp_path) == [worker.budgets.holder]
    await worker.killed()
