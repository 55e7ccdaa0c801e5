"""Which models a respond-async Complete is refused for: those nothing knows.

A real Redis holds the router's catalogue and worker registry as the router
writes them. A model the catalogue has waits for its workers (they may be
restarting); only a name neither the catalogue nor a routable worker knows is
refused (its job waited for a worker until its window ended).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from services.jobs.workers import unknown_model
from services.router.catalog import CATALOG_KEY, ModelEntry, VersionEntry
from services.router.registry import DRAINING, WORKERS_KEY, WorkerEntry


async def test_only_a_model_neither_catalogued_nor_served_is_unknown(own_redis: str) -> None:
    client = aioredis.from_url(own_redis)
    try:
        now = time.time()
        catalogued = ModelEntry("catalogued", versions=(VersionEntry("1", 100),))
        await client.hset(CATALOG_KEY, "catalogued", catalogued.to_json())
        workers = (
            WorkerEntry("w0", "127.0.0.1", 7001, (("served", "2"),), lease_expires_at=now + 600),
            # Not routable: its lease ran out, or it drains.
            WorkerEntry("w1", "127.0.0.1", 7002, (("expired", "1"),), lease_expires_at=now - 1),
            WorkerEntry(
                "w2", "127.0.0.1", 7003, (("draining", "1"),), DRAINING, lease_expires_at=now + 600
            ),
        )
        for worker in workers:
            await client.hset(WORKERS_KEY, worker.worker_id, worker.to_json())
        # Catalogued with no worker now (restarting): its items wait for one.
        assert not await unknown_model(client, "catalogued")
        assert not await unknown_model(client, "served")  # a worker serves it, uncatalogued
        assert await unknown_model(client, "expired")
        assert await unknown_model(client, "draining")
        assert await unknown_model(client, "nope")
    finally:
        await client.aclose()
