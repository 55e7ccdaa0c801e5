"""An item taken over from a runner that stalled, not died: a stopped job stays
CANCELLING while that runner's call is in flight, so a result it metered is kept
(whether the takeover came after the cancel or before it). A real jobs service (its
runner A, whose maintenance stalls), a second real runner B on the same Redis, a real
worker of the deterministic test engine, a Redis of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.redis_service import text
from services.core.server import identity_files
from services.core.settings import SettingsError, load
from services.jobs import store as jobstore
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.runner import Runner
from services.jobs.service import JobsSettings
from services.jobs.workers import WorkerDirectory
from tests.integration.test_jobs_stopping import (
    Mesh,
    _final,
    _job,
    _key,
    _mesh,
    _metered,
    _ran,
    _results,
    _runner_idle,
    _submit,
    _until,
)
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb

Headers = tuple[tuple[str, str], ...]
# Runner A's maintenance (heartbeat, watch of stopped jobs) runs once at start, then
# not for an hour: A is alive and its calls run, but it looks dead to the others.
STALLED_S = 3600.0
TOKENS = 400  # ~2 s on the test engine: in flight through the cancel and the takeover


@contextlib.asynccontextmanager
async def _runner_b(mesh: Mesh) -> AsyncIterator[Runner]:
    """Replica B: a runner of its own on the service's Redis (calling the worker as the
    jobs service does) that takes over at once."""
    files = identity_files(mesh.jobs.name, mesh.jobs.settings)
    executor = ItemExecutor(WorkerDirectory(mesh.redis), files, Backoff(0.05, 0.2), 30)
    runner = Runner(mesh.jobs.store, executor, "replica-b", 1, 1, claim_idle_s=0)
    try:
        yield runner
    finally:
        await runner.stop()
        await executor.close()


async def _stopped_while_a_runs_it(mesh: Mesh, headers: Headers) -> str:
    """A one-item job that runner A started; cancelled while A's call is in flight."""
    job_id = await _submit(mesh, headers, 1, tokens=TOKENS)

    async def marked() -> bool:
        consumer = await mesh.redis.hget(jobstore.inflight_key(job_id), "0")
        return consumer == mesh.jobs.runner.consumer.encode()

    await _until(marked, 30, "runner A starting the item")
    cancelled = await mesh.stub.CancelJob(jobs_pb.CancelJobRequest(id=job_id), metadata=headers)
    assert cancelled.status == "CANCELLING"
    return job_id


async def _take_over(mesh: Mesh, runner: Runner, headers: Headers, job_id: str) -> str:
    """B takes A's entry over (A's heartbeat stalled) and refuses the stopping job's
    item; returns the job's status right after."""
    assert await runner.claim_stale() == 1

    async def b_done() -> bool:
        return not runner._tasks

    await _until(b_done, 10, "runner B handling the entry it took over")
    return str((await _job(mesh, headers, job_id)).status)


async def test_a_stalled_runners_result_is_kept_when_its_item_is_taken_over(
    tmp_path: Path, own_redis: str
) -> None:
    """B's takeover dropped A's in-flight mark and ended the job CANCELLED with A's call
    still running; A's result came after the final status and was thrown away though
    the worker metered it: billed for an item the CANCELLED job's results lacked."""
    async with _mesh(tmp_path, own_redis, watch_s=STALLED_S) as mesh, _runner_b(mesh) as b:
        _key_id, headers = await _key(mesh)
        job_id = await _stopped_while_a_runs_it(mesh, headers)
        after_takeover = await _take_over(mesh, b, headers, job_id)

        job = await _final(mesh, headers, job_id, timeout_s=30)  # A's call ends it
        ran = _ran(await _results(mesh, headers, job_id))
        await _runner_idle(mesh)  # A's call has ended, its usage written
        billed = await _metered(mesh, job_id)
        assert set(billed) == {f"{job_id}:{i}" for i in ran} == {f"{job_id}:0"}
        assert (job.status, job.counts.succeeded) == ("CANCELLED", 1)
        assert after_takeover == "CANCELLING"


async def test_a_runner_that_finds_its_item_taken_over_lets_its_mark_go(
    tmp_path: Path, own_redis: str
) -> None:
    """A wakes up (its heartbeat runs) and finds its entry taken over: it cuts its call
    and drops its own mark, so the stopping job ends now, not at the 10-minute sweep."""
    async with _mesh(tmp_path, own_redis, watch_s=STALLED_S) as mesh, _runner_b(mesh) as b:
        _key_id, headers = await _key(mesh)
        job_id = await _stopped_while_a_runs_it(mesh, headers)
        after_takeover = await _take_over(mesh, b, headers, job_id)
        assert after_takeover == "CANCELLING"  # A's call may still finish

        lost = await mesh.jobs.runner.heartbeat()
        assert len(lost) == 1
        job = await _final(mesh, headers, job_id, timeout_s=5)
        assert (job.status, job.counts.succeeded) == ("CANCELLED", 0)
        assert not _ran(await _results(mesh, headers, job_id))
        assert not await _metered(mesh, job_id)  # the cut call is billed nothing


async def test_a_stalled_runners_result_is_kept_when_the_runner_that_took_over_is_cut(
    tmp_path: Path, own_redis: str
) -> None:
    """B took the item over while the job ran and ran it too (A looked dead); its mark
    replaced A's. A cancel cut B's call, B let the item go, and the job ended CANCELLED
    with A's call still running: A's metered result was thrown away. Now the mark
    names both, and the job waits for A."""
    async with _mesh(tmp_path, own_redis, watch_s=STALLED_S) as mesh, _runner_b(mesh) as b:
        _key_id, headers = await _key(mesh)
        job_id = await _submit(mesh, headers, 1, tokens=TOKENS)
        inflight = jobstore.inflight_key(job_id)
        a = mesh.jobs.runner.consumer

        async def marked_by(name: str) -> bool:
            return name.encode() in (await mesh.redis.hget(inflight, "0") or b"").split()

        await _until(lambda: marked_by(a), 30, "runner A starting the item")
        assert await b.claim_stale() == 1
        await _until(lambda: marked_by("replica-b"), 10, "runner B starting it too")
        a_kept = await marked_by(a)  # A may still be running it: its name stays

        await mesh.stub.CancelJob(jobs_pb.CancelJobRequest(id=job_id), metadata=headers)
        await b.watch_ended()  # B's watch: its call is cut, the item let go

        async def b_done() -> bool:
            return not b._tasks

        await _until(b_done, 10, "runner B letting the item go")
        after_b = str((await _job(mesh, headers, job_id)).status)
        job = await _final(mesh, headers, job_id, timeout_s=30)  # A's call ends it
        ran = _ran(await _results(mesh, headers, job_id))
        await _runner_idle(mesh)
        billed = await _metered(mesh, job_id)
        assert set(billed) == {f"{job_id}:{i}" for i in ran} == {f"{job_id}:0"}
        assert max(billed.values()) == 1  # B's cut call is billed nothing
        assert (job.status, job.counts.succeeded) == ("CANCELLED", 1)
        assert a_kept and after_b == "CANCELLING"


async def test_a_runner_whose_item_failed_lets_its_mark_go(own_redis: str) -> None:
    """An item whose task failed (here: its stored bytes do not decode) left its mark:
    its entry waits for a takeover, which keeps another's mark, so a cancel waited
    for the 10-minute sweep. The runner drops its own mark when the item fails."""
    client = aioredis.from_url(own_redis)
    store = jobstore.JobStore(client, 3600)
    owner = jobstore.Owner("key_failing", "", {contract.KEY_ID_HEADER: "key_failing"})
    stream = jobstore.work_stream(owner.lane)
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    executor = ItemExecutor(WorkerDirectory(client), None, Backoff(0.05, 0.2), 30)
    runner = Runner(store, executor, "replica-a", 1, 1, claim_idle_s=30)
    try:
        deadline = jobstore.now_ms() + 600_000
        job_id, _ = await store.create(jobstore.NewJob(owner, [item], "", {}, "", deadline))
        await client.hset(jobstore.items_key(job_id), "0", b"\xff\xff\xff")
        reply: Any = await client.xreadgroup(jobstore.GROUP, "replica-a", {stream: ">"}, count=1)
        ((_, ((entry_id, fields),)),) = reply
        runner._start(stream, text(entry_id), fields)
        await _until(lambda: _no_tasks(runner), 10, "the item failing")
        assert not await client.hexists(jobstore.inflight_key(job_id), "0")
        assert await store.stop(job_id) == jobstore.StopOutcome.STOPPED
        record = await store.get(job_id)
        assert record is not None and record.status == "CANCELLED"  # nothing in flight
        pending = await client.xpending(stream, jobstore.GROUP)
        assert pending["pending"] == 1  # the entry is left for a takeover
    finally:
        await runner.stop()
        await executor.close()
        await client.aclose()


async def test_a_stopped_runners_mark_goes_so_a_cancel_ends_after_a_takeover(
    tmp_path: Path, own_redis: str
) -> None:
    """A replica shut down (SIGTERM: Runner.stop) mid-item kept its in-flight mark; a k8s
    pod comes back under another name and never resumes it. B took the entry over (its
    mark named both), the job was cancelled, B let its own name go, and the job stayed
    CANCELLING until the 10-minute sweep. The stopped runner's call was cut: its mark
    goes with it, the entry stays pending for the takeover."""
    async with _mesh(tmp_path, own_redis, watch_s=STALLED_S) as mesh, _runner_b(mesh) as b:
        _key_id, headers = await _key(mesh)
        job_id = await _submit(mesh, headers, 1, tokens=TOKENS)
        inflight = jobstore.inflight_key(job_id)
        a = mesh.jobs.runner.consumer.encode()

        async def marked_by(name: bytes) -> bool:
            return name in (await mesh.redis.hget(inflight, "0") or b"").split()

        await _until(lambda: marked_by(a), 30, "runner A starting the item")
        await mesh.jobs.runner.stop()  # A shuts down mid-item
        assert not await marked_by(a)
        record = await mesh.jobs.store.get(job_id)
        assert record is not None
        stream = jobstore.work_stream(record.owner.lane)
        pending: Any = await mesh.redis.xpending(stream, jobstore.GROUP)
        assert pending["pending"] == 1  # left for a takeover (or A's restart)

        assert await b.claim_stale() == 1
        await _until(lambda: marked_by(b"replica-b"), 10, "runner B starting the item")
        await mesh.stub.CancelJob(jobs_pb.CancelJobRequest(id=job_id), metadata=headers)
        await b.watch_ended()  # B's call is cut, its own name let go

        job = await _final(mesh, headers, job_id, timeout_s=10)  # not the sweep's 600 s
        assert (job.status, job.counts.succeeded) == ("CANCELLED", 0)
        assert not await _metered(mesh, job_id)  # both cut calls are billed nothing


async def test_a_runner_restarted_under_its_name_marks_its_item_again(own_redis: str) -> None:
    """A runner that stopped mid-item drops its mark; restarted under the same name it
    resumes its pending entry (recover_own) and marks the item in flight again."""
    client = aioredis.from_url(own_redis)
    store = jobstore.JobStore(client, 3600)
    owner = jobstore.Owner("key_restart", "", {contract.KEY_ID_HEADER: "key_restart"})
    stream = jobstore.work_stream(owner.lane)
    # No worker serves the model: the item waits in the executor, in flight for good.
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="absent", prompt="a"))
    executor = ItemExecutor(WorkerDirectory(client), None, Backoff(0.05, 0.2), 30)
    first = Runner(store, executor, "replica-a", 1, 1, claim_idle_s=30)
    again = Runner(store, executor, "replica-a", 1, 1, claim_idle_s=30)
    inflight = ""

    async def marked() -> bool:
        return await client.hget(inflight, "0") == b"replica-a"

    try:
        deadline = jobstore.now_ms() + 600_000
        job_id, _ = await store.create(jobstore.NewJob(owner, [item], "", {}, "", deadline))
        inflight = jobstore.inflight_key(job_id)
        reply: Any = await client.xreadgroup(jobstore.GROUP, "replica-a", {stream: ">"}, count=1)
        ((_, ((entry_id, fields),)),) = reply
        first._start(stream, text(entry_id), fields)
        await _until(marked, 10, "the first run starting the item")
        await first.stop()
        assert not await client.hexists(inflight, "0")

        assert await again.recover_own() == 1
        await _until(marked, 10, "the restarted runner marking the item again")
        pending: Any = await client.xpending_range(stream, jobstore.GROUP, "-", "+", 10)
        assert [text(p["consumer"]) for p in pending] == ["replica-a"]
    finally:
        await first.stop()
        await again.stop()
        await executor.close()
        await client.aclose()


async def _no_tasks(runner: Runner) -> bool:
    return not runner._tasks


def test_a_consumer_name_with_a_space_is_refused_at_start() -> None:
    """A mark lists its consumers space-separated: such a name could never be let go."""
    with pytest.raises(SettingsError, match="^TOKENMESH_JOBS_CONSUMER: "):
        load(JobsSettings, {"TOKENMESH_JOBS_CONSUMER": "jobs 1"})
