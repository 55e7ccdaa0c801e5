"""A finished item's result is kept through a Redis fault or a stop that lands while it is
being stored: the worker answered and metered the call, so the item is neither run
again nor billed without a result. A real jobs service, a real worker of the
deterministic test engine, a Redis of its own.

The faults are real Redis ones, injected right after the worker's answer (a wrapper of
the executor's `run` that returns the real outcome): `CLIENT PAUSE WRITE` holds the
result's script in Redis, then either `CLIENT KILL` resets the jobs service's
connection under it (a Redis restart or failover), or the pause outlasts the client's
2 s socket timeout (a stall); or a cancel or a stop lands meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.inference.service import InferenceService
from services.jobs import store as jobstore
from services.jobs.execution import Outcome
from services.jobs.service import JobsService, JobsSettings
from tests import mtls
from tests.integration.conftest import inference_settings
from tests.integration.test_jobs_stopping import (
    Mesh,
    _final,
    _job,
    _key,
    _ran,
    _results,
    _submit,
    _until,
    serving_jobs_and_worker,
)
from tokenmesh.inference.v1 import inference_pb2 as v1
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb

# The jobs service's Redis connections carry this name (CLIENT LIST tells them apart).
JOBS_CLIENT = "jobs-under-test"
CLAIM_IDLE_S = 30.0  # the default: a dropped result waited this long to run again
# Well before a takeover could run the item again (the old runner's only way on).
PROMPTLY_S = CLAIM_IDLE_S / 3
TOKENS = 20  # ~0.1 s on the test engine


@contextlib.asynccontextmanager
async def _mesh(tmp_path: Path, redis_url: str) -> AsyncIterator[Mesh]:
    """Runs the jobs service (its connections named JOBS_CLIENT) beside a worker."""
    client = aioredis.from_url(redis_url)
    worker_settings = inference_settings(tmp_path, redis_url, test_models=("deterministic-test:1",))
    worker = InferenceService(worker_settings)
    settings = JobsSettings(
        redis_url=f"{redis_url}?client_name={JOBS_CLIENT}",
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"kept-{uuid.uuid4().hex[:6]}",
        claim_idle_s=CLAIM_IDLE_S,
        # No webhook claims: the result's script is the service's only one in a pause.
        webhook_poll_s=3600.0,
    )
    jobs = JobsService(settings)
    try:
        async with serving_jobs_and_worker(
            jobs, settings, worker, worker_settings, client, "kept"
        ) as mesh:
            yield mesh
    finally:
        with contextlib.suppress(Exception):
            await client.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()


Fault = Callable[[Mesh], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def _after_the_answer(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, before: Fault, during: Fault
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Runs `before` once the worker has answered the first item (its outcome in hand,
    not yet stored), then `during` in the background; yields the list that holds that
    background task once started (awaited, so its failures show, on leaving)."""
    executor = mesh.jobs.executor
    real_run = executor.run
    started: list[asyncio.Task[None]] = []

    async def run(*args: Any, **kwargs: Any) -> Outcome:
        outcome = await real_run(*args, **kwargs)
        if not started:
            await before(mesh)
            started.append(asyncio.create_task(during(mesh)))
        return outcome

    monkeypatch.setattr(executor, "run", run)
    try:
        yield started
    finally:
        for task in started:
            await asyncio.wait_for(task, 30)


async def _pause_writes(mesh: Mesh, ms: int = 30_000) -> None:
    """Holds every write (the result's script among them) in Redis for `ms`."""
    await mesh.redis.execute_command("CLIENT", "PAUSE", ms, "WRITE")


async def _unpause(mesh: Mesh) -> None:
    await mesh.redis.execute_command("CLIENT", "UNPAUSE")


async def _held_scripts(mesh: Mesh) -> list[str]:
    """The ids of the jobs service's connections whose script the pause holds."""
    clients: Any = await mesh.redis.client_list()
    return [
        str(c["id"])
        for c in clients
        if c.get("name") == JOBS_CLIENT and c.get("cmd") == "evalsha" and "b" in c["flags"]
    ]


async def _reset_under_the_script(mesh: Mesh) -> None:
    """Kills the jobs service's connection while its result's script waits in Redis
    (dropped unrun, as by a restart), then lets writes go again."""
    held = await _until(lambda: _held_scripts(mesh), 10, "the result's script held")
    for client_id in held:
        await mesh.redis.client_kill_filter(_id=client_id)
    await _unpause(mesh)


async def _nothing(_mesh: Mesh) -> None:
    """The stall ends by itself (the pause's own time)."""


async def _stop_replica(mesh: Mesh) -> float:
    """Stops the replica's loops, then its runner, as `JobsService.stop` does (its
    clients close next: not here); returns how long the runner's stop took."""
    for task in mesh.jobs._tasks:
        await task.stop(timeout_s=5)
    began = time.monotonic()
    await mesh.jobs.runner.stop()
    return time.monotonic() - began


async def _events(mesh: Mesh, job_id: str) -> tuple[Counter[str], int]:
    """Every usage event the worker wrote per request id of the job (one per run of
    the item, billed or set apart), and the billed tokens (first event per id)."""
    log = mesh.worker.usage_log

    async def shipped() -> bool:
        return log.backlog_bytes() == 0 and log.shipped_total >= log.appended_total

    await _until(shipped, 30, "the worker's usage events reaching the stream")
    runs: Counter[str] = Counter()
    billed = 0
    entries: Any = await mesh.redis.xrange(mesh.usage_stream)
    for _, fields in entries:
        event = v1.UsageEvent.FromString(fields[b"event"])
        if event.request_id.startswith(f"{job_id}:"):
            if not runs[event.request_id]:
                billed += event.usage.total_tokens
            runs[event.request_id] += 1
    return runs, billed


async def _one_run(mesh: Mesh, job_id: str, job: jobs_pb2.Job) -> None:
    """The item ran once, and the job's usage is what the worker metered."""
    runs, billed = await _events(mesh, job_id)
    assert runs == {f"{job_id}:0": 1}
    assert job.usage.total_tokens == billed > 0


@pytest.mark.parametrize(
    ("fault", "pause_ms", "during"),
    [
        ("connection reset", 30_000, _reset_under_the_script),
        ("stall past the socket timeout", 2_500, _nothing),
    ],
)
async def test_a_result_that_meets_a_redis_fault_is_stored_not_run_again(
    tmp_path: Path,
    own_redis: str,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    pause_ms: int,
    during: Fault,
) -> None:
    """One Redis error while storing the result threw the worker's answer away: the
    entry waited for a takeover (CLAIM_IDLE_S) and the item ran again from the start
    (5 of 16 items twice when Redis restarted mid-job). The store is tried again."""

    async def pause(mesh: Mesh) -> None:
        await _pause_writes(mesh, pause_ms)

    async with _mesh(tmp_path, own_redis) as mesh:
        _key_id, headers = await _key(mesh)
        async with _after_the_answer(mesh, monkeypatch, pause, during) as faults:
            job_id = await _submit(mesh, headers, 1, tokens=TOKENS)
            job = await _final(mesh, headers, job_id, timeout_s=PROMPTLY_S)
        assert faults, f"no {fault}"
        assert (job.status, job.counts.succeeded) == ("SUCCEEDED", 1)
        await _one_run(mesh, job_id, job)


async def test_a_result_stored_while_its_job_is_cancelled_is_kept(
    tmp_path: Path, own_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel whose cut landed while the result was being stored let the item go
    without it: the job ended CANCELLED listing the item as never run, while the
    worker had billed it. A stopping job keeps what finishes, that result too."""
    async with _mesh(tmp_path, own_redis) as mesh:
        _key_id, headers = await _key(mesh)
        job_ids: list[str] = []

        async def cancel_and_hold(mesh: Mesh) -> None:
            await mesh.stub.CancelJob(jobs_pb.CancelJobRequest(id=job_ids[0]), metadata=headers)
            await _pause_writes(mesh)

        async def release_once_cut(mesh: Mesh) -> None:
            async def cut() -> bool:  # the runner's watch has cancelled the item's task
                return bool(mesh.jobs.runner._ending)

            try:
                await _until(cut, 10, "the runner cutting the stopped job's item")
            finally:
                await _unpause(mesh)

        async with _after_the_answer(mesh, monkeypatch, cancel_and_hold, release_once_cut):
            job_ids.append(await _submit(mesh, headers, 1, tokens=TOKENS))
            job = await _final(mesh, headers, job_ids[0], timeout_s=PROMPTLY_S)
        assert (job.status, job.counts.succeeded) == ("CANCELLED", 1)
        assert _ran(await _results(mesh, headers, job_ids[0])) == {0}
        await _one_run(mesh, job_ids[0], job)


async def test_a_result_stored_while_the_replica_stops_is_kept(
    tmp_path: Path, own_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica's stop (SIGTERM: a rollout) cut the item while its result was being
    stored: the entry waited for a takeover and the item ran again. The stop waits
    for a result being stored (here Redis holds it 1 s), up to runner.STOP_SAVE_S."""
    stopped: list[float] = []

    async def hold(mesh: Mesh) -> None:
        await _pause_writes(mesh, 1_000)

    async def stop(mesh: Mesh) -> None:
        stopped.append(await _stop_replica(mesh))

    async with _mesh(tmp_path, own_redis) as mesh:
        _key_id, headers = await _key(mesh)
        async with _after_the_answer(mesh, monkeypatch, hold, stop):
            job_id = await _submit(mesh, headers, 1, tokens=TOKENS)
            job = await _final(mesh, headers, job_id, timeout_s=PROMPTLY_S)
        assert (job.status, job.counts.succeeded) == ("SUCCEEDED", 1)
        await _one_run(mesh, job_id, job)
        assert stopped  # the stop ran while the result was held


async def test_a_stop_waits_for_a_result_held_in_redis_only_so_long(
    tmp_path: Path, own_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis holds the result past the stop's bound: the stop ends anyway (nothing of
    the item outlives it, the Redis client closes next), the result's script is cut
    unrun, and the item's entry stays pending for the replica's restart."""
    stopped: list[float] = []

    async def stop_then_release(mesh: Mesh) -> None:
        try:
            stopped.append(await _stop_replica(mesh))
        finally:
            await _unpause(mesh)

    async with _mesh(tmp_path, own_redis) as mesh:
        _key_id, headers = await _key(mesh)
        runner = mesh.jobs.runner
        async with _after_the_answer(mesh, monkeypatch, _pause_writes, stop_then_release) as faults:
            job_id = await _submit(mesh, headers, 1, tokens=TOKENS)
            await _until(lambda: _started(faults), 10, "the worker answering")
        assert stopped and stopped[0] < 5.0  # Runner.stop's bound per item
        assert not runner._tasks  # nothing of the item outlives the stop, its save neither:
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("save ")]
        job = await _job(mesh, headers, job_id)
        assert (job.status, job.counts.succeeded) == ("RUNNING", 0)
        record = await mesh.jobs.store.get(job_id)
        assert record is not None
        stream = jobstore.work_stream(record.owner.lane)
        pending: Any = await mesh.redis.xpending(stream, jobstore.GROUP)
        assert pending["pending"] == 1  # resumed when the replica comes back


async def _started(faults: list[asyncio.Task[None]]) -> bool:
    return bool(faults)
