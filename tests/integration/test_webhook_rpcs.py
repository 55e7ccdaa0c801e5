"""Webhook URL checks, secrets and deliveries through the real jobs service: its RPCs
over mTLS as the edge calls them, its own webhook sender, a real Redis, and real
HTTP receivers on 127.0.0.1.

Only the operating system's resolver is the test's: `socket.getaddrinfo` is
replaced by names that answer at once and names whose DNS never answers (an
authoritative server that drops queries, which the system's resolver waits on
for its own timeouts and retries)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
import standardwebhooks
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core import contract, identity
from services.core.server import serving
from services.jobs import signing, ssrf
from services.jobs import store as jobstore
from services.jobs.secret_box import SecretBox
from services.jobs.service import JobsService, JobsSettings
from services.jobs.store import JobStore, NewJob, Owner, now_ms
from tests import mtls
from tests.integration.conftest import catalogue
from tests.webhook_receivers import Receiver
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as pb

OLD_KEY, SEALING_KEY = bytes(range(32)), bytes(range(32, 64))
VICTIM_HOST = "hooks.victim.test"  # allow-listed: its receiver is on 127.0.0.1
WAIT_S = 30.0  # a deadline for conditions, far past what they need
# The sender's timeout: an attempt at a hung name ends after it (tests wait for that),
# and a quick receiver's attempt, lookup on a thread and all, must end well within it
# on a loaded CI machine (at 1 s, a starved thread or event loop once failed a
# delivery to a receiver that was never slow: "does not resolve", or "timeout").
WEBHOOK_TIMEOUT_S = 5.0
# More hung lookups than the loop's default executor has threads (min(32, CPUs + 4)),
# which they all used to wait in, and more than one claim of the sender (16).
ATTACKS = min(32, (os.cpu_count() or 1) + 4) + 16


class Dns:
    """Stands in for the system's resolver (socket.getaddrinfo): names under
    .slow.test never answer until released; `answers` answer at once; other .test
    names do not exist; anything else goes to the real resolver."""

    def __init__(self, real: Any, answers: dict[str, str]) -> None:
        self.real = real
        self.answers = answers
        self.released = threading.Event()
        self.hanging = 0  # lookups waiting on a slow name now
        self._lock = threading.Lock()

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".slow.test"):
            with self._lock:
                self.hanging += 1
            try:
                self.released.wait(120)  # bounded: a run that forgot still ends
            finally:
                with self._lock:
                    self.hanging -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host in self.answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.answers[host], port))]
        if host.endswith(".test"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.real(host, port, *args, **kwargs)


@pytest.fixture
async def dns(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Dns]:
    fake = Dns(
        socket.getaddrinfo,
        {VICTIM_HOST: "127.0.0.1", "public.test": "93.184.216.34", "internal.test": "10.1.2.3"},
    )
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.released.set()
    # The hung lookups' threads return now; the next test starts with every slot free.
    deadline = time.monotonic() + WAIT_S
    while getattr(ssrf.system_lookup, "in_flight", 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
async def jobs(own_redis: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service in this process (webhook timeout WEBHOOK_TIMEOUT_S), and a
    channel to it as the edge."""
    settings = JobsSettings(
        redis_url=own_redis,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"webhooks-{uuid.uuid4().hex[:6]}",
        webhook_allow_hosts=("127.0.0.1", VICTIM_HOST),
        webhook_timeout_s=WEBHOOK_TIMEOUT_S,
        webhook_poll_s=0.05,
        webhook_secrets_key=SEALING_KEY.hex(),
    )
    await catalogue(own_redis, "m")  # no worker serves it: its items wait
    service = JobsService(settings)
    async with serving(service, settings) as server:
        target = f"127.0.0.1:{server.port}"
        async with identity.secure_channel(
            target, mtls.files(contract.EDGE), contract.JOBS
        ) as channel:
            yield service, channel


def _key() -> tuple[str, tuple[tuple[str, str], ...]]:
    """A key of its own and the headers the edge sends for it."""
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    headers = {contract.KEY_ID_HEADER: key_id, contract.SCOPES_HEADER: contract.ADMIN_SCOPE}
    return key_id, tuple(headers.items())


def _create_job(url: str) -> pb.CreateJobRequest:
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    return pb.CreateJobRequest(items=[item], webhook_url=url)


async def _ended_job(store: JobStore, key_id: str, url: str) -> str:
    """A job of `key_id` that ended: its webhook is due now."""
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    job = NewJob(Owner(key_id, "", {}), [item], url, {}, "", now_ms() + 600_000)
    job_id, _ = await store.create(job)
    assert await store.end(job_id, jobstore.CANCELLED)
    return job_id


async def _first_attempt(store: JobStore, job_id: str) -> jobs_pb2.WebhookAttempt:
    deadline = time.monotonic() + WAIT_S
    while not (attempts := await store.attempts(job_id)):
        assert time.monotonic() < deadline, f"no attempt at {job_id}'s webhook"
        await asyncio.sleep(0.02)
    return attempts[0]


async def _attempted(store: JobStore, job_ids: list[str], count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while sum([len(await store.attempts(j)) > 0 for j in job_ids]) < count:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def _refusal(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    """A failed call's code, ErrorInfo reason and BadRequest descriptions."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, descriptions = "", []
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            descriptions += [v.description for v in bad.field_violations]
    return error.code(), reason, descriptions


async def test_a_key_s_hung_webhook_names_leave_other_keys_checks_and_deliveries_alone(
    jobs, dns, receiver
):
    """A key whose webhook names never answer (its own authoritative server drops
    queries) held every thread of the loop's default executor after `wait_for` gave
    up: every other key's CreateJob with a webhook was refused ("does not resolve",
    a permanent-looking INVALID_ARGUMENT), its deliveries failed, and
    asyncio.to_thread waited, for as long as the system's resolver tried."""
    service, channel = jobs
    store = service.store
    attacker = f"key_{uuid.uuid4().hex[:8]}"
    await store.create_secret(attacker, signing.new_secret())
    slow = [
        await _ended_job(store, attacker, f"https://a{n}.slow.test/hook") for n in range(ATTACKS)
    ]
    # The service's sender tried them: their lookups hang (waited for, not assumed:
    # a lookup whose thread had not started by its attempt's timeout was dropped)...
    deadline = time.monotonic() + WAIT_S
    while dns.hanging < 1:
        assert time.monotonic() < deadline, "no lookup of the attacker's names hangs"
        await asyncio.sleep(0.01)
    # ...and more of its attempts ended (WEBHOOK_TIMEOUT_S each) than it may have
    # lookups in flight, those lookups still hanging: waited for, as a later round's
    # lookups beyond its share (the regression) no longer depend on the test's pace.
    await _attempted(store, slow, 2 * ssrf.LOOKUPS_PER_OWNER)
    assert dns.hanging >= 1

    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    victim, headers = _key()
    await stub.CreateWebhookSecret(pb.CreateWebhookSecretRequest(), metadata=headers)
    url = f"http://{VICTIM_HOST}:{receiver.port}/hook"
    created = await stub.CreateJob(_create_job(url), metadata=headers)
    assert created.webhook.state == jobstore.HOOK_WAITING

    delivered = await _first_attempt(store, await _ended_job(store, victim, url))
    assert (delivered.http_status, delivered.error) == (204, "")
    await asyncio.wait_for(asyncio.to_thread(lambda: None), WAIT_S)
    # The attacker's lookups in flight are its share, not every thread.
    assert dns.hanging <= ssrf.LOOKUPS_PER_OWNER


async def test_create_job_answers_a_private_name_and_a_missing_name_alike(jobs, dns):
    """The two answers told which internal names exist (search domains apply:
    https://redis/): "resolves to a private ... address" against "does not resolve"."""
    _, channel = jobs
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    _, headers = _key()
    await stub.CreateWebhookSecret(pb.CreateWebhookSecretRequest(), metadata=headers)
    answers = []
    for host in ("internal.test", "missing.test"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateJob(_create_job(f"https://{host}/hook"), metadata=headers)
        code, reason, descriptions = _refusal(refused.value)
        answers.append((code, reason, [d.replace(host, "HOST") for d in descriptions]))
    assert answers[0] == answers[1]
    assert answers[0][:2] == (grpc.StatusCode.INVALID_ARGUMENT, "WEBHOOK_URL_REFUSED")
    assert "10.1.2.3" not in str(answers[0])


async def test_rotating_a_secret_sealed_under_a_lost_key_fixes_the_next_delivery(jobs, receiver):
    """The runbook's advice for "the key's webhook secret cannot be read; rotate it":
    the rotation kept the unreadable secret to sign beside the new one for the
    overlap (24 h by default), and every attempt failed the same way until then."""
    service, channel = jobs
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    key_id, headers = _key()
    lost = JobStore(service.redis, 3600, SecretBox(OLD_KEY))
    await lost.create_secret(key_id, signing.new_secret())

    rotated = await stub.RotateWebhookSecret(pb.RotateWebhookSecretRequest(), metadata=headers)

    job_id = await _ended_job(service.store, key_id, f"http://127.0.0.1:{receiver.port}/hook")
    attempt = await _first_attempt(service.store, job_id)
    assert (attempt.http_status, attempt.error) == (204, "")
    (received,) = receiver.received
    assert standardwebhooks.Webhook(rotated.secret).verify(received.body, received.headers)


async def test_rotations_within_the_overlap_keep_every_secret_signing_until_refused(jobs, receiver):
    """A second rotation within the overlap (the new secret, shown once, was lost)
    stopped the first secret signing at once: the receivers still verifying with it
    refused every event from then on."""
    service, channel = jobs
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    key_id, headers = _key()
    created = await stub.CreateWebhookSecret(pb.CreateWebhookSecretRequest(), metadata=headers)
    secrets = [created.secret]
    for _ in range(3):
        rotated = await stub.RotateWebhookSecret(pb.RotateWebhookSecretRequest(), metadata=headers)
        secrets.append(rotated.secret)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RotateWebhookSecret(pb.RotateWebhookSecretRequest(), metadata=headers)
    code, reason, _ = _refusal(refused.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WEBHOOK_SECRET_OVERLAPS")
    now = pb.RotateWebhookSecretRequest(overlap=duration_pb2.Duration(seconds=0))
    latest = (await stub.RotateWebhookSecret(now, metadata=headers)).secret

    job_id = await _ended_job(service.store, key_id, f"http://127.0.0.1:{receiver.port}/hook")
    attempt = await _first_attempt(service.store, job_id)
    assert attempt.http_status == 204
    (received,) = receiver.received
    assert len(received.headers["webhook-signature"].split()) == 4
    for secret in (latest, *secrets[:3]):  # the fourth secret stopped with overlap 0
        assert standardwebhooks.Webhook(secret).verify(received.body, received.headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secrets[3]).verify(received.body, received.headers)


async def test_a_key_s_create_job_checks_of_hung_names_leave_other_keys_checks_alone(jobs, dns):
    """The attack of the review: a key's concurrent CreateJob calls with webhook names
    that never answer held every lookup thread, and every other key's CreateJob with
    a webhook was refused ("does not resolve") while they hung. The key's checks now
    wait for its own lookups (UNAVAILABLE when none frees in time), and others' go on."""
    _, channel = jobs
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    _, attacker = _key()
    await stub.CreateWebhookSecret(pb.CreateWebhookSecretRequest(), metadata=attacker)
    attacks = [
        asyncio.ensure_future(
            stub.CreateJob(_create_job(f"https://c{n}.slow.test/hook"), metadata=attacker)
        )
        for n in range(ssrf.LOOKUP_THREADS + 4)
    ]
    deadline = time.monotonic() + WAIT_S
    while dns.hanging < ssrf.LOOKUPS_PER_OWNER:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    _, victim = _key()
    await stub.CreateWebhookSecret(pb.CreateWebhookSecretRequest(), metadata=victim)
    created = await stub.CreateJob(_create_job("https://public.test/hook"), metadata=victim)
    assert created.webhook.state == jobstore.HOOK_WAITING
    assert dns.hanging == ssrf.LOOKUPS_PER_OWNER

    codes = set()
    for attack in attacks:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await attack
        codes.add(refused.value.code())
    # Its looked-up names: refused at the timeout; the rest: no lookup slot, retry.
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE}
