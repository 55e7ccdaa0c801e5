"""Shadow pairs in real Redis: both sides of a pair meet by request id, and the store
stays bounded by count and by age whatever the traffic."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.router.shadow_pairs import (
    LIVE,
    SHADOW,
    PairStore,
    Record,
    index_key,
    records_key,
)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def model_name() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


async def test_a_pair_is_complete_once_both_sides_wrote(client: aioredis.Redis) -> None:
    store, model = PairStore(client), model_name()
    await store.write(model, "r1", LIVE, Record("1", "stop", ttft_ms=5.0), 1000)
    await store.write(model, "r2", LIVE, Record("1", "stop"), 1001)
    assert await store.pairs(model, 0) == []  # no shadow side yet
    await store.write(model, "r1", SHADOW, Record("2", "error"), 1500)
    (pair,) = await store.pairs(model, 0)
    assert pair.request_id == "r1"
    assert pair.live == Record("1", "stop", ttft_ms=5.0) and pair.shadow.finish_reason == "error"
    assert await store.pairs(model, 1001) == []  # the window starts at the pair's first record


async def test_the_store_keeps_at_most_max_pairs_and_drops_aged_ones(
    client: aioredis.Redis,
) -> None:
    store, model = PairStore(client, max_pairs=5, retention_s=100), model_name()
    for n in range(12):
        await store.write(model, f"r{n}", LIVE, Record("1", "stop"), 10_000 + n)
        await store.write(model, f"r{n}", SHADOW, Record("2", "stop"), 10_000 + n)
    assert await client.zcard(index_key(model)) == 5
    assert await client.hlen(records_key(model)) == 10
    assert [p.request_id for p in await store.pairs(model, 0)] == [f"r{n}" for n in range(7, 12)]
    # 100 s later, one more pair drops every pair older than the retention.
    await store.write(model, "late", LIVE, Record("1", "stop"), 10_000 + 100_000 + 20)
    await store.write(model, "late", SHADOW, Record("2", "stop"), 10_000 + 100_000 + 20)
    assert await client.zrange(index_key(model), 0, -1) == [b"late"]
    assert await client.hlen(records_key(model)) == 2
    assert 0 < await client.pttl(records_key(model)) <= 100_000
