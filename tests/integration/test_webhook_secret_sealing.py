"""Webhook signing secrets in the jobs Redis: sealed, still read when stored plain, and
sealed again under a new key when the sealing key rotates."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis.asyncio as aioredis
import standardwebhooks

from services.core.errors import FailedPrecondition
from services.jobs import signing
from services.jobs.secret_box import SecretBox, SecretUnreadable
from services.jobs.store import JobRecord, JobStore, now_ms, secret_key
from services.jobs.webhooks import DeliveryPolicy, WebhookSender
from services.launcher.mesh import REPO_ROOT
from tests.conftest import private_db_url
from tests.webhook_receivers import Receiver

BOX = SecretBox(bytes(range(32)))
OLD, NEW = bytes(range(32)), bytes(range(32, 64))
RESEAL_DB = 11  # reseal walks every stored secret: a database of its own
DAY_MS = 86_400_000


@pytest.fixture
async def client(redis_url):
    redis = aioredis.from_url(redis_url)
    yield redis
    await redis.aclose()


async def test_redis_holds_no_secret_a_replica_with_the_key_signs_with(client):
    store, key_id = JobStore(client, 3600, BOX), f"key_{uuid.uuid4().hex[:8]}"
    secret = signing.new_secret()
    assert await store.create_secret(key_id, secret)
    stored = await client.hgetall(secret_key(key_id))
    assert secret.encode() not in b"".join(stored.values())
    assert await store.has_secret(key_id)
    assert await store.secrets_in_use(key_id) == [secret]


async def test_a_plain_secret_from_before_is_read_and_a_rotation_seals_the_new_one(client):
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    old = signing.new_secret()
    assert await JobStore(client, 3600).create_secret(key_id, old)  # sealing was off
    store = JobStore(client, 3600, BOX)
    assert await store.secrets_in_use(key_id) == [old]
    new = signing.new_secret()
    await store.rotate_secret(key_id, new, overlap_ms=60_000)
    assert await store.secrets_in_use(key_id) == [new, old]  # both sign during the overlap
    current = (await client.hget(secret_key(key_id), "current")).decode()
    assert new not in current


async def test_a_replica_without_the_key_refuses_a_sealed_secret(client):
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    await JobStore(client, 3600, BOX).create_secret(key_id, signing.new_secret())
    with pytest.raises(SecretUnreadable):
        await JobStore(client, 3600).secrets_in_use(key_id)
    with pytest.raises(SecretUnreadable):
        await JobStore(client, 3600, SecretBox(bytes(32))).secrets_in_use(key_id)


async def test_an_unreadable_secret_fails_the_attempt_with_a_reason_not_a_crash(client):
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    await JobStore(client, 3600, SecretBox(bytes(32))).create_secret(key_id, signing.new_secret())
    sender = WebhookSender(JobStore(client, 3600, BOX), DeliveryPolicy())
    try:
        record = JobRecord("job-x", {"owner": key_id, "webhook_url": "https://example.com/h"})
        answer = await sender._signed_post(record, "job-x", b"{}")
    finally:
        await sender.close()
    assert not answer.delivered
    assert answer.error == "the key's webhook secret cannot be read; rotate it"


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


async def _four_rotated(store: JobStore, key_id: str) -> list[str]:
    """A key's first secret and three rotations within a day: its secrets, newest first."""
    secrets = [signing.new_secret()]
    assert await store.create_secret(key_id, secrets[0])
    for _ in range(3):
        secrets.insert(0, signing.new_secret())
        await store.rotate_secret(key_id, secrets[0], overlap_ms=DAY_MS)
    return secrets


async def test_a_second_rotation_within_the_overlap_keeps_the_first_secret_signing(client):
    """The one "previous" slot was overwritten: the secret receivers still verified
    with stopped signing at the second rotation, the loss the overlap is for."""
    store, key_id = JobStore(client, 3600, BOX), f"key_{uuid.uuid4().hex[:8]}"
    first, second, third = (signing.new_secret() for _ in range(3))
    await store.create_secret(key_id, first)
    await store.rotate_secret(key_id, second, overlap_ms=DAY_MS)
    await store.rotate_secret(key_id, third, overlap_ms=DAY_MS)
    assert await store.secrets_in_use(key_id) == [third, second, first]


async def test_a_rotation_that_would_keep_a_fourth_overlapping_secret_is_refused(client):
    store, key_id = JobStore(client, 3600, BOX), f"key_{uuid.uuid4().hex[:8]}"
    secrets = await _four_rotated(store, key_id)
    assert await store.secrets_in_use(key_id) == secrets
    with pytest.raises(FailedPrecondition) as refused:
        await store.rotate_secret(key_id, signing.new_secret(), overlap_ms=DAY_MS)
    assert refused.value.reason == "WEBHOOK_SECRET_OVERLAPS"
    assert "overlap 0s" in refused.value.message
    assert await store.secrets_in_use(key_id) == secrets  # nothing changed

    # Overlap 0 ends the current secret at once: the three earlier ones sign on.
    latest = signing.new_secret()
    await store.rotate_secret(key_id, latest, overlap_ms=0)
    assert await store.secrets_in_use(key_id) == [latest, *secrets[1:]]


async def test_a_replaced_secret_whose_overlap_ended_is_dropped_at_the_next_rotation(client):
    store, key_id = JobStore(client, 3600, BOX), f"key_{uuid.uuid4().hex[:8]}"
    secrets = await _four_rotated(store, key_id)
    await client.hset(secret_key(key_id), "previous_until_ms:2", now_ms() - 1)  # the first's
    assert await store.secrets_in_use(key_id) == secrets[:3]
    latest = signing.new_secret()
    await store.rotate_secret(key_id, latest, overlap_ms=DAY_MS)  # room again: not refused
    assert await store.secrets_in_use(key_id) == [latest, *secrets[:3]]


async def test_rotating_a_secret_no_key_opens_signs_with_the_new_one_at_once(client, receiver):
    """The runbook's advice for a secret sealed under a lost key is to rotate it: the
    rotation kept the unreadable secret to sign beside the new one for the overlap
    (24 h by default), and every delivery failed ("rotate it") until it ended, its
    retries (about 23.7 h) with it."""
    key_id = f"key_{uuid.uuid4().hex[:8]}"
    await JobStore(client, 3600, SecretBox(OLD)).create_secret(key_id, signing.new_secret())
    store = JobStore(client, 3600, SecretBox(NEW))  # OLD is lost
    new = signing.new_secret()
    await store.rotate_secret(key_id, new, overlap_ms=DAY_MS)
    assert await store.secrets_in_use(key_id) == [new]

    sender = WebhookSender(store, DeliveryPolicy(allow_hosts=("127.0.0.1",)))
    url = f"http://127.0.0.1:{receiver.port}/hook"
    try:
        record = JobRecord("job-x", {"owner": key_id, "webhook_url": url})
        answer = await sender._signed_post(record, "job-x", b'{"type":"job.succeeded"}')
    finally:
        await sender.close()
    assert (answer.http_status, answer.error) == (204, "")
    (received,) = receiver.received
    assert standardwebhooks.Webhook(new).verify(received.body, received.headers)


@pytest.fixture
async def own_db(redis_url):
    """A private, empty database (reseal scans every key's secrets)."""
    url = private_db_url(redis_url, RESEAL_DB)
    redis = aioredis.from_url(url)
    await redis.flushdb()
    yield url, redis
    await redis.flushdb()
    await redis.aclose()


async def _three_keys(client: aioredis.Redis) -> dict[str, list[str]]:
    """Stores secrets the way they look before a rotation of the sealing key: one
    key sealed under OLD, one rotated (current and previous under OLD), one plain."""
    old, plain = JobStore(client, 3600, SecretBox(OLD)), JobStore(client, 3600)
    secrets = {f"key_{n}": [signing.new_secret()] for n in range(3)}
    await old.create_secret("key_0", secrets["key_0"][0])
    await old.create_secret("key_1", secrets["key_1"][0])
    rotated = signing.new_secret()
    await old.rotate_secret("key_1", rotated, overlap_ms=3_600_000)
    secrets["key_1"].insert(0, rotated)
    await plain.create_secret("key_2", secrets["key_2"][0])
    return secrets


async def test_a_new_sealing_key_reads_old_secrets_and_reseal_moves_them_to_it(own_db):
    _, client = own_db
    secrets = await _three_keys(client)
    rotating = JobStore(client, 3600, SecretBox(NEW, previous=[OLD]))
    for key_id, expected in secrets.items():  # replicas keep signing during the rotation
        assert await rotating.secrets_in_use(key_id) == expected

    done = await rotating.reseal_secrets()
    assert (done.checked, done.resealed, done.unreadable) == (4, 4, [])
    new_only = JobStore(client, 3600, SecretBox(NEW))  # the old key is gone
    for key_id, expected in secrets.items():
        assert await new_only.secrets_in_use(key_id) == expected
    with pytest.raises(SecretUnreadable):
        await JobStore(client, 3600, SecretBox(OLD)).secrets_in_use("key_0")
    assert (await rotating.reseal_secrets()).resealed == 0  # a second run has nothing to do


async def test_reseal_never_overwrites_a_secret_changed_since_it_read_it(own_db):
    _, client = own_db
    store = JobStore(client, 3600, SecretBox(NEW, previous=[OLD]))
    await JobStore(client, 3600, SecretBox(OLD)).create_secret("key_0", signing.new_secret())
    read = (await client.hget(secret_key("key_0"), "current")).decode()
    rotated = signing.new_secret()
    await store.rotate_secret("key_0", rotated, overlap_ms=0)  # lands between read and write
    replaced = await store._reseal_secret(
        keys=[secret_key("key_0")], args=["current", read, SecretBox(NEW).seal("x", "key_0")]
    )
    assert replaced == 0
    assert await store.secrets_in_use("key_0") == [rotated]


async def test_a_secret_no_key_opens_is_reported_and_left_as_it_is(own_db):
    _, client = own_db
    await JobStore(client, 3600, SecretBox(bytes(32))).create_secret("key_9", "whsec_x")
    before = await client.hgetall(secret_key("key_9"))
    done = await JobStore(client, 3600, SecretBox(NEW, previous=[OLD])).reseal_secrets()
    assert (done.resealed, done.unreadable) == (0, ["key_9"])
    assert await client.hgetall(secret_key("key_9")) == before


async def test_reseal_does_not_report_a_key_rotated_away_from_a_lost_sealing_key(own_db):
    """Rotated with the default overlap, the unreadable secret was kept (and reseal
    listed the key, exit 1); rotated with overlap 0, reseal still listed it for good,
    from the expired "previous" slot, though deliveries worked."""
    _, client = own_db
    lost = JobStore(client, 3600, SecretBox(bytes(32)))
    store = JobStore(client, 3600, SecretBox(NEW, previous=[OLD]))
    for key_id, overlap_ms in (("key_7", DAY_MS), ("key_8", 0)):
        await lost.create_secret(key_id, signing.new_secret())
        await store.rotate_secret(key_id, signing.new_secret(), overlap_ms=overlap_ms)
    # As a rotation from before this fix left one: the unreadable secret kept, expired.
    await lost.create_secret("key_9", signing.new_secret())
    unreadable = (await client.hget(secret_key("key_9"), "current")).decode()
    await client.hset(
        secret_key("key_9"),
        mapping={
            "current": SecretBox(NEW).seal(signing.new_secret(), "key_9"),
            "previous": unreadable,
            "previous_until_ms": now_ms() - 1,
        },
    )
    done = await store.reseal_secrets()
    assert (done.checked, done.resealed, done.unreadable) == (3, 0, [])


def _reseal_cli(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.jobs.reseal"],
        env={**os.environ, "REDIS_URL": url, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_reseal_command_reports_its_work_and_fails_on_what_it_cannot_open(
    own_db, tmp_path
):
    url, client = own_db
    await _three_keys(client)
    keys = {
        "TOKENMESH_WEBHOOK_SECRETS_KEY": NEW.hex(),
        "TOKENMESH_WEBHOOK_SECRETS_PREVIOUS_KEYS": OLD.hex(),
    }
    done = _reseal_cli(url, **keys)
    assert done.returncode == 0, done.stderr
    assert "4 secrets open, 4 sealed again" in done.stdout

    await JobStore(client, 3600, SecretBox(bytes(32))).create_secret("key_9", "whsec_x")
    failed = _reseal_cli(url, **keys)
    assert failed.returncode == 1
    assert "key_9" in failed.stdout and "Traceback" not in failed.stderr

    # A key file that does not exist is never created here: a key only this run
    # knew would seal secrets no replica can open.
    missing = tmp_path / "no-such-key"
    refused = _reseal_cli(url, TOKENMESH_WEBHOOK_SECRETS_KEY_FILE=str(missing))
    assert refused.returncode == 2 and not missing.exists()
