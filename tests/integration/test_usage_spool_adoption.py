"""A usage spool whose worker never comes back is shipped and settled by another.

compose names a worker by its container, so `docker compose down` and `up` (an
image update, a scale-in) started workers under new ids: the old containers'
unshipped usage events were lost, and the requests they recorded but did not
reconcile stayed under in their keys' months. Now a live worker adopts a sibling
spool no process holds that has not changed for a while: it settles its budget
holders, ships its events, waits for the meter to apply them and removes it.
Real Redis, real spools, the real meter and budget scripts.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.inference import orphan_spools
from services.inference.budget import TokenBudgets
from services.inference.orphan_spools import SpoolAdopter
from services.inference.usage_log import SpoolBusy, UsageLog
from services.usage.meter import PREFIX, Meter, Retention
from tests.integration.test_budget_reaper import _month_used
from tests.integration.test_budget_successor import STREAM, Worker, _event

AFTER_S = 60.0


@pytest.fixture
async def client(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(own_redis)
    yield redis
    await redis.aclose()


def _age(directory: Path, seconds: float) -> None:
    """Makes every file of `directory` look unchanged for `seconds`."""
    then = time.time() - seconds
    for path in directory.iterdir():
        os.utime(path, (then, then))


def _adopter(client: aioredis.Redis, root: Path) -> SpoolAdopter:
    def open_spool(directory: Path) -> UsageLog:
        return UsageLog(directory, client, STREAM, 1 << 20, lock_wait_s=0, applied_grace_s=0.1)

    budgets = TokenBudgets(client, holder=f"w-alive:{uuid.uuid4().hex[:6]}")
    return SpoolAdopter(root / "w-alive", open_spool, budgets, AFTER_S)


@pytest.fixture
async def metering(client: aioredis.Redis) -> AsyncIterator[Callable[[], None]]:
    """Starts the real meter on the stream when called; stops it at the end."""
    tasks: list[asyncio.Task[None]] = []

    async def meter_forever() -> None:
        meter = Meter(client, STREAM, "meter", "c1", Retention())
        await meter.ensure_group()
        while True:
            await meter.run_once(block_ms=20)

    yield lambda: tasks.append(asyncio.create_task(meter_forever()))
    for task in tasks:
        task.cancel()


async def test_a_gone_workers_spool_is_shipped_settled_and_removed(
    tmp_path: Path,
    client: aioredis.Redis,
    metering: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    gone = Worker(client, tmp_path / "w-gone", "gone")
    gone.start()
    await gone.record(key, "recorded", (3, 4))  # 7 tokens: spooled, never shipped
    await gone.killed()  # its container went with `compose down`
    _age(gone.log.directory, AFTER_S + 1)
    adopter = _adopter(client, tmp_path)

    # The meter away: the adoption runs out of time, the spool stays for a later
    # round (its budget is settled already: that needs Redis only).
    monkeypatch.setattr(orphan_spools, "ADOPT_TIMEOUT_S", 0.5)
    assert await adopter.adopt_stale() == 0
    assert (tmp_path / "w-gone" / "events.id").is_file()
    assert await _month_used(adopter.budgets, key) == 7
    assert not await client.exists(TokenBudgets.open_key(gone.budgets.holder))
    assert not list(orphan_spools.stale_spools(tmp_path, adopter.own, AFTER_S, time.time()))

    metering()
    _age(tmp_path / "w-gone", AFTER_S + 1)
    monkeypatch.setattr(orphan_spools, "ADOPT_TIMEOUT_S", 10.0)
    assert await adopter.adopt_stale() == 1
    assert not (tmp_path / "w-gone").exists()
    assert await client.exists(f"{PREFIX}seen:recorded")  # metered
    assert await _month_used(adopter.budgets, key) == 7  # settled once


async def test_a_held_or_recent_spool_is_left_alone(
    tmp_path: Path, client: aioredis.Redis, metering: Callable[[], None]
) -> None:
    metering()
    held = UsageLog(tmp_path / "w-live", client, STREAM, 1 << 20)  # its worker runs
    _age(held.directory, AFTER_S + 1)
    recent = UsageLog(tmp_path / "w-restarting", client, STREAM, 1 << 20)
    await recent.stop(timeout_s=0)  # unheld, but changed a moment ago
    (tmp_path / "not-a-spool").mkdir()
    adopter = _adopter(client, tmp_path)
    try:
        assert await adopter.adopt_stale() == 0
        assert (tmp_path / "w-live" / "events.id").is_file()
        assert (tmp_path / "w-restarting" / "events.id").is_file()
        assert (tmp_path / "not-a-spool").is_dir()
    finally:
        await held.stop(timeout_s=0)


async def test_a_worker_of_that_id_starting_meanwhile_gets_a_new_spool(
    tmp_path: Path, client: aioredis.Redis
) -> None:
    directory = tmp_path / "w-back"
    adopted = UsageLog(directory, client, STREAM, 1 << 20, lock_wait_s=0)
    starting = asyncio.create_task(
        asyncio.to_thread(UsageLog, directory, client, STREAM, 1 << 20, lock_wait_s=10)
    )
    await asyncio.sleep(0.2)  # it waits for the lock (SPOOL_LOCK_WAIT_S in production)
    assert not starting.done()
    await adopted.stop(timeout_s=0, remove=True)  # emptied: removed under the lock
    back = await asyncio.wait_for(starting, 10)
    try:
        assert (directory / "events.id").is_file()  # a new spool, where its worker looks
        assert back.spool_id != adopted.spool_id
        # It holds the directory that is there, not the removed one: one writer.
        with pytest.raises(SpoolBusy):
            UsageLog(directory, client, STREAM, 1 << 20, lock_wait_s=0)
        back.append(_event("key_x", "after-adoption", 1, 1))
        assert back.backlog_bytes() > 0
    finally:
        await back.stop(timeout_s=0)


async def test_a_spool_that_cannot_be_opened_is_skipped_and_the_others_adopted(
    tmp_path: Path, client: aioredis.Redis, metering: Callable[[], None]
) -> None:
    # The adopter is one of the worker's supervised tasks: an error escaping it
    # restarted it, and failing in a row turned the worker NOT_SERVING, over a
    # directory another worker left (one this worker may not read, a corrupt one).
    metering()
    for name in ("w-unreadable", "w-gone"):
        left = UsageLog(tmp_path / name, client, STREAM, 1 << 20)
        left.append(_event("key_y", f"left-in-{name}", 1, 1))
        await left.stop(timeout_s=0)
        _age(left.directory, AFTER_S + 1)
    adopter = _adopter(client, tmp_path)
    opens = adopter.open_spool

    def open_spool(directory: Path) -> UsageLog:
        if directory.name == "w-unreadable":
            raise PermissionError(13, "Permission denied", str(directory))
        return opens(directory)

    adopter.open_spool = open_spool
    assert await adopter.adopt_stale() == 1  # old code: the PermissionError escaped
    assert not (tmp_path / "w-gone").exists()
    assert (tmp_path / "w-unreadable" / "events.id").is_file()
