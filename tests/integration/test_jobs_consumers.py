"""The runners' consumer group over a real Redis: consumers of replicas that are gone
(idle long, nothing pending) are deleted; one with pending entries never is."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from services.core.redis_service import text
from services.jobs import store as jobstore
from services.jobs.runner import Runner
from services.jobs.store import JobStore
from tests.conftest import private_db_url

# The runner tests' database: the session mesh's runners (database 0) join every lane.
PRIVATE_DB = 10
IDLE_S = 0.3


async def _consumers(client: aioredis.Redis, stream: str) -> dict[str, dict[str, Any]]:
    raw: Any = await client.xinfo_consumers(stream, jobstore.GROUP)
    return {text(c["name"]): c for c in raw}


async def _wait_idle(client: aioredis.Redis, stream: str, name: str, idle_s: float) -> None:
    deadline = time.monotonic() + 10
    while (await _consumers(client, stream))[name]["idle"] < idle_s * 1000:
        assert time.monotonic() < deadline, f"{name} never became idle"
        await asyncio.sleep(0.05)


async def _read_one(client: aioredis.Redis, stream: str, name: str, finish: bool) -> None:
    """A replica reads an item (it joins the group); `finish`: and acknowledges it."""
    await client.xadd(stream, {"job": "j", "i": "0"})
    reply: Any = await client.xreadgroup(jobstore.GROUP, name, {stream: ">"}, count=1)
    if finish:
        await client.xack(stream, jobstore.GROUP, reply[0][1][0][0])


async def test_consumers_of_replicas_gone_are_deleted_but_never_one_with_pending_entries(
    redis_url,
):
    """Each replica joins every lane's group as its host name (a pod's, new at each
    deploy), and nothing deleted a consumer: XINFO CONSUMERS grew without bound."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    store = JobStore(client, 3600)
    lane = f"lane-{uuid.uuid4().hex[:6]}"
    stream = jobstore.work_stream(lane)
    runner = Runner(store, None, "replica-self", 1, 1, claim_idle_s=30)  # runs no item
    runner.dead_consumer_idle_s = IDLE_S
    try:
        await client.sadd(jobstore.LANES_KEY, lane)
        await store.ensure_group(stream)
        await _read_one(client, stream, "pod-with-work", finish=False)
        for name in ("pod-gone", "replica-self"):
            await _read_one(client, stream, name, finish=True)
        for name in ("pod-gone", "pod-with-work", "replica-self"):
            await _wait_idle(client, stream, name, IDLE_S)
        await _read_one(client, stream, "pod-live", finish=True)  # busy now

        await runner.trim()

        consumers = await _consumers(client, stream)
        assert sorted(consumers) == ["pod-live", "pod-with-work", "replica-self"]
        assert consumers["pod-with-work"]["pending"] == 1  # still there to be taken over
    finally:
        await client.delete(stream)
        await client.srem(jobstore.LANES_KEY, lane)
        await client.aclose()
