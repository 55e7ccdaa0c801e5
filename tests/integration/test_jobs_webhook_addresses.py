"""Webhook delivery to a receiver whose name resolves to several addresses (real Redis,
real HTTP over real sockets; only the name lookup is the test's: ssrf.Lookup).

Every address a name resolves to is checked, and the event goes to one of those
addresses (pinned, no second lookup): the first that accepts the connection."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.jobs import signing, ssrf
from services.jobs import store as jobstore
from services.jobs.store import JobStore, NewJob, Owner, now_ms
from services.jobs.webhooks import DeliveryPolicy, WebhookSender
from tests.conftest import private_db_url
from tests.webhook_receivers import Receiver
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

# A database of its own: the session mesh's webhook sender (database 0) would send
# these jobs' webhooks too, with the system's resolver.
PRIVATE_DB = 2
RECEIVER_HOST = "hooks.test"
# Nothing listens here: the receiver binds 127.0.0.1 only (Linux routes all of
# 127.0.0.0/8 to loopback, so a connection to this address is refused at once).
DOWN_ADDRESS = "127.0.0.2"


class Names:
    """A resolver that answers the test's names (and counts the lookups)."""

    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.lookups = 0

    async def __call__(self, host: str, port: int, owner: str, timeout_s: float) -> Sequence[str]:
        self.lookups += 1
        if host not in self.answers:
            raise OSError(f"{host} does not resolve")
        return self.answers[host]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[JobStore]:
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    yield JobStore(client, 3600)
    await client.aclose()


async def _ended_job_with_webhook(store: JobStore, url: str) -> str:
    """A job that ended (its webhook due now), owned by a key with a webhook secret."""
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    await store.create_secret(key_id, signing.new_secret())
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    job_id, _ = await store.create(
        NewJob(Owner(key_id, "", {}), [item], url, {}, "", now_ms() + 600_000)
    )
    assert await store.end(job_id, jobstore.CANCELLED)
    return job_id


def _webhook_attempts(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("tokenmesh_job_webhook_attempts_total", labels) or 0.0


async def test_a_receiver_whose_first_address_is_down_gets_its_event_at_the_next(store, receiver):
    """Only the first address was ever tried: the attempt failed (ConnectError) while
    the name's second address served, and so did every retry until DEAD_LETTER."""
    names = Names({RECEIVER_HOST: [DOWN_ADDRESS, "127.0.0.1"]})
    policy = DeliveryPolicy(allow_hosts=(RECEIVER_HOST,), timeout_s=5.0, lookup=names)
    sender = WebhookSender(store, policy)
    url = f"http://{RECEIVER_HOST}:{receiver.port}/hook"
    job_id = await _ended_job_with_webhook(store, url)
    delivered = _webhook_attempts("delivered")
    try:
        await sender.deliver(job_id)
    finally:
        await sender.close()
        await store.redis.zrem(jobstore.HOOKS_KEY, job_id)

    record = await store.get(job_id)
    assert record is not None
    attempts = await store.attempts(job_id)
    assert [(a.http_status, a.error) for a in attempts] == [(204, "")]
    assert record.get("webhook_state") == jobstore.HOOK_DELIVERED
    assert _webhook_attempts("delivered") - delivered == 1  # the jobs service's own signal
    # Sent once, to the vetted address, as the receiver's name; one lookup only.
    assert receiver.hosts == [f"{RECEIVER_HOST}:{receiver.port}"]
    assert names.lookups == 1


async def test_no_address_of_the_name_answering_fails_the_attempt(store):
    names = Names({RECEIVER_HOST: [DOWN_ADDRESS, "127.0.0.3"]})
    policy = DeliveryPolicy(allow_hosts=(RECEIVER_HOST,), timeout_s=5.0, lookup=names)
    sender = WebhookSender(store, policy)
    try:
        url = f"http://{RECEIVER_HOST}:9/hook"
        answer = await sender.post(url, [signing.new_secret()], "job-x", b"{}")
    finally:
        await sender.close()
    assert not answer.delivered
    assert answer.error == "connection failed: ConnectError"


@pytest.mark.parametrize(
    "answer",
    [
        ["8.8.8.8", "127.0.0.1"],  # a public address first, loopback second
        ["127.0.0.1", "8.8.8.8"],
        ["1.1.1.1", "8.8.8.8", "169.254.169.254"],  # metadata last
        ["8.8.8.8", "::ffff:10.0.0.1"],
    ],
)
async def test_a_name_with_any_private_address_is_refused_and_nothing_is_sent(
    store, receiver, answer
):
    """Not an SSRF bypass (checked: it did not reproduce): every address is checked, not
    the first one only, and the attempt sends nothing anywhere."""
    names = Names({"receiver.example": answer})
    sender = WebhookSender(store, DeliveryPolicy(timeout_s=5.0, lookup=names))
    url = f"https://receiver.example:{receiver.port}/hook"
    try:
        refused = await sender.post(url, [signing.new_secret()], "job-x", b"{}")
    finally:
        await sender.close()
    assert (
        refused.error
        == "refused: host 'receiver.example' does not resolve to public addresses only"
    )
    assert receiver.hosts == []


async def test_every_public_address_of_a_name_is_kept_in_the_resolvers_order():
    names = Names({"receiver.example": ["8.8.8.8", "2606:4700:4700::1111", "8.8.8.8"]})
    target = ssrf.parse("https://receiver.example/hook", allow_hosts=())
    addresses = await ssrf.resolve(target, lookup=names)
    expected = [ipaddress.ip_address(a) for a in ("8.8.8.8", "2606:4700:4700::1111")]
    assert addresses == expected


async def test_an_attempt_a_stop_cut_does_not_take_a_step_of_the_retry_schedule(store):
    """The schedule's place was the attempt's number, which counts attempts cut by a
    stop or a restart before they were recorded: each skipped a step (the 30 s retry
    came after 2 min), and a few ended the round in DEAD_LETTER after one real try."""
    names = Names({RECEIVER_HOST: [DOWN_ADDRESS]})
    policy = DeliveryPolicy(
        allow_hosts=(RECEIVER_HOST,), timeout_s=5.0, lookup=names, schedule_s=(100, 10_000)
    )
    sender = WebhookSender(store, policy)
    job_id = await _ended_job_with_webhook(store, f"http://{RECEIVER_HOST}:9/hook")
    try:
        assert await store.next_attempt(job_id) == 1  # an attempt a stop cut: never recorded
        await sender.deliver(job_id)  # attempt 2, the round's first that ends: it fails
    finally:
        await sender.close()
        await store.redis.zrem(jobstore.HOOKS_KEY, job_id)
    record = await store.get(job_id)
    assert record is not None and record.get("webhook_state") == jobstore.HOOK_RETRYING
    wait_s = (record.number("webhook_next_ms") - now_ms()) / 1000
    assert 70 < wait_s <= 120, wait_s  # the schedule's first step (100 s +-20%), not its second
