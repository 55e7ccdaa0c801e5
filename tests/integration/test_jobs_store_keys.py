"""The job store's keys over a job's life (real Redis): listing a key's jobs and an
owner's batches page by page (every one once, also when several were created in the
same millisecond), and results that expire with their job."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from services.core.redis_service import text
from services.jobs import store as jobstore
from services.jobs.openai_batches import BatchStore, owner_batches_key
from services.jobs.store import JobStore, NewJob, Owner, now_ms, owner_key, results_key
from services.jobs.validation import MAX_WINDOW_S
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

SAME_MS = 1_800_000_000_000


async def test_jobs_created_in_one_millisecond_are_each_listed_once(redis_url):
    client = aioredis.from_url(redis_url)
    store, key = JobStore(client, 3600), f"key_{uuid.uuid4().hex[:8]}"
    try:
        await client.zadd(owner_key(key), {"job-a": SAME_MS, "job-b": SAME_MS, "job-c": SAME_MS})
        await client.zadd(owner_key(key), {"job-old": SAME_MS - 1})
        listed, before, after = [], 2**62, ""
        while page := await store.owned(key, before, 1, after):
            ((job_id, before),) = page
            after = job_id
            listed.append(job_id)
        # A page that ended at job-c read "before its millisecond": a and b were lost.
        assert listed == ["job-c", "job-b", "job-a", "job-old"]
    finally:
        await client.delete(owner_key(key))
        await client.aclose()


async def test_batches_created_in_one_millisecond_are_each_listed_once(redis_url):
    client = aioredis.from_url(redis_url)
    batches, owner = BatchStore(client, 3600), f"owner-{uuid.uuid4().hex[:8]}"
    try:
        await client.zadd(owner_batches_key(owner), {"batch_a": SAME_MS, "batch_b": SAME_MS})
        await client.zadd(owner_batches_key(owner), {"batch_old": SAME_MS - 1})
        listed, after, more = [], "", True
        while more:
            found, more = await batches.page(owner, after, 1)
            ids = [batch_id for batch_id, _ in found]
            listed += ids
            after = ids[-1]
        assert listed == ["batch_b", "batch_a", "batch_old"]
    finally:
        await client.delete(owner_batches_key(owner))
        await client.aclose()


async def test_a_result_that_arrives_after_its_job_ended_is_not_kept(redis_url):
    """An item that finishes after its job ended made the results hash anew, without an
    expiry (kept for good), and changed the results of a job that had reported its
    final status. The results are final now: the late one is not written at all."""
    client = aioredis.from_url(redis_url)
    store, key = JobStore(client, 3600), f"key_{uuid.uuid4().hex[:8]}"
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    try:
        job_id, _ = await store.create(
            NewJob(Owner(key, "", {}), [item], "", {}, "", now_ms() + 600_000)
        )
        assert await store.end(job_id, jobstore.CANCELLED)
        stream = f"stream-{uuid.uuid4().hex[:6]}"
        result = jobs_pb2.JobResult(index=0)
        assert not await store.finish_item(job_id, 0, result, (1, 1, 0), stream, "0-1")
        assert not await client.exists(results_key(job_id))
        record = await store.get(job_id)
        assert record is not None and record.number("succeeded") == 0
    finally:
        await client.aclose()


async def test_a_late_failed_webhook_attempt_does_not_undo_a_delivery(redis_url):
    """A replica whose lease on a due webhook ran out while it waited for the receiver
    recorded its failure after another replica delivered the event: the webhook went
    back to RETRYING (sent again) or DEAD. A late attempt is now kept in the list and
    changes nothing; so is one of a round a redelivery replaced."""
    client = aioredis.from_url(redis_url)
    store, key = JobStore(client, 3600), f"key_{uuid.uuid4().hex[:8]}"
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    try:
        job_id, _ = await store.create(
            NewJob(Owner(key, "", {}), [item], "https://hooks.example/x", {}, "", now_ms() + 1)
        )
        numbers = [await store.next_attempt(job_id) for _ in range(2)]  # two replicas'
        late, sent = (jobs_pb2.WebhookAttempt(attempt=n) for n in numbers)
        assert await store.record_attempt(job_id, sent, jobstore.HOOK_DELIVERED, 0, 0)
        retry_at = now_ms() + 30_000
        assert not await store.record_attempt(job_id, late, jobstore.HOOK_RETRYING, retry_at, 0)
        record = await store.get(job_id)
        assert record is not None and record.get("webhook_state") == jobstore.HOOK_DELIVERED
        assert await client.zscore(jobstore.HOOKS_KEY, job_id) is None  # not sent again
        assert [a.attempt for a in await store.attempts(job_id)] == [2, 1]
        await store.redeliver(job_id)  # a new round, counted from attempt 2 on
        assert not await store.record_attempt(job_id, late, jobstore.HOOK_DEAD, 0, 0)
        record = await store.get(job_id)
        assert record is not None and record.get("webhook_state") == jobstore.HOOK_PENDING
    finally:
        await client.zrem(jobstore.HOOKS_KEY, job_id)
        await client.aclose()


async def test_a_keys_job_list_drops_what_no_job_can_outlive_and_expires(redis_url):
    """owner:<key> only shrank when its owner listed its jobs: every job id a key ever
    made was kept for good."""
    client = aioredis.from_url(redis_url)
    store, key = JobStore(client, 3600), f"key_{uuid.uuid4().hex[:8]}"
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    lifetime_s = int(MAX_WINDOW_S) + 3600
    try:
        await client.zadd(owner_key(key), {"job-long-gone": now_ms() - lifetime_s * 1000 - 1})
        job_id, _ = await store.create(
            NewJob(Owner(key, "", {}), [item], "", {}, "", now_ms() + 600_000)
        )
        assert [text(m) for m in await client.zrange(owner_key(key), 0, -1)] == [job_id]
        assert lifetime_s - 5 <= await client.ttl(owner_key(key)) <= lifetime_s
    finally:
        await client.delete(owner_key(key))
        await client.aclose()
