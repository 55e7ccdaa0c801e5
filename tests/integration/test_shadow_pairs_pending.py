"""Shadow pairs in real Redis at a low shadow share: the live records no copy pairs
with (most of them) wait apart, and never push complete pairs out of the store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.core.redis_service import text
from services.router.shadow_pairs import (
    LIVE,
    MAX_PAIRS,
    SHADOW,
    PairStore,
    Record,
    index_key,
    records_key,
)

BATCH = 16  # writes in flight at once (within the pool's connections)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def model_name() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


async def write_pair(store: PairStore, model: str, request_id: str, now_ms: int) -> None:
    await store.write(model, request_id, LIVE, Record("1", "stop"), now_ms)
    await store.write(model, request_id, SHADOW, Record("2", "stop"), now_ms + 5)


async def test_live_records_without_a_copy_do_not_push_pairs_out(client: aioredis.Redis) -> None:
    store, model = PairStore(client), model_name()
    for n in range(100):
        await write_pair(store, model, f"pair-{n}", 1_000_000 + n)
    # A 1% shadow: the next 10,000 live requests were not mirrored (the edge marks them
    # all as shadowed; only Envoy knows which it copied).
    for start in range(0, 10_000, BATCH):
        await asyncio.gather(
            *(
                store.write(model, f"live-{n}", LIVE, Record("1", "stop"), 1_000_100 + n)
                for n in range(start, start + BATCH)
            )
        )
    await write_pair(store, model, "pair-100", 1_010_100)
    found = await store.pairs(model, 0)
    assert len(found) == 101
    assert {p.request_id for p in found} == {f"pair-{n}" for n in range(101)}
    assert await client.zcard(index_key(model)) == 101 <= MAX_PAIRS


async def test_unpaired_records_are_bounded_by_count_and_by_age(client: aioredis.Redis) -> None:
    store = PairStore(client, max_pairs=5, retention_s=1000, max_pending=3, pending_s=10)
    model = model_name()
    await write_pair(store, model, "kept", 100_000)
    for n in range(6):
        await store.write(model, f"live-{n}", LIVE, Record("1", "stop"), 100_000 + n)
    # The newest 3 unpaired records wait; the pair is untouched.
    assert await client.hlen(records_key(model)) == 2 + 3
    # A copy whose live record was dropped pairs with nothing, and waits itself.
    await store.write(model, "live-0", SHADOW, Record("2", "stop"), 100_010)
    # The copy of a waiting live record completes its pair.
    await store.write(model, "live-5", SHADOW, Record("2", "stop"), 100_020)
    assert [p.request_id for p in await store.pairs(model, 0)] == ["kept", "live-5"]
    # Past PENDING_S every unpaired record is gone; the pairs stay (their retention is
    # longer), and a pair's window time is its first record's.
    await write_pair(store, model, "later", 100_000 + 11_000)
    assert [p.request_id for p in await store.pairs(model, 100_006)] == ["later"]
    assert await client.hlen(records_key(model)) == 6
    assert {text(field) for field in await client.hkeys(records_key(model))} == {
        f"{i}|{role}" for i in ("kept", "live-5", "later") for role in ("live", "shadow")
    }
