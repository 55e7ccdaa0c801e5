"""Webhook delivery with slow receivers beside fast ones (real Redis, real HTTP over
real sockets, the real sender loop).

The sender claimed a batch of 16 due webhooks and waited for all of it before it
claimed more: one receiver that trickled its answer held the others' successors
for a whole attempt (twice the timeout), and a key whose webhooks all went to such
receivers held every slot, for every other key, attempt after attempt.

A TCP proxy between the sender and Redis stands for a Redis that goes away (every
connection dropped, the next one refused) and comes back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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


@contextlib.asynccontextmanager
async def _sending(webhooks: WebhookSender, poll_s: float = 0.05) -> AsyncIterator[None]:
    """The sender's loop, running; stopped (its attempts cancelled) after the block."""
    loop = asyncio.create_task(webhooks.run_forever(poll_s))
    try:
        yield
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


@pytest.fixture
async def sender(store: JobStore) -> AsyncIterator[WebhookSender]:
    """The sender's loop, running; stopped (its attempts cancelled) after the test."""
    policy = DeliveryPolicy(timeout_s=TIMEOUT_S, allow_hosts=("127.0.0.1",))
    webhooks = WebhookSender(store, policy, concurrency=CONCURRENCY)
    async with _sending(webhooks):
        yield webhooks
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


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


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


async def test_a_key_s_backlog_to_a_quick_receiver_leaves_the_other_keys_their_slots(store):
    """120 webhooks of one key to a receiver that answers in 0.3 s (its attempts never
    count as slow), due before 4 each of 3 other keys: the first key's claimed
    webhooks waited on the replica until they filled its room for waiting ones (32),
    then the replica claimed one per ended attempt, again the first key's, so the
    others' were sent only once the whole backlog had been claimed, with 4 of the 16
    slots at work meanwhile."""
    receiver = Receiver(answer_s=0.3)
    policy = DeliveryPolicy(timeout_s=TIMEOUT_S, allow_hosts=("127.0.0.1",))
    webhooks = WebhookSender(store, policy, concurrency=CONCURRENCY)
    url = f"http://127.0.0.1:{receiver.port}"
    backlog = await _ended_jobs(store, await _key(store), f"{url}/backlog", 120)
    others = [
        job_id
        for _ in range(3)
        for job_id in await _ended_jobs(store, await _key(store), f"{url}/other", 4)
    ]
    try:
        async with _sending(webhooks):
            await _wait_delivered(store, others)
            backlog_sent_before = sum(r.path == "/backlog" for r in receiver.received)
            await _wait_delivered(store, backlog)
    finally:
        await webhooks.close()
        receiver.close()

    # The others went past the backlog (each attempt takes the same 0.3 s): before,
    # all but the 36 the replica held (4 in flight, 32 waiting) had been sent...
    assert backlog_sent_before < len(backlog) // 3
    # ...and the backlog's webhooks, put back to Redis, were each sent once.
    sent = collections.Counter(r.headers["webhook-id"] for r in receiver.received)
    assert len(sent) == len(backlog) + len(others)
    assert set(sent.values()) == {1}


class RedisProxy:
    """A TCP proxy to a Redis. `down()` drops every connection and stops listening (a
    client's next connection is refused at once, as by a Redis that went away);
    `up()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Listed before the connection to Redis is made: one accepted as `down()` ran
        # was listed only after it, survived it, and kept Redis reachable through it
        # (a cause of the loop that never met Redis's absence, below).
        self._links.add(writer)
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        if writer not in self._links:  # `down()` ran meanwhile
            server_writer.transport.abort()
            writer.transport.abort()
            return
        self._links.add(server_writer)
        await asyncio.gather(self._pump(reader, server_writer), self._pump(server_reader, writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def redis_proxy(own_redis: str) -> AsyncIterator[tuple[RedisProxy, str]]:
    """The proxy, up, and the URL of own_redis through it."""
    parts = urlsplit(own_redis)
    proxy = RedisProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    await proxy.up()
    try:
        yield proxy, parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    finally:
        await proxy.down()


async def test_after_redis_went_away_mid_pass_the_restarted_loop_sends_the_key_s_webhooks(
    store, redis_proxy, tarpit
):
    """Redis goes away while the loop waits. A held attempt of key A ends; the loop
    starts A's waiting webhook, then puts key B's back (B's attempt turned slow): that
    Redis call fails and the loop stops, cancelling the new attempt. The same sender
    runs the restarted loop, and A's webhooks are sent. (The new attempt has run its
    first step by then: redis-py waits on the socket before it fails, even for a
    refused connection, so the attempt's own `finally` gave its slot back.)"""
    proxy, proxied_url = redis_proxy
    # No retries: the Redis error reaches the loop at once (as it does after them).
    client = aioredis.from_url(proxied_url, retry=Retry(NoBackoff(), 0))
    slow_after_s = 0.5
    policy = DeliveryPolicy(
        timeout_s=TIMEOUT_S,
        allow_hosts=("127.0.0.1",),
        lease_s=1.0,  # a webhook held by the stopped loop is due again soon
        slow_attempt_s=slow_after_s,
    )
    webhooks = WebhookSender(JobStore(client, 3600), policy, concurrency=CONCURRENCY, per_key=1)
    held = Receiver()
    held.hold()
    a_key, b_key = await _key(store), await _key(store)
    # Whichever of a key's two starts first holds its slot (A's until released).
    a_jobs = await _ended_jobs(store, a_key, f"http://127.0.0.1:{held.port}/a", 2)
    a_due_ms = now_ms()
    await _until(lambda: now_ms() > a_due_ms)  # A's are claimed first, and started first
    await _ended_jobs(store, b_key, f"http://127.0.0.1:{tarpit.port}/b", 2)
    loop = asyncio.create_task(webhooks.run_forever(WAIT_S))  # woken by ended attempts only
    try:
        # One attempt of each key in flight, the other webhook of each waiting for it.
        await _until(lambda: held.open == 1 and tarpit.open == 1)
        b_slow_at = time.monotonic() + slow_after_s
        await _until(lambda: time.monotonic() >= b_slow_at)
        await proxy.down()
        held.release()
        with pytest.raises(redis.exceptions.ConnectionError):
            # Bounded: once, under CI's load, the loop never met Redis's absence and
            # the test hung until pytest-timeout's 300 s.
            await asyncio.wait_for(asyncio.shield(loop), WAIT_S)

        await proxy.up()
        loop = asyncio.create_task(webhooks.run_forever(0.05))  # as the supervisor does
        await _wait_delivered(store, a_jobs)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await webhooks.close()
        await client.aclose()
        held.close()


async def test_an_error_right_after_an_attempt_started_leaves_its_key_its_slot(store, receiver):
    """A key's webhook claimed with another job's whose record cannot be read (its
    identity is not JSON): the loop started the first attempt, then raised on the
    second record before that attempt ever ran, and cancelled it, stopping. A task
    cancelled before its first step never runs its `finally`, which alone gave the
    key's slot back; the same sender runs the restarted loop, and the key had no
    room on the replica, ever again."""
    policy = DeliveryPolicy(
        timeout_s=TIMEOUT_S,
        allow_hosts=("127.0.0.1",),
        lease_s=1.0,  # the webhook the stopped loop held is due again soon
    )
    webhooks = WebhookSender(store, policy, concurrency=CONCURRENCY, per_key=1)
    url = f"http://127.0.0.1:{receiver.port}/ok"
    [sent] = await _ended_jobs(store, await _key(store), url, 1)
    sent_due_ms = now_ms()
    await _until(lambda: now_ms() > sent_due_ms)  # claimed first, started first
    [unreadable] = await _ended_jobs(store, await _key(store), url, 1)
    await store.redis.hset(jobstore.job_key(unreadable), "identity", "{not json")
    try:
        with pytest.raises(ValueError):
            await webhooks.run_forever(0.05)
        await store.drop_hook(unreadable)  # set aside by hand

        async with _sending(webhooks):  # as the supervisor restarts it
            await _wait_delivered(store, [sent])
    finally:
        await webhooks.close()
