"""The jobs runner against a real worker and a real Redis (no jobs service around it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.core import contract
from services.core.pki import IdentityFiles
from services.core.redis_service import text
from services.core.server import serving
from services.core.tasks import cancel_and_wait
from services.inference.pipeline.policy import PatternRule, Policy
from services.inference.service import InferenceService
from services.jobs import store as jobstore
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.runner import HELD_PER_SLOT, Runner
from services.jobs.store import JobStore, NewJob, Owner, now_ms
from services.jobs.workers import WorkerDirectory
from services.router.policies import TENANT, PolicyCatalog
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

ITEMS = 8
READ_BLOCK_MS = 5000
# A Redis database of its own: in database 0 the session mesh's jobs service
# reads every lane too (it would take this job's items and call the test's
# worker, whose CA it does not trust), and its router would route to the worker.
PRIVATE_DB = 10


async def _wait_for_status(store: JobStore, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = await store.get(job_id)
        if record is not None and record.status in ("SUCCEEDED", "FAILED"):
            return record.status
        await asyncio.sleep(0.05)
    return "still running"


@contextlib.asynccontextmanager
async def _runner_beside_a_worker(
    tmp_path: Path, redis_url: str, concurrency: int, blocked_tenant: str = ""
) -> AsyncIterator[tuple[JobStore, Runner]]:
    """A runner (`concurrency` slots, one per lane) and a real worker of
    deterministic-test version 1, registered where the runner looks for workers
    (`blocked_tenant`: a content policy blocks that tenant's prompts naming "forbidden")."""
    redis_url = private_db_url(redis_url, PRIVATE_DB)
    client = aioredis.from_url(redis_url)
    assert client.connection_pool.connection_kwargs["db"] == PRIVATE_DB
    settings = inference_settings(tmp_path, redis_url, test_models=("deterministic-test:1",))
    service = InferenceService(settings)
    store = JobStore(client, 3600)
    executor = ItemExecutor(
        WorkerDirectory(client),
        IdentityFiles.of(mtls.pki_dir(), contract.JOBS),
        Backoff(),
        call_timeout_s=30,
    )
    runner = Runner(store, executor, f"t-{uuid.uuid4().hex[:6]}", concurrency, 1, claim_idle_s=30)
    worker_id = f"runner-test-{uuid.uuid4().hex[:6]}"
    try:
        async with serving(service, settings) as server:
            if blocked_tenant:
                catalog = PolicyCatalog(client)
                rules = (PatternRule("forbidden"),)
                policy = await catalog.create(Policy("no-forbidden", 0, block_keywords=rules), 0)
                await catalog.attach(TENANT, blocked_tenant, policy.name)
                await service.policies.refresh()
            entry = WorkerEntry(
                worker_id,
                "127.0.0.1",
                server.port,
                (("deterministic-test", "1"),),
                lease_expires_at=time.time() + 600,
            )
            await client.hset(WORKERS_KEY, worker_id, entry.to_json())
            yield store, runner
    finally:
        await runner.stop()
        await executor.close()
        await client.hdel(WORKERS_KEY, worker_id)
        await client.aclose()


async def _job(
    store: JobStore, items: list[jobs_pb2.JobItem], key: str = "", tenant: str = ""
) -> str:
    """Creates a job of `items` for `key`, else a key of its own (a lane of its own)."""
    key = key or f"key_{uuid.uuid4().hex[:8]}"
    identity = {contract.KEY_ID_HEADER: key, contract.SCOPES_HEADER: "inference:generate"}
    if tenant:
        identity[contract.TENANT_HEADER] = tenant
    job_id, _ = await store.create(
        NewJob(Owner(key, tenant, identity), items, "", {}, "", now_ms() + 600_000)
    )
    return job_id


def _finished(result: str) -> float:
    """tokenmesh_job_items_finished_total{result} in this process (every runner's)."""
    value = REGISTRY.get_sample_value("tokenmesh_job_items_finished_total", {"result": result})
    return value or 0.0


def _complete(model: str, prompt: str) -> jobs_pb2.JobItem:
    return jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model=model, prompt=prompt, max_output_tokens=1)
    )


async def test_a_lane_with_one_slot_starts_its_next_item_when_one_ends(tmp_path, redis_url):
    """A full lane waits for a slot to free, not for a fixed pause: with one slot and a
    5 s read block, the old runner took ~5 s per item (40 s for 8); this one finishes
    them back to back."""
    succeeded = _finished("succeeded")
    async with _runner_beside_a_worker(tmp_path, redis_url, 1) as (store, runner):
        items = [_complete("deterministic-test", f"item {i}") for i in range(ITEMS)]
        job_id = await _job(store, items)
        task = asyncio.create_task(runner.run_forever(block_ms=READ_BLOCK_MS))
        try:
            status = await _wait_for_status(store, job_id, timeout_s=READ_BLOCK_MS / 1000 * 3)
        finally:
            # As the service stops it: a cancel that lands while redis-py's read
            # timeout fires comes back as a Redis TimeoutError (this test failed
            # so once in CI), so cancel until the task has ended.
            await cancel_and_wait(task, 10)
        assert status == "SUCCEEDED"
    # The jobs service's own signals (it exported none about its work).
    assert _finished("succeeded") - succeeded == ITEMS
    assert REGISTRY.get_sample_value("tokenmesh_job_items_running") == 0


async def test_an_items_error_keeps_its_error_info_metadata(tmp_path, redis_url):
    # A content policy's block names its policy and rule in ErrorInfo's metadata: a
    # job item's error (and a handed-over Complete's, rebuilt from it) lost them.
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    failed = _finished("failed")
    async with _runner_beside_a_worker(tmp_path, redis_url, 1, blocked_tenant=tenant) as (
        store,
        runner,
    ):
        job_id = await _job(
            store, [_complete("deterministic-test", "say forbidden")], tenant=tenant
        )
        task = asyncio.create_task(runner.run_forever(block_ms=READ_BLOCK_MS))
        try:
            assert await _wait_for_status(store, job_id, timeout_s=30) == "FAILED"
        finally:
            await cancel_and_wait(task, 10)
        (raw,) = await store.results(job_id, [0])
        assert raw is not None
        error = jobs_pb2.JobResult.FromString(raw).error
        assert error.reason == "CONTENT_POLICY"
        assert dict(error.metadata) == {"policy": "no-forbidden@1", "rule": "block_keyword:0"}
    assert _finished("failed") - failed == 1


async def test_a_dead_replicas_items_behind_many_live_ones_are_taken_over(redis_url, monkeypatch):
    """XAUTOCLAIM scans 10 x count pending entries a call: the sweep follows its cursor
    (it started at 0-0 every time, so 20 live entries hid a dead replica's)."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    store = JobStore(client, 3600)
    lane = f"lane-{uuid.uuid4().hex[:6]}"
    stream = jobstore.work_stream(lane)
    runner = Runner(store, None, "taker", 1, 1, claim_idle_s=0.2)  # no item runs: no executor
    started: list[str] = []
    monkeypatch.setattr(
        runner, "_start", lambda _stream, entry_id, _fields: started.append(entry_id)
    )
    try:
        await client.sadd(jobstore.LANES_KEY, lane)
        await store.ensure_group(stream)
        ids = [await client.xadd(stream, {"job": "j", "index": str(n)}) for n in range(21)]
        await client.xreadgroup(jobstore.GROUP, "live", {stream: ">"}, count=20)
        await client.xreadgroup(jobstore.GROUP, "dead", {stream: ">"}, count=1)
        await asyncio.sleep(0.3)  # both idle past claim_idle_s ...
        live = [i.decode() for i in ids[:20]]
        await client.xclaim(stream, jobstore.GROUP, "live", 0, live)  # ... the live ones not
        assert await runner.claim_stale() == 1
        assert started == [ids[20].decode()]
    finally:
        await client.delete(stream)
        await client.srem(jobstore.LANES_KEY, lane)
        await client.aclose()


async def test_items_that_wait_for_a_worker_do_not_hold_other_tenants_back(tmp_path, redis_url):
    """Two slots, two lanes whose items wait (their model has no worker): a third
    lane's item runs at once. Held across the waits, the two waiting items took both
    slots until their jobs' deadlines."""
    status = await _a_third_lane_beside_two_waiting(
        tmp_path,
        redis_url,
        2,
        lambda runner: len(runner._tasks) >= 2,  # both started
    )
    assert status == "SUCCEEDED"


async def _a_third_lane_beside_two_waiting(
    tmp_path: Path, redis_url: str, slots: int, waiting_ready: Callable[[Runner], bool]
) -> str:
    """Two lanes' items wait (their model has no worker); once `waiting_ready`, a third
    lane's item is queued: returns its job's status (or "still running")."""
    async with _runner_beside_a_worker(tmp_path, redis_url, slots) as (store, runner):
        waiting = [await _job(store, [_complete(m, "a")]) for m in ("nobody-has-it", "nor-it")]
        task = asyncio.create_task(runner.run_forever(block_ms=200))
        try:
            deadline = time.monotonic() + 10
            while not waiting_ready(runner) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            served = await _job(store, [_complete("deterministic-test", "a")])
            return await _wait_for_status(store, served, timeout_s=10)
        finally:
            await cancel_and_wait(task, 10)
            for job_id in waiting:
                await store.end(job_id, "CANCELLED")


async def test_an_item_longer_than_the_call_timeout_gets_longer_calls(tmp_path, redis_url):
    """Cut by the call timeout, the item was tried again with the same timeout until its
    job's deadline (a day by default), each run cut and wasted. Each try now gets
    twice as long as the one before: the item finishes."""
    async with _runner_beside_a_worker(tmp_path, redis_url, 1) as (store, runner):
        runner.executor.call_timeout_s = 0.2  # the item needs ~0.75 s (150 steps of 5 ms)
        long_item = jobs_pb2.JobItem(
            complete=v2.CompleteRequest(
                model="deterministic-test", prompt="a", max_output_tokens=150
            )
        )
        job_id = await _job(store, [long_item])
        task = asyncio.create_task(runner.run_forever(block_ms=200))
        try:
            status = await _wait_for_status(store, job_id, timeout_s=10)
        finally:
            await cancel_and_wait(task, 10)
        assert status == "SUCCEEDED"
        (body,) = await store.results(job_id, [0])
        assert body is not None
        result = jobs_pb2.JobResult.FromString(body)
        assert result.complete.usage.completion_tokens == 150


async def test_a_lane_left_empty_is_retired_and_comes_back_with_its_next_job(tmp_path, redis_url):
    """Runners poll every lane in `lanes`, and the set only grew: every tenant or key
    that ever ran a job was read (and claimed, and trimmed) at every poll, for good."""
    async with _runner_beside_a_worker(tmp_path, redis_url, 1) as (store, runner):
        task = asyncio.create_task(runner.run_forever(block_ms=200))
        try:
            first = await _job(store, [_complete("deterministic-test", "a")])
            assert await _wait_for_status(store, first, timeout_s=10) == "SUCCEEDED"
            record = await store.get(first)
            assert record is not None
            lane = record.get("lane")
            await runner.trim()
            assert lane not in {text(m) for m in await store.redis.smembers(jobstore.LANES_KEY)}
            # Its stream stays a while (a runner may still be blocked reading it).
            assert 0 < await store.redis.ttl(jobstore.work_stream(lane)) <= 86400
            # The lane's owner again: its stream, group and lane come back with the job.
            owner = jobstore.Owner(record.owner.key_id, "", record.owner.identity)
            again, _ = await store.create(
                NewJob(owner, [_complete("deterministic-test", "b")], "", {}, "", now_ms() + 60_000)
            )
            assert await _wait_for_status(store, again, timeout_s=10) == "SUCCEEDED"
            assert await store.redis.ttl(jobstore.work_stream(lane)) == -1  # kept again
        finally:
            await cancel_and_wait(task, 10)


async def test_items_that_wait_do_not_stop_the_reading_either(tmp_path, redis_url):
    """One slot reads up to 2 items ahead; two lanes' items that wait (their model has
    no worker) were counted against that and stopped the reading: a third lane's item
    was never read until their jobs' deadlines."""
    status = await _a_third_lane_beside_two_waiting(
        tmp_path,
        redis_url,
        1,
        lambda runner: runner.executor.waiting >= 2,  # backing off
    )
    assert status == "SUCCEEDED"


async def test_one_read_of_many_lanes_holds_no_more_than_the_bound(tmp_path, redis_url):
    """XREADGROUP's COUNT is per stream: one read of 40 lanes took an entry of each,
    past HELD_PER_SLOT (32 for one slot), every one a task holding its item."""
    async with _runner_beside_a_worker(tmp_path, redis_url, 1) as (store, runner):
        jobs = [await _job(store, [_complete("nobody-has-it", "a")]) for _ in range(40)]
        try:
            assert await runner.read_once(block_ms=100)
            assert 1 <= len(runner._tasks) <= HELD_PER_SLOT
        finally:
            for job_id in jobs:
                await store.end(job_id, "CANCELLED")


def test_the_window_of_lanes_rotates_through_every_lane_by_name():
    runner = object.__new__(Runner)
    runner._last_lane = ""
    lanes = ["a", "b", "c", "d", "e"]
    seen = [runner._window(lanes, 2) for _ in range(3)]
    assert seen == [(["a", "b"], False), (["c", "d"], False), (["e", "a"], True)]
    assert runner._window(lanes, 5) == (lanes, True)
    # A lane that fills between reads does not shift the others out of their turn.
    runner._last_lane = "b"
    assert runner._window(["b", "c", "d", "e"], 2) == (["c", "d"], False)
    assert runner._window(["a", "c", "d", "e"], 2) == (["e", "a"], True)


async def test_only_a_round_of_lane_windows_that_found_nothing_waits(
    tmp_path, redis_url, monkeypatch
):
    """A read covers a window of the lanes. A round of windows that found nothing waits
    for entries in its last window; one that found work does not (waiting on idle
    lanes held the other lanes' items back a block)."""
    monkeypatch.setattr("services.jobs.runner.HELD_PER_SLOT", 3)  # windows of 3 lanes
    async with _runner_beside_a_worker(tmp_path, redis_url, 1) as (store, runner):
        await runner.redis.delete(jobstore.LANES_KEY)  # only this test's lanes
        keys = [f"key_{uuid.uuid4().hex[:8]}" for _ in range(5)]
        jobs = [await _job(store, [_complete("nobody-has-it", "a")], key) for key in keys]
        key_of = {jobstore.work_stream(Owner(k, "", {}).lane): k for k in keys}
        lanes = sorted(await store.lanes())
        assert lanes == sorted(key_of)
        for lane in lanes:  # every entry taken by another replica: nothing new to read
            await store.ensure_group(lane)
            await runner.redis.xreadgroup(jobstore.GROUP, "other", {lane: ">"}, count=1000)
        blocks: list[int | None] = []
        ends: list[bool] = []
        read, window = runner.redis.xreadgroup, runner._window

        async def recorded_read(*args, **options):
            blocks.append(options.get("block"))
            return await read(*args, **options)

        def recorded_window(lanes: list[str], size: int) -> tuple[list[str], bool]:
            found: tuple[list[str], bool] = window(lanes, size)
            ends.append(found[1])
            return found

        runner.redis.xreadgroup, runner._window = recorded_read, recorded_window
        try:

            async def a_round() -> list[int | None]:
                blocks.clear()
                ends.clear()
                while not ends or not ends[-1]:
                    assert await runner.read_once(block_ms=50)
                    assert len(ends) < 10, "no window ended the round"
                return list(blocks)

            idle = await a_round()
            assert len(idle) >= 2 and idle[:-1] == [None] * (len(idle) - 1) and idle[-1] == 50
            # An entry in the lane the next window starts with: that round finds it.
            following = [lane for lane in lanes if lane > runner._last_lane] or lanes
            jobs.append(await _job(store, [_complete("nobody-has-it", "b")], key_of[following[0]]))
            busy = await a_round()
            assert busy == [None] * len(busy)
            assert len(runner._tasks) == 1
        finally:
            for job_id in jobs:
                await store.end(job_id, "CANCELLED")
            # Its lanes hold entries pending for "other": no later test may claim them.
            await runner.redis.srem(jobstore.LANES_KEY, *(Owner(k, "", {}).lane for k in keys))
            await runner.redis.delete(*lanes)
