"""Webhook delivery with slow receivers beside fast ones (real Redis, real HTTP over
real sockets, the real sender loop).

The sender claimed a batch of 16 due webhooks and waited for all of it before it
claimed more: one receiver that trickled its answer held the others' successors
for a whole attempt (twice the timeout), and a key whose webhooks all went to such
receivers held every slot, for every other key, attempt after attempt."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from services.jobs import signing
from services.jobs import store as jobstore
from services.jobs.store import JobStore, NewJob, Owner, now_ms
from services.jobs.webhooks import DeliveryPolicy, WebhookSender
from tests.webhook_receivers import Receiver, Tarpit
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

CONCURRENCY = 16
# An attempt is bounded by twice this: the tarpits hold theirs that long.
TIMEOUT_S = 5.0
WAIT_S = 60.0  # a deadline for conditions, far past what they need


@pytest.fixture
async def store(own_redis: str) -> AsyncIterator[JobStore]:
    client = aioredis.from_url(own_redis)
    yield JobStore(client, 3600)
    await client.aclose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    server = Tarpit()
    yield server
    server.close()


@pytest.fixture
async def sender(store: JobStore) -> AsyncIterator[WebhookSender]:
    """The sender's loop, running; stopped (its attempts cancelled) after the test."""
    policy = DeliveryPolicy(timeout_s=TIMEOUT_S, allow_hosts=("127.0.0.1",))
    webhooks = WebhookSender(store, policy, concurrency=CONCURRENCY)
    loop = asyncio.create_task(webhooks.run_forever(0.05))
    yield webhooks
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    await webhooks.close()


async def _key(store: JobStore) -> str:
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    await store.create_secret(key_id, signing.new_secret())
    return key_id


async def _ended_jobs(store: JobStore, key_id: str, url: str, count: int) -> list[str]:
    """Jobs of `key_id` that ended, their webhooks (to `url`) due now, oldest first."""
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    out = []
    for _ in range(count):
        job = NewJob(Owner(key_id, "", {}), [item], url, {}, "", now_ms() + 600_000)
        job_id, _ = await store.create(job)
        assert await store.end(job_id, jobstore.CANCELLED)
        out.append(job_id)
    return out


async def _states(store: JobStore, job_ids: list[str]) -> list[str]:
    records = [await store.get(job_id) for job_id in job_ids]
    return [r.get("webhook_state") if r is not None else "" for r in records]


async def _attempts_made(store: JobStore, job_ids: list[str]) -> int:
    return sum([len(await store.attempts(job_id)) for job_id in job_ids])


async def _wait_delivered(store: JobStore, job_ids: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while set(await _states(store, job_ids)) != {jobstore.HOOK_DELIVERED}:
        assert time.monotonic() < deadline, await _states(store, job_ids)
        await asyncio.sleep(0.02)


async def test_a_key_whose_receivers_trickle_leaves_the_other_keys_their_slots(
    store, sender, receiver, tarpit
):
    """16 webhooks of one key to receivers that never finish answering, due before 16
    of another key to a receiver that answers at once: the second key's were sent
    only when the first key's attempts ended (twice the timeout: 20 s by default),
    and so on for every block of 16."""
    slow_key, fast_key = await _key(store), await _key(store)
    slow = await _ended_jobs(store, slow_key, f"http://127.0.0.1:{tarpit.port}/tarpit", 16)
    fast = await _ended_jobs(store, fast_key, f"http://127.0.0.1:{receiver.port}/ok", 16)

    await _wait_delivered(store, fast)

    # Every one of them while the slow key's receivers still held their attempts...
    assert await _attempts_made(store, slow) == 0
    # ...which were no more than the key's share of the slots.
    assert 1 <= tarpit.most_open <= sender.per_key < CONCURRENCY
    assert len(receiver.received) == 16


async def test_a_slow_receiver_does_not_hold_up_the_webhooks_claimed_after_it(
    store, sender, receiver, tarpit
):
    """One receiver that trickles among 32 due webhooks (of 32 keys): the 16 claimed
    after the first 16 waited for its attempt to end."""
    await _ended_jobs(store, await _key(store), f"http://127.0.0.1:{tarpit.port}/t", 1)
    fast = [
        job_id
        for _ in range(31)
        for job_id in await _ended_jobs(
            store, await _key(store), f"http://127.0.0.1:{receiver.port}/ok", 1
        )
    ]

    await _wait_delivered(store, fast)

    assert tarpit.open == 1  # its attempt still runs: the others went past it
