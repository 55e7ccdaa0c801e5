"""A revoked or expired key's jobs stop even when no runner reads their items: the
replicas' sweep of unfinished jobs (RevokedKeySweep). A real jobs service (its RPCs
over mTLS as the edge calls them), real keys in the auth service's key store, a real
Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from services.auth.authenticator import REVOCATION_BOUND_S
from services.auth.crypto import ServerSecret
from services.auth.keys import ApiKeyStore
from services.core import contract, identity
from services.core.server import serving
from services.jobs import store as jobstore
from services.jobs.key_status import KeyStatus
from services.jobs.runner import RevokedKeySweep
from services.jobs.service import JobsService, JobsSettings
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import catalogue
from tests.integration.test_jobs_stopping import _until
from tokenmesh.auth.v1 import auth_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb

# A database of its own: no other test's jobs service reads these jobs' lanes.
PRIVATE_DB = 11
SCOPES = ("inference:generate", "jobs")


async def _never_read() -> None:
    """A runner that reads no entry: every slot busy with other lanes' items."""
    await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def _service_that_runs_nothing(
    redis_url: str,
) -> AsyncIterator[tuple[jobs_service_pb2_grpc.JobsServiceAsyncStub, ApiKeyStore]]:
    """The jobs service, its runner reading nothing (its maintenance runs as ever): a
    stub to it as the edge, and the auth service's key store on the same Redis."""
    client = aioredis.from_url(redis_url)
    settings = JobsSettings(
        redis_url=redis_url,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"sweep-{uuid.uuid4().hex[:6]}",
    )
    await catalogue(redis_url, "deterministic-test")
    jobs = JobsService(settings)
    jobs.runner.run_forever = _never_read  # type: ignore[method-assign,assignment]
    try:
        async with serving(jobs, settings) as server:
            async with identity.secure_channel(
                f"127.0.0.1:{server.port}", mtls.files(contract.EDGE), contract.JOBS
            ) as channel:
                yield (
                    jobs_service_pb2_grpc.JobsServiceStub(channel),
                    ApiKeyStore(client, ServerSecret(b"k" * 32)),
                )
    finally:
        await client.aclose()


def _items(count: int) -> list[jobs_pb2.JobItem]:
    request = v2.CompleteRequest(model="deterministic-test", prompt="hi", max_output_tokens=4)
    return [jobs_pb2.JobItem(complete=request) for _ in range(count)]


async def test_a_revoked_keys_job_nobody_runs_stops_within_the_bound(redis_url: str) -> None:
    """Only a runner that read one of its items checked a job's key: a revoked key's job
    whose items no runner picked up stayed QUEUED, in progress to its owner, its
    webhook and its batch. Now the replicas' sweep stops it within the revocation
    bound: CANCELLED, every item saying KEY_REVOKED."""
    async with _service_that_runs_nothing(private_db_url(redis_url, PRIVATE_DB)) as (stub, keys):
        key, _ = await keys.create("", "sweep-test", SCOPES, [], auth_pb2.KeyLimits(), None)
        headers = ((contract.KEY_ID_HEADER, key.id), (contract.SCOPES_HEADER, " ".join(SCOPES)))
        job = await stub.CreateJob(jobs_pb.CreateJobRequest(items=_items(3)), metadata=headers)
        get = jobs_pb.GetJobRequest(id=job.id)
        assert (await stub.GetJob(get, metadata=headers)).status == "QUEUED"

        await keys.revoke(key.id)
        revoked_at = time.monotonic()

        async def ended() -> jobs_pb2.Job | None:
            found = await stub.GetJob(get, metadata=headers)
            return found if found.status in jobstore.FINAL else None

        final = await _until(ended, REVOCATION_BOUND_S + 5, "the revoked key's job ending")
        stopped_after_s = time.monotonic() - revoked_at
        assert final.status == "CANCELLED"
        assert stopped_after_s <= REVOCATION_BOUND_S, stopped_after_s
        page = await stub.ListJobResults(
            jobs_pb.ListJobResultsRequest(id=job.id, page_size=10), metadata=headers
        )
        assert [r.index for r in page.results] == [0, 1, 2]
        assert {r.error.reason for r in page.results} == {"KEY_REVOKED"}


async def test_the_sweep_pages_through_many_unfinished_jobs_a_batch_a_round(redis_url: str) -> None:
    """A round reads a bounded batch of the unfinished jobs; rounds in turn reach them all:
    a revoked key's jobs end KEY_REVOKED, an expired key's KEY_EXPIRED, an active
    key's (and a made-up key's, which has no record) keep running."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    store = jobstore.JobStore(client, 3600)
    keys = ApiKeyStore(client, ServerSecret(b"k" * 32))
    limits = auth_pb2.KeyLimits()
    revoked, _ = await keys.create("", "revoked", SCOPES, [], limits, None)
    expiring, _ = await keys.create("", "expiring", SCOPES, [], limits, 0.5)
    active, _ = await keys.create("", "active", SCOPES, [], limits, None)
    made_up = f"key_{uuid.uuid4().hex[:8]}"
    per_key = 60  # 240 jobs: past a listpack zset (128), where ZSCAN's COUNT holds
    owners = [revoked.id, expiring.id, active.id, made_up]
    jobs: dict[str, list[str]] = {key_id: [] for key_id in owners}
    try:
        for key_id in owners:
            owner = jobstore.Owner(key_id, "", {contract.KEY_ID_HEADER: key_id})
            for _ in range(per_key):
                new = jobstore.NewJob(owner, _items(1), "", {}, "", jobstore.now_ms() + 600_000)
                jobs[key_id].append((await store.create(new))[0])
        await keys.revoke(revoked.id)

        async def expired() -> bool:
            got = await keys.get(expiring.id)
            return bool(got.state == auth_pb2.API_KEY_STATE_EXPIRED)

        await _until(expired, 5, "the key expiring")

        async def records(key_id: str) -> list[jobstore.JobRecord]:
            found = [await store.get(job_id) for job_id in jobs[key_id]]
            return [r for r in found if r is not None]

        async def stopped() -> int:
            to_stop = await records(revoked.id) + await records(expiring.id)
            return sum(r.status == jobstore.CANCELLED for r in to_stop)

        sweep = RevokedKeySweep(store, KeyStatus(client), batch=40)
        first = await sweep.sweep()
        assert 0 < first < 2 * per_key  # one round did not read every job
        rounds = 1
        while await stopped() < 2 * per_key:
            assert rounds < 40, f"{await stopped()} jobs stopped after {rounds} rounds"
            await sweep.sweep()
            rounds += 1

        assert {r.get("stop_reason") for r in await records(revoked.id)} == {"KEY_REVOKED"}
        assert {r.get("stop_reason") for r in await records(expiring.id)} == {"KEY_EXPIRED"}
        running = await records(active.id) + await records(made_up)
        assert {r.status for r in running} == {jobstore.QUEUED}
    finally:
        for key_id, job_ids in jobs.items():
            for job_id in job_ids:
                await store.end(job_id, jobstore.CANCELLED)
            lane = jobstore.Owner(key_id, "", {}).lane
            await client.delete(jobstore.work_stream(lane), jobstore.owner_key(key_id))
            await client.srem(jobstore.LANES_KEY, lane)
        await client.aclose()
