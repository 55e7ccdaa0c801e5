"""A worker's id stays its own after its lease lapses (a crash, a restart).

Every worker holds the shared `worker` certificate; a lease token tells them apart,
but only while the lease lasted: once a crashed worker's lease lapsed, any worker
registered its id from its own address, took its traffic, and kept the restarted
worker out (WORKER_ID_IN_USE) for as long as it renewed. Real Redis.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis.asyncio as aioredis

from services.core.errors import AlreadyExists, InvalidArgument
from services.router.registry import LEFT_KEY_PREFIX, MAX_MODELS, WorkerRegistry

MODELS = [("m", "1")]
TOKEN, ROGUE, LOST = "a" * 43, "b" * 43, "c" * 43


@pytest.fixture
async def registry(redis_url):
    client = aioredis.from_url(redis_url)
    yield WorkerRegistry(client, lease_s=3.0)
    await client.aclose()


async def test_a_lapsed_registration_is_taken_back_only_by_its_worker(registry):
    worker = f"w-{uuid.uuid4().hex[:8]}"
    now = time.time()
    await registry.register(worker, "10.0.0.1:7000", MODELS, now, TOKEN)
    lapsed = now + 10  # its lease ran out: the worker crashed
    with pytest.raises(AlreadyExists) as refused:
        await registry.register(worker, "10.0.0.9:7000", MODELS, lapsed, ROGUE)
    assert refused.value.reason == "WORKER_ID_IN_USE"
    # The worker again: with its token from anywhere, or from its host without it
    # (a restart that lost its token file).
    await registry.register(worker, "10.0.0.2:7000", MODELS, lapsed, TOKEN)
    await registry.register(worker, "10.0.0.2:7001", MODELS, lapsed + 10, LOST)
    assert (await registry.get(worker)).address == "10.0.0.2:7001"


async def test_a_forgotten_registration_leaves_its_id_bound_for_a_day(registry):
    worker = f"w-{uuid.uuid4().hex[:8]}"
    now = time.time()
    await registry.register(worker, "10.0.0.1:7000", MODELS, now, TOKEN)
    listed = await registry.all(now + 3600, forget=True)  # long gone: forgotten
    assert worker not in {w.worker_id for w in listed}
    ttl = await registry.redis.ttl(LEFT_KEY_PREFIX + worker)
    assert 86000 < ttl <= 86400
    with pytest.raises(AlreadyExists):
        await registry.register(worker, "10.0.0.9:7000", MODELS, now + 3600, ROGUE)
    await registry.register(worker, "10.0.0.1:7000", MODELS, now + 3600, LOST)  # its host


async def test_a_registration_without_a_token_leaves_its_id_free(registry):
    worker = f"w-{uuid.uuid4().hex[:8]}"
    now = time.time()
    await registry.register(worker, "10.0.0.1:7000", MODELS, now)
    await registry.register(worker, "10.0.0.9:7000", MODELS, now + 10, ROGUE)


async def test_a_worker_names_at_most_max_models(registry):
    many = [(f"m{i}", "1") for i in range(MAX_MODELS + 1)]
    with pytest.raises(InvalidArgument, match=f"at most {MAX_MODELS}"):
        await registry.register(f"w-{uuid.uuid4().hex[:8]}", "10.0.0.1:7000", many, time.time())


async def test_a_live_registration_is_taken_only_with_its_pools_certificate(registry):
    # A registration made without a lease token is told apart by its host only: a
    # process of another pool on that host took it over, pool and all.
    worker = f"w-{uuid.uuid4().hex[:8]}"
    now = time.time()
    await registry.register(worker, "10.0.0.1:7000", MODELS, now, pool="gpu")
    with pytest.raises(AlreadyExists) as refused:
        await registry.register(worker, "10.0.0.1:7000", MODELS, now + 1, pool="")
    assert refused.value.reason == "WORKER_ID_IN_USE"
    await registry.register(worker, "10.0.0.1:7000", MODELS, now + 1, pool="gpu")
    assert (await registry.get(worker)).pool == "gpu"
    # With its lease token, it is the worker itself, restarted with another pool's
    # certificate (moved to a pool): taken over at once, not after its lease.
    tokened = f"w-{uuid.uuid4().hex[:8]}"
    await registry.register(tokened, "10.0.0.1:7001", MODELS, now, TOKEN, pool="")
    await registry.register(tokened, "10.0.0.1:7001", MODELS, now + 1, TOKEN, pool="gpu")
    assert (await registry.get(tokened)).pool == "gpu"
