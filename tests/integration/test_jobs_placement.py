"""Where job items run: the catalogue's traffic split, read from a real Redis."""

from __future__ import annotations

import collections
import time
import uuid

import redis.asyncio as aioredis

from services.jobs.workers import WorkerDirectory, weighted_draw
from services.router.catalog import CATALOG_KEY, ModelEntry, VersionEntry
from services.router.registry import WORKERS_KEY, WorkerEntry


def test_a_weighted_draw_keeps_each_key_and_gives_each_version_its_share():
    weights = {"1": 90, "2": 10}
    drawn = collections.Counter(weighted_draw(weights, f"job-x:{i}") for i in range(4000))
    assert set(drawn) == {"1", "2"}
    assert 0.08 < drawn["2"] / 4000 < 0.12
    assert all(
        weighted_draw(weights, f"job-x:{i}") == weighted_draw(weights, f"job-x:{i}")
        for i in range(50)
    )
    assert {weighted_draw({"3": 7}, str(i)) for i in range(20)} == {"3"}


async def test_items_follow_the_split_and_pins_and_aliases(redis_url):
    client = aioredis.from_url(redis_url)
    model = f"placed-{uuid.uuid4().hex[:6]}"
    entry = ModelEntry(
        model,
        versions=(VersionEntry("1", 90), VersionEntry("2", 10), VersionEntry("3", 0)),
        aliases={"stable": "1", "candidate": "2"},
    )
    # Version 3 is the newest on `both`, which would run it for an unpinned item.
    workers = {
        f"{model}-both": ((model, "1"), (model, "3")),
        f"{model}-canary": ((model, "2"),),
    }
    try:
        await client.hset(CATALOG_KEY, model, entry.to_json())
        for port, (worker_id, models) in enumerate(workers.items(), start=7001):
            worker = WorkerEntry(
                worker_id, "127.0.0.1", port, models, lease_expires_at=time.time() + 600
            )
            await client.hset(WORKERS_KEY, worker_id, worker.to_json())
        directory = WorkerDirectory(client)
        placed = [await directory.pick((model, ""), f"job-{model}:{i}") for i in range(400)]
        versions = collections.Counter(p.version for p in placed if p is not None)
        assert set(versions) == {"1", "2"} and 20 <= versions["2"] <= 60  # ~10% of 400
        assert all(
            p is not None and p.address.endswith(":7002") for p in placed if p and p.version == "2"
        )
        again = await directory.pick((model, ""), f"job-{model}:0")
        assert again is not None and again.version == placed[0].version  # a retry draws the same

        pinned = await directory.pick((model, "3"), "k")
        assert pinned is not None and pinned.version == "3" and pinned.address.endswith(":7001")
        alias = await directory.pick((model, "stable"), "k")
        assert alias is not None and alias.version == "1"

        # The canary's only worker leaves: its share goes to what is served.
        await client.hdel(WORKERS_KEY, f"{model}-canary")
        directory = WorkerDirectory(client)
        left = [await directory.pick((model, ""), f"k{i}") for i in range(50)]
        assert collections.Counter(p.version if p else None for p in left) == {"1": 50}
        # A model the catalogue does not know runs where it is served, the worker choosing.
        unknown = await directory.pick((f"{model}-uncatalogued", ""), "k")
        assert unknown is None
        # A catalogued version (or its alias) whose workers are away waits for them, as
        # the edge's route to its cluster does: sent to another version's worker under
        # its label, the item failed NOT_FOUND for good.
        assert await directory.pick((model, "2"), "k") is None
        assert await directory.pick((model, "candidate"), "k") is None
        # A version the catalogue does not know still goes to a worker of the model.
        made_up = await directory.pick((model, "9"), "k")
        assert made_up is not None and made_up.version == "9"
    finally:
        await client.hdel(CATALOG_KEY, model)
        await client.hdel(WORKERS_KEY, *workers)
        await client.aclose()
