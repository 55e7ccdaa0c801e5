"""A replica whose item another replica took over stops it (real Redis, real runner)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from services.core import contract
from services.core.redis_service import text
from services.jobs import store as jobstore
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.runner import Runner
from services.jobs.store import JobStore, NewJob, Owner, now_ms
from services.jobs.workers import WorkerDirectory
from tests.conftest import private_db_url
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

# A database of its own: the session mesh's jobs service reads every lane of database 0.
PRIVATE_DB = 15


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


async def _forget(client: aioredis.Redis, owner: Owner, stream: str, jobs: list[str]) -> None:
    for job_id in jobs:
        await client.delete(jobstore.job_key(job_id), jobstore.items_key(job_id))
        await client.zrem(jobstore.ACTIVE_KEY, job_id)
    await client.delete(stream, jobstore.owner_key(owner.key_id))
    await client.srem(jobstore.LANES_KEY, owner.lane)
    await client.aclose()


async def test_a_runner_whose_item_was_taken_over_stops_it_and_leaves_it_to_the_new_owner(
    redis_url,
):
    """Runner A runs an item (it waits: no worker serves its model); replica B takes the
    entry over (A stalled, as far as B could tell). A's next heartbeat claimed it back
    (XCLAIM with no idle time takes it from whoever owns it), and both ran it."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    store = JobStore(client, 3600)
    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = Owner(key, "", {contract.KEY_ID_HEADER: key})
    stream = jobstore.work_stream(owner.lane)
    # A real executor, blocked the way a real item is: no worker has this model.
    executor = ItemExecutor(WorkerDirectory(client), None, Backoff(0.05, 0.2), 30)
    runner = Runner(store, executor, "replica-a", 1, 1, claim_idle_s=30)
    item = jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model=f"absent-{uuid.uuid4().hex[:6]}", prompt="hi")
    )
    cleanup: list[str] = []
    try:
        job_id, _ = await store.create(NewJob(owner, [item], "", {}, "", now_ms() + 600_000))
        cleanup.append(job_id)
        await store.ensure_group(stream)
        reply = await client.xreadgroup(jobstore.GROUP, "replica-a", {stream: ">"}, count=1)
        ((_, ((entry_id, fields),)),) = reply
        entry = text(entry_id)
        runner._start(stream, entry, fields)
        task = runner._tasks[(stream, entry)]
        await _until(lambda: executor.waiting == 1)  # A's item is running (waiting)

        claimed = await client.xautoclaim(
            stream, jobstore.GROUP, "replica-b", min_idle_time=0, start_id="0-0", justid=True
        )
        assert [text(i) for i in claimed] == [entry]

        await runner.heartbeat()

        pending = await client.xpending_range(stream, jobstore.GROUP, "-", "+", 10)
        assert [(text(p["message_id"]), text(p["consumer"])) for p in pending] == [
            (entry, "replica-b")
        ]
        await _until(task.done)
        assert task.cancelled()  # stopped, not acknowledged: B's to finish
        assert (await store.get(job_id)) is not None
    finally:
        await runner.stop()
        await executor.close()
        await _forget(client, owner, stream, cleanup)


async def test_a_heartbeat_keeps_what_the_runner_still_owns(redis_url):
    """The heartbeat still resets the idle time of entries this runner owns."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    store = JobStore(client, 3600)
    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = Owner(key, "", {contract.KEY_ID_HEADER: key})
    stream = jobstore.work_stream(owner.lane)
    executor = ItemExecutor(WorkerDirectory(client), None, Backoff(0.05, 0.2), 30)
    runner = Runner(store, executor, "replica-a", 1, 1, claim_idle_s=30)
    item = jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model=f"absent-{uuid.uuid4().hex[:6]}", prompt="hi")
    )
    cleanup: list[str] = []
    try:
        job_id, _ = await store.create(NewJob(owner, [item], "", {}, "", now_ms() + 600_000))
        cleanup.append(job_id)
        await store.ensure_group(stream)
        reply = await client.xreadgroup(jobstore.GROUP, "replica-a", {stream: ">"}, count=1)
        ((_, ((entry_id, fields),)),) = reply
        entry = text(entry_id)
        runner._start(stream, entry, fields)
        task = runner._tasks[(stream, entry)]
        await _until(lambda: executor.waiting == 1)
        await asyncio.sleep(0.2)  # idle time to reset (a duration under test, not a wait)
        assert await runner.heartbeat() == []
        pending = await client.xpending_range(stream, jobstore.GROUP, "-", "+", 10)
        assert [text(p["consumer"]) for p in pending] == ["replica-a"]
        assert pending[0]["time_since_delivered"] < 200
        assert pending[0]["times_delivered"] == 1  # JUSTID: no new delivery counted
        assert not task.done()
    finally:
        await runner.stop()
        await executor.close()
        await _forget(client, owner, stream, cleanup)
