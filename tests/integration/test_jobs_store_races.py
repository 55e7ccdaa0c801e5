"""The job store against writers that interleave with it (real Redis): webhook writes
that come after their job expired, and jobs or batches created while a page is read."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.jobs import store as jobstore
from services.jobs.openai_batches import BatchStore, owner_batches_key
from services.jobs.store import JobStore, owner_key
from tokenmesh.jobs.v1 import jobs_pb2

SAME_MS = 1_800_000_000_000


async def test_webhook_writes_after_the_job_expired_do_not_bring_it_back(redis_url):
    """A webhook sent while its job expired (retention) counted its attempt, recorded it
    and a redelivery made it due again on a hash each write created anew, without a TTL:
    a job that never expired. Now each finds the job gone and drops the due webhook."""
    client = aioredis.from_url(redis_url)
    store = JobStore(client, 3600)
    job_id = jobstore.new_job_id()  # a job whose keys all expired
    keys = [jobstore.job_key(job_id), jobstore.attempts_key(job_id)]
    try:
        await client.zadd(jobstore.HOOKS_KEY, {job_id: 1})
        assert await store.next_attempt(job_id) is None
        assert await client.zscore(jobstore.HOOKS_KEY, job_id) is None

        await client.zadd(jobstore.HOOKS_KEY, {job_id: 1})
        attempt = jobs_pb2.WebhookAttempt(attempt=1, http_status=500)
        changed = await store.record_attempt(job_id, attempt, jobstore.HOOK_RETRYING, 5, 0)
        assert not changed
        assert await client.zscore(jobstore.HOOKS_KEY, job_id) is None

        assert not await store.redeliver(job_id)
        assert await client.zscore(jobstore.HOOKS_KEY, job_id) is None
        assert await client.exists(*keys) == 0
    finally:
        await client.delete(*keys)
        await client.zrem(jobstore.HOOKS_KEY, job_id)
        await client.aclose()


async def test_a_redelivery_while_an_attempt_is_in_flight_waits_for_its_lease(redis_url):
    """A redelivery made the webhook due at once, lease or not: another replica sent the
    event beside the attempt in flight (each call one more, concurrently). Its round is
    due when the lease ends; a webhook waiting for a retry is still due at once."""
    client = aioredis.from_url(redis_url)
    store = JobStore(client, 3600)
    in_flight, waiting = jobstore.new_job_id(), jobstore.new_job_id()
    now = jobstore.now_ms()
    keys = [jobstore.job_key(in_flight), jobstore.job_key(waiting)]
    try:
        await client.hset(keys[0], mapping={"webhook_state": "PENDING", "webhook_next_ms": now})
        later = now + 600_000  # a retry due in 10 minutes, not claimed
        await client.hset(keys[1], mapping={"webhook_state": "RETRYING", "webhook_next_ms": later})
        await client.zadd(jobstore.HOOKS_KEY, {in_flight: now, waiting: later})
        assert await store.claim_due_hooks(60_000, 100) == [in_flight]  # replica A sends
        leased = await client.zscore(jobstore.HOOKS_KEY, in_flight)

        assert await store.redeliver(in_flight) and await store.redeliver(waiting)
        assert await store.claim_due_hooks(60_000, 100) == [waiting]  # replica B
        assert await client.zscore(jobstore.HOOKS_KEY, in_flight) == leased
        assert int(await client.hget(keys[0], "webhook_next_ms")) == leased
    finally:
        await client.delete(*keys)
        await client.zrem(jobstore.HOOKS_KEY, in_flight, waiting)
        await client.aclose()


async def test_a_replica_whose_clock_runs_ahead_does_not_take_a_leased_webhook(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases were scored by each replica's clock: one running a lease (60 s) ahead
    found every webhook another replica was sending due, and sent it too."""
    client = aioredis.from_url(redis_url)
    store = JobStore(client, 3600)
    job_id = jobstore.new_job_id()
    try:
        await client.zadd(jobstore.HOOKS_KEY, {job_id: jobstore.now_ms()})
        assert job_id in await store.claim_due_hooks(60_000, 100)  # replica A sends
        clock = jobstore.now_ms
        monkeypatch.setattr(jobstore, "now_ms", lambda: clock() + 120_000)  # replica B
        assert job_id not in await store.claim_due_hooks(60_000, 100)  # old code: taken
    finally:
        await client.zrem(jobstore.HOOKS_KEY, job_id)
        await client.aclose()


@pytest.fixture
def create_between_rank_and_range(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Adds `(zset, member)`s newest, each right after a ZREVRANK of that zset answers:
    a creation that lands between a page's rank and its range."""
    pending: list[tuple[str, str]] = []
    zrevrank = aioredis.Redis.zrevrank

    async def then_create(self: aioredis.Redis, name: str, value: str, **kwargs: Any) -> Any:
        rank = await zrevrank(self, name, value, **kwargs)
        for key, member in [p for p in pending if p[0] == name]:
            pending.remove((key, member))
            await self.zadd(key, {member: SAME_MS + 1})
        return rank

    monkeypatch.setattr(aioredis.Redis, "zrevrank", then_create)
    return pending


async def test_a_job_created_while_a_page_is_read_does_not_repeat_its_last_job(
    redis_url, create_between_rank_and_range
):
    client = aioredis.from_url(redis_url)
    store, key = JobStore(client, 3600), f"key_{uuid.uuid4().hex[:8]}"
    try:
        await client.zadd(owner_key(key), {"job-a": SAME_MS - 2, "job-b": SAME_MS - 1})
        create_between_rank_and_range.append((owner_key(key), "job-new"))
        # The page after job-b: the new job took rank 0, and ranks from job-b's old one
        # on began at job-b itself.
        assert await store.owned(key, 2**62, 1, "job-b") == [("job-a", SAME_MS - 2)]
    finally:
        await client.delete(owner_key(key))
        await client.aclose()


async def test_a_batch_created_while_a_page_is_read_does_not_repeat_its_last_batch(
    redis_url, create_between_rank_and_range
):
    client = aioredis.from_url(redis_url)
    batches, owner = BatchStore(client, 3600), f"owner-{uuid.uuid4().hex[:8]}"
    try:
        await client.zadd(owner_batches_key(owner), {"batch_a": SAME_MS - 2})
        await client.zadd(owner_batches_key(owner), {"batch_b": SAME_MS - 1})
        create_between_rank_and_range.append((owner_batches_key(owner), "batch_new"))
        assert await batches.page(owner, "batch_b", 1) == ([("batch_a", SAME_MS - 2)], False)
    finally:
        await client.delete(owner_batches_key(owner))
        await client.aclose()
