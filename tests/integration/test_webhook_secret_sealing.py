"""Webhook signing secrets in the jobs Redis: sealed, and still read when stored plain."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from services.jobs import signing
from services.jobs.secret_box import SecretBox, SecretUnreadable
from services.jobs.store import JobRecord, JobStore, secret_key
from services.jobs.webhooks import DeliveryPolicy, WebhookSender

BOX = SecretBox(bytes(range(32)))


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
