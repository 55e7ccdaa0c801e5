"""Stopping a job: a revoked key's job stops spending, and a cancelled job's final results
never change. A real jobs service (its runner, its RPCs over mTLS as the edge calls
them), a real worker of the deterministic test engine, a real key in the auth service's
key store, a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.auth.authenticator import REVOCATION_BOUND_S
from services.auth.crypto import ServerSecret
from services.auth.keys import ApiKeyStore
from services.core import contract, identity
from services.core.redis_service import text
from services.core.server import serving
from services.inference.service import InferenceService
from services.jobs import store as jobstore
from services.jobs import views
from services.jobs.service import JobsService, JobsSettings
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import inference_settings
from tokenmesh.auth.v1 import auth_pb2
from tokenmesh.inference.v1 import inference_pb2 as v1
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb

# A database of its own: the session mesh's jobs service reads every lane of database 0.
PRIVATE_DB = 12
CONCURRENCY = 2
SCOPES = ("inference:generate", "jobs")


@dataclass
class Mesh:
    """The jobs service and a worker on one Redis, a channel to the service as the
    edge, and the auth service's key store."""

    jobs: JobsService
    worker: InferenceService
    stub: jobs_service_pb2_grpc.JobsServiceAsyncStub
    keys: ApiKeyStore
    redis: aioredis.Redis
    usage_stream: str


@contextlib.asynccontextmanager
async def _mesh(tmp_path: Path, redis_url: str, watch_s: float) -> AsyncIterator[Mesh]:
    """Runs the jobs service (its runner's watch every `watch_s`) beside a worker."""
    redis_url = private_db_url(redis_url, PRIVATE_DB)
    client = aioredis.from_url(redis_url)
    worker_settings = inference_settings(tmp_path, redis_url, test_models=("deterministic-test:1",))
    worker = InferenceService(worker_settings)
    settings = JobsSettings(
        redis_url=redis_url,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"stopping-{uuid.uuid4().hex[:6]}",
        concurrency=CONCURRENCY,
        tenant_concurrency=CONCURRENCY,
    )
    jobs = JobsService(settings)
    # The round that cuts the calls of a stopped job, every `watch_s` (0.5 s by default).
    jobs.runner.maintain_forever = functools.partial(  # type: ignore[method-assign]
        jobs.runner.maintain_forever, watch_s=watch_s
    )
    try:
        async with serving_jobs_and_worker(
            jobs, settings, worker, worker_settings, client, "stopping"
        ) as mesh:
            yield mesh
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def serving_jobs_and_worker(
    jobs: JobsService,
    settings: JobsSettings,
    worker: InferenceService,
    worker_settings: Any,
    client: aioredis.Redis,
    name: str,
) -> AsyncIterator[Mesh]:
    """Serves `worker` (registered in the router's registry for deterministic-test 1,
    under a worker id starting with `name`) and `jobs`, reached as the edge."""
    worker_id = f"{name}-{uuid.uuid4().hex[:6]}"
    try:
        async with serving(worker, worker_settings) as worker_server:
            entry = WorkerEntry(
                worker_id,
                "127.0.0.1",
                worker_server.port,
                (("deterministic-test", "1"),),
                lease_expires_at=time.time() + 600,
            )
            await client.hset(WORKERS_KEY, worker_id, entry.to_json())
            async with serving(jobs, settings) as server:
                target = f"127.0.0.1:{server.port}"
                async with identity.secure_channel(
                    target, mtls.files(contract.EDGE), contract.JOBS
                ) as channel:
                    yield Mesh(
                        jobs,
                        worker,
                        jobs_service_pb2_grpc.JobsServiceStub(channel),
                        ApiKeyStore(client, ServerSecret(b"k" * 32)),
                        client,
                        worker_settings.usage_stream,
                    )
    finally:
        await client.hdel(WORKERS_KEY, worker_id)


async def _until(
    check: Callable[[], Awaitable[Any]], timeout_s: float, what: str, every_s: float = 0.02
) -> Any:
    """Returns `check()`'s first true answer; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(every_s)


async def _key(mesh: Mesh) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A new key in the auth service's store, and the headers the edge sends for it."""
    key, _secret = await mesh.keys.create(
        "", "stopping-test", SCOPES, [], auth_pb2.KeyLimits(), None
    )
    headers = ((contract.KEY_ID_HEADER, key.id), (contract.SCOPES_HEADER, " ".join(SCOPES)))
    return key.id, headers


async def _submit(mesh: Mesh, headers: Any, count: int, tokens: int) -> str:
    """Submits a job of `count` items, each ~`tokens` x 5 ms on the test engine."""
    items = [
        jobs_pb2.JobItem(
            complete=v2.CompleteRequest(
                model="deterministic-test", prompt=f"item {i}", max_output_tokens=tokens
            )
        )
        for i in range(count)
    ]
    job = await mesh.stub.CreateJob(jobs_pb.CreateJobRequest(items=items), metadata=headers)
    return str(job.id)


async def _job(mesh: Mesh, headers: Any, job_id: str) -> jobs_pb2.Job:
    return await mesh.stub.GetJob(jobs_pb.GetJobRequest(id=job_id), metadata=headers)


async def _results(mesh: Mesh, headers: Any, job_id: str) -> list[bytes]:
    """Every result the API lists for the job, as bytes (to compare reads)."""
    out: list[bytes] = []
    token = ""
    while True:
        page = await mesh.stub.ListJobResults(
            jobs_pb.ListJobResultsRequest(id=job_id, page_size=1000, page_token=token),
            metadata=headers,
        )
        out += [r.SerializeToString(deterministic=True) for r in page.results]
        token = page.next_page_token
        if not token:
            return out


async def _final(mesh: Mesh, headers: Any, job_id: str, timeout_s: float) -> jobs_pb2.Job:
    """The job once it reports a final status."""

    async def ended() -> jobs_pb2.Job | None:
        job = await _job(mesh, headers, job_id)
        return job if job.status in jobstore.FINAL else None

    found: jobs_pb2.Job = await _until(ended, timeout_s, f"job {job_id} ending", every_s=0.01)
    return found


async def _runner_idle(mesh: Mesh) -> None:
    """Waits until the jobs service runs no item (what was in flight finished or went)."""

    async def idle() -> bool:
        return not mesh.jobs.runner._tasks

    await _until(idle, 30, "the runner's items in flight ending")


async def _metered(mesh: Mesh, job_id: str) -> Counter[str]:
    """How many billed usage events the worker wrote per request id of the job, once
    everything it appended is in the stream."""
    log = mesh.worker.usage_log

    async def shipped() -> bool:
        return log.backlog_bytes() == 0 and log.shipped_total >= log.appended_total

    await _until(shipped, 30, "the worker's usage events reaching the stream")
    billed: Counter[str] = Counter()
    entries: Any = await mesh.redis.xrange(mesh.usage_stream)
    for _, fields in entries:
        event = v1.UsageEvent.FromString(fields[b"event"])
        if event.request_id.startswith(f"{job_id}:") and event.usage.total_tokens > 0:
            billed[event.request_id] += 1
    return billed


def _ran(results: list[bytes]) -> set[int]:
    """The indexes of the results an item's call answered (not a stopped job's note)."""
    parsed = [jobs_pb2.JobResult.FromString(r) for r in results]
    return {r.index for r in parsed if r.HasField("complete")}


async def test_a_revoked_keys_job_stops_within_the_bound_and_keeps_what_ran(tmp_path, redis_url):
    """The job ran as the key the edge vouched for at submission, and the workers do not
    ask the auth service: a key revoked mid-run kept running (and paying for) every
    item until the job ended SUCCEEDED. Now the job stops within the 5 s revocation
    bound: CANCELLED, each item it did not run saying KEY_REVOKED, the items that ran
    keeping their results, nothing metered twice, nothing run after it ended."""
    async with _mesh(tmp_path, redis_url, watch_s=0.5) as mesh:
        key_id, headers = await _key(mesh)
        total = 100  # ~0.2 s each, two at a time: ~10 s of work
        job_id = await _submit(mesh, headers, total, tokens=40)

        async def started() -> bool:
            return (await _job(mesh, headers, job_id)).counts.succeeded >= 2

        await _until(started, 30, "the first items finishing")
        await mesh.keys.revoke(key_id)
        revoked_at = time.monotonic()
        job = await _final(mesh, headers, job_id, timeout_s=REVOCATION_BOUND_S + 5)
        stopped_after_s = time.monotonic() - revoked_at
        assert job.status == "CANCELLED"
        assert stopped_after_s <= REVOCATION_BOUND_S, stopped_after_s
        at_the_end = await _results(mesh, headers, job_id)

        await _runner_idle(mesh)
        assert await _results(mesh, headers, job_id) == at_the_end
        results = [jobs_pb2.JobResult.FromString(r) for r in at_the_end]
        assert [r.index for r in results] == list(range(total))
        ran = _ran(at_the_end)
        assert 2 <= len(ran) < total and job.counts.succeeded == len(ran)
        assert {r.error.reason for r in results if r.index not in ran} == {"KEY_REVOKED"}

        billed = await _metered(mesh, job_id)
        assert max(billed.values()) == 1  # no item metered twice
        assert {f"{job_id}:{i}" for i in ran} <= set(billed)  # every kept result paid once
        # At most the calls in flight when they were cut could finish unkept.
        assert len(billed) - len(ran) <= CONCURRENCY


async def test_a_cancelled_jobs_results_read_at_its_final_status_never_change(tmp_path, redis_url):
    """A cancel ended the job at once; its items in flight finished after it and wrote
    their results: the results (and counts) read when the job said CANCELLED were not
    those read a moment later. The job is CANCELLING until nothing is in flight (what
    finishes meanwhile is kept: it ran and was metered), then CANCELLED, final."""
    # The round that cuts a stopped job's calls comes 3 s apart here: the items in
    # flight at the cancel (~0.3 s each) finish before it, as they may between rounds.
    async with _mesh(tmp_path, redis_url, watch_s=3.0) as mesh:
        _key_id, headers = await _key(mesh)
        total = 40
        job_id = await _submit(mesh, headers, total, tokens=60)

        async def started() -> bool:
            return (await _job(mesh, headers, job_id)).counts.succeeded >= 2

        await _until(started, 30, "the first items finishing")
        cancelled = await mesh.stub.CancelJob(jobs_pb.CancelJobRequest(id=job_id), metadata=headers)
        assert cancelled.status in ("CANCELLING", "CANCELLED")
        job = await _final(mesh, headers, job_id, timeout_s=30)
        at_the_end = await _results(mesh, headers, job_id)
        assert job.status == "CANCELLED"

        await _runner_idle(mesh)
        later = await _job(mesh, headers, job_id)
        assert await _results(mesh, headers, job_id) == at_the_end
        assert later.counts == job.counts and later.usage == job.usage
        ran = _ran(at_the_end)
        assert len(ran) == job.counts.succeeded < total
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await mesh.stub.CancelJob(jobs_pb.CancelJobRequest(id=job_id), metadata=headers)
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@contextlib.asynccontextmanager
async def _two_items_read(
    redis_url: str,
) -> AsyncIterator[tuple[jobstore.JobStore, str, str, list[str]]]:
    """A job of two items whose entries runner "a" has read: (store, job id, stream,
    entry ids). No runner runs: the test plays the runners through the store."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    store = jobstore.JobStore(client, 3600)
    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = jobstore.Owner(key, "", {contract.KEY_ID_HEADER: key})
    stream = jobstore.work_stream(owner.lane)
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    job_id, _ = await store.create(
        jobstore.NewJob(owner, [item, item], "", {}, "", jobstore.now_ms() + 600_000)
    )
    try:
        reply: Any = await client.xreadgroup(jobstore.GROUP, "a", {stream: ">"}, count=2)
        entries = [text(entry_id) for entry_id, _ in reply[0][1]]
        yield store, job_id, stream, entries
    finally:
        await store.end(job_id, jobstore.CANCELLED)
        await client.delete(stream, jobstore.owner_key(key))
        await client.srem(jobstore.LANES_KEY, owner.lane)
        await client.aclose()


async def _status(store: jobstore.JobStore, job_id: str) -> str:
    record = await store.get(job_id)
    return record.status if record is not None else ""


async def test_a_stopped_job_ends_with_its_last_item_in_flight(redis_url):
    """No item starts once the job is stopping; one in flight that finishes is kept and
    counted; the job ends CANCELLED when the last one in flight goes, and nothing that
    arrives after that is written."""
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        result = jobs_pb2.JobResult(index=0, complete=v2.CompleteResponse())
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        assert await store.stop(job_id) == jobstore.StopOutcome.STOPPED
        assert await store.stop(job_id) == jobstore.StopOutcome.STOPPING_ALREADY
        assert await store.start_item(job_id, 1, "a", stream, entries[1]) is None
        assert await _status(store, job_id) == "CANCELLING"
        assert await store.finish_item(job_id, 0, result, (1, 2, 0), stream, entries[0], "a")
        assert await _status(store, job_id) == "CANCELLED"
        late = jobs_pb2.JobResult(index=1, complete=v2.CompleteResponse())
        assert not await store.finish_item(job_id, 1, late, (1, 2, 0), stream, entries[1], "a")
        assert await store.results(job_id, [0, 1]) == [result.SerializeToString(), None]
        record = await store.get(job_id)
        assert record is not None and record.number("succeeded") == 1
        assert not (await store.redis.xpending(stream, jobstore.GROUP))["pending"]


async def test_a_takeover_of_a_stopped_jobs_item_leaves_the_other_runners_mark(redis_url):
    """Runner "a" let its entry go idle past the claim time with an item in flight: "b"
    takes the entry over, but "a" may be stalled, its call still running (and metered):
    the job stays CANCELLING with "a"'s mark until "a" finishes or lets the item go, or
    the sweep ends it after the grace. ("b" dropped the mark, and the job ended
    CANCELLED before "a"'s result came.)"""
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        assert await store.stop(job_id, jobstore.KEY_REVOKED) == jobstore.StopOutcome.STOPPED
        await store.redis.xclaim(stream, jobstore.GROUP, "b", 0, [entries[0]])
        assert await store.start_item(job_id, 0, "b", stream, entries[0]) is None
        assert await _status(store, job_id) == "CANCELLING"
        inflight = await store.redis.hgetall(jobstore.inflight_key(job_id))
        assert {text(k): text(v) for k, v in inflight.items()} == {"0": "a"}
        pending = await store.redis.xpending_range(stream, jobstore.GROUP, "-", "+", 10)
        assert [text(p["message_id"]) for p in pending] == [entries[1]]  # "b" acknowledged
        now = jobstore.now_ms()
        assert not await store.end(job_id, jobstore.EXPIRED, due_before_ms=now)  # not due
        due = await store.redis.zscore(jobstore.ACTIVE_KEY, job_id)
        assert due is not None
        assert await store.end(job_id, jobstore.EXPIRED, due_before_ms=int(due))  # the sweep
        record = await store.get(job_id)
        assert record is not None and record.status == "CANCELLED"
        assert record.get("stop_reason") == "KEY_REVOKED"
        assert not await store.redis.exists(jobstore.inflight_key(job_id))


async def test_a_runner_that_resumes_its_own_entry_of_a_stopped_job_drops_its_mark(redis_url):
    """Runner "a" restarted (same consumer name) and resumed its pending entry: its own
    mark goes, and the job with nothing else in flight ends CANCELLED at once."""
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        assert await store.stop(job_id) == jobstore.StopOutcome.STOPPED
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is None
        assert await _status(store, job_id) == "CANCELLED"
        assert not await store.redis.exists(jobstore.inflight_key(job_id))


async def test_a_stopped_job_nobody_takes_over_ends_cancelled_after_the_grace(redis_url):
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        assert await store.stop(job_id) == jobstore.StopOutcome.STOPPED
        grace_ms = jobstore.STOP_GRACE_S * 1000
        due = await store.redis.zscore(jobstore.ACTIVE_KEY, job_id)
        assert due is not None and due >= jobstore.now_ms() + grace_ms - 60_000
        # The expiry sweep, once the grace has passed: the job was stopped, not expired.
        assert await store.end(job_id, jobstore.EXPIRED, due_before_ms=int(due))
        assert await _status(store, job_id) == "CANCELLED"


async def test_an_item_with_its_result_is_in_flight_for_nobody(redis_url):
    """Runner "a" stalled past the claim time; "b" took the entry over and started the
    item again; "a" then finished it. The mark "b" set stayed (only a consumer's own
    was dropped), so a later cancel stayed CANCELLING until the 10-minute sweep."""
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        await store.redis.xclaim(stream, jobstore.GROUP, "b", 0, [entries[0]])
        assert await store.start_item(job_id, 0, "b", stream, entries[0]) is not None
        result = jobs_pb2.JobResult(index=0, complete=v2.CompleteResponse())
        assert await store.finish_item(job_id, 0, result, (1, 2, 0), stream, entries[0], "a")
        assert not await store.redis.hexists(jobstore.inflight_key(job_id), "0")
        # A takeover of an entry whose item has its result drops any mark too.
        await store.redis.hset(jobstore.inflight_key(job_id), "0", "c")
        assert await store.start_item(job_id, 0, "b", stream, entries[0]) is None
        assert not await store.redis.hexists(jobstore.inflight_key(job_id), "0")
        assert await store.stop(job_id) == jobstore.StopOutcome.STOPPED
        assert await _status(store, job_id) == "CANCELLED"  # nothing in flight: at once


async def test_an_expiring_job_keeps_the_answer_of_an_item_in_flight(redis_url):
    """A job's window ended while an item's call was answered (and metered) but not
    yet stored: the sweep ended the job EXPIRED at once, the answer was thrown away,
    and the job said the item never ran. The job stops first now (CANCELLING, stop
    reason DEADLINE), keeps that answer, and ends EXPIRED."""
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        assert await store.end(job_id, jobstore.EXPIRED)  # the sweep, past the deadline
        record = await store.get(job_id)
        assert record is not None
        assert (record.status, record.get("stop_reason")) == ("CANCELLING", jobstore.DEADLINE)
        assert await store.start_item(job_id, 1, "a", stream, entries[1]) is None
        answer = jobs_pb2.JobResult(index=0, complete=v2.CompleteResponse())
        assert await store.finish_item(job_id, 0, answer, (1, 3, 0), stream, entries[0], "a")
        record = await store.get(job_id)
        assert record is not None and record.status == jobstore.EXPIRED
        assert (record.number("succeeded"), record.number("completion_tokens")) == (1, 3)
        assert await store.results(job_id, [0, 1]) == [answer.SerializeToString(), None]
        error = views.never_ran(record)  # item 1's: the window ended before it ran
        assert error is not None and error.code == "DEADLINE_EXCEEDED"


async def test_an_expiring_job_whose_runner_died_ends_expired_after_the_grace(redis_url):
    async with _two_items_read(redis_url) as (store, job_id, stream, entries):
        assert await store.start_item(job_id, 0, "a", stream, entries[0]) is not None
        assert await store.end(job_id, jobstore.EXPIRED)
        due = await store.redis.zscore(jobstore.ACTIVE_KEY, job_id)
        assert due is not None and due > jobstore.now_ms()
        assert await store.end(job_id, jobstore.EXPIRED, due_before_ms=int(due))  # the sweep
        assert await _status(store, job_id) == jobstore.EXPIRED


async def test_an_expiring_job_with_nothing_in_flight_ends_at_once(redis_url):
    async with _two_items_read(redis_url) as (store, job_id, _, _):
        assert await store.end(job_id, jobstore.EXPIRED)
        assert await _status(store, job_id) == jobstore.EXPIRED
