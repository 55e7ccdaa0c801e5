"""Batched metering (services/usage/meter.py): one script call per batch of usage
events adds exactly what applying them one by one adds, replays still count
once, and a read lingers for more events. Real Redis, two private databases."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.usage import meter as meter_module
from services.usage.meter import PREFIX, Meter, Retention
from tests.conftest import private_db_url
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

# Databases of their own: the comparison reads every usage key of a database,
# and the session mesh meters into database 0 of the same Redis.
ONE_BY_ONE_DB, BATCHED_DB = 8, 9


def _client(redis_url: str, db: int) -> aioredis.Redis:
    return aioredis.from_url(private_db_url(redis_url, db))


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    pair = (_client(redis_url, ONE_BY_ONE_DB), _client(redis_url, BATCHED_DB))
    for client in pair:
        await client.flushdb()
    yield pair
    for client in pair:
        await client.flushdb()
        await client.aclose()


def _random_event(rng: random.Random, now_ms: int) -> inference_pb2.UsageEvent:
    prompt = rng.randint(1, 500)
    completion = rng.randint(0, 64)
    return inference_pb2.UsageEvent(
        request_id=uuid.uuid4().hex,
        key_id=rng.choice(["", "key_a", "key_b", "key_c"]),
        tenant=rng.choice(["", "acme", "globex"]),
        finish_reason=rng.choice(["stop", "length", "cancelled"]),
        model=types_pb2.ModelRef(name=rng.choice(["demo-lm", "other-lm"]), version="1"),
        usage=types_pb2.TokenUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
        cached_prompt_tokens=rng.randint(0, prompt),
        # Two minutes (and so two minute buckets) in one batch.
        finish_unix_ms=now_ms - rng.choice([0, 60_000]),
        metadata={"team": rng.choice(["red", "blue", "green", "gold"])}
        if rng.random() < 0.7
        else {},
        api_version=rng.choice(["v1", "v2"]),
    )


async def _usage_state(client: aioredis.Redis) -> dict[str, object]:
    """Every usage hash and audit log of a database, by key (dedupe markers left out)."""
    state: dict[str, object] = {}
    async for raw in client.scan_iter(match=f"{PREFIX}*"):
        key = raw.decode()
        kind = await client.type(key)
        if kind == b"hash":
            state[key] = await client.hgetall(key)
        elif kind == b"zset":
            state[key] = await client.zrange(key, 0, -1, withscores=True)
        elif ":seen:" not in key:
            raise AssertionError(f"unexpected usage key {key} ({kind!r})")
    return state


async def _stream_of(client: aioredis.Redis, events: list[inference_pb2.UsageEvent]) -> Meter:
    stream = f"usage-batch-test:{uuid.uuid4().hex}"
    await _publish(client, stream, *events)
    meter = Meter(client, stream, "meter", "c1", Retention())
    await meter.ensure_group()
    return meter


async def test_a_batch_adds_exactly_what_its_events_add_one_by_one(clients, monkeypatch):
    one_by_one, batched = clients
    # A small field cap, so that tag rows overflow into "(other)" and then stop
    # counting: which rows a batch keeps must match the events' order.
    monkeypatch.setattr(meter_module, "MAX_DIMENSION_FIELDS", 24)
    rng = random.Random(7)
    now_ms = int(time.time() * 1000)
    events = [_random_event(rng, now_ms) for _ in range(120)]
    events[40:40] = [events[3], events[17]]  # replays inside the batch

    sequential = await _stream_of(one_by_one, events)
    for entry_id, fields in (await one_by_one.xreadgroup("meter", "c1", {sequential.stream: ">"}))[
        0
    ][1]:
        await sequential.apply(
            entry_id.decode(), inference_pb2.UsageEvent.FromString(fields[b"event"])
        )
    together = await _stream_of(batched, events)
    assert await together.run_once(block_ms=100) == len(events)

    expected = await _usage_state(one_by_one)
    assert await _usage_state(batched) == expected
    assert any(
        b"(other)" in field
        for fields in expected.values()
        if isinstance(fields, dict)
        for field in fields
    )
    for client, meter in ((one_by_one, sequential), (batched, together)):
        assert (await client.xpending(meter.stream, "meter"))["pending"] == 0


async def _publish(client: aioredis.Redis, stream: str, *events: inference_pb2.UsageEvent) -> None:
    for event in events:
        await client.xadd(
            stream, {"request_id": event.request_id, "event": event.SerializeToString()}
        )


async def test_a_replay_in_a_later_batch_counts_once_and_the_batch_is_still_metered(clients):
    replayed, reference = clients
    rng = random.Random(11)
    now_ms = int(time.time() * 1000)
    first = [_random_event(rng, now_ms) for _ in range(5)]
    later = [_random_event(rng, now_ms) for _ in range(4)]
    # A batch holding a request metered by an earlier batch: applied one by one.
    meter = await _stream_of(replayed, first)
    assert await meter.run_once(block_ms=100) == 5
    await _publish(replayed, meter.stream, *later[:2], first[1], *later[2:])
    assert await meter.run_once(block_ms=100) == 5
    assert (await replayed.xpending(meter.stream, "meter"))["pending"] == 0
    # The same requests without the replay, in one batch.
    alone = await _stream_of(reference, [*first, *later])
    assert await alone.run_once(block_ms=100) == 9
    assert await _usage_state(replayed) == await _usage_state(reference)


async def test_events_of_one_request_id_count_apart_unless_they_share_an_event_id(clients):
    # A caller may reuse its request id: those are different requests, and were
    # metered once in all. A job item's replay shares its event id: counted once.
    reused, reference = clients
    rng = random.Random(5)
    now_ms = int(time.time() * 1000)
    events = [_random_event(rng, now_ms) for _ in range(3)]
    for event in events:
        event.request_id, event.event_id = "mine", uuid.uuid4().hex
    replay = inference_pb2.UsageEvent()
    replay.CopyFrom(events[0])
    meter = await _stream_of(reused, [*events, replay])
    assert await meter.run_once(block_ms=100) == 4
    distinct = []
    for event in events:
        alone = inference_pb2.UsageEvent()
        alone.CopyFrom(event)
        alone.request_id, alone.event_id = uuid.uuid4().hex, ""
        distinct.append(alone)
    assert await (await _stream_of(reference, distinct)).run_once(block_ms=100) == 3
    state, expected = await _usage_state(reused), await _usage_state(reference)
    audits = [k for k in expected if k.startswith(f"{PREFIX}audit:")]
    for key in audits:  # the same entries but for their request ids
        assert len(state.pop(key)) == len(expected.pop(key))
    assert state == expected


async def test_a_read_lingers_for_events_that_arrive_after_the_first(clients):
    _, client = clients
    rng = random.Random(3)
    now_ms = int(time.time() * 1000)
    meter = await _stream_of(client, [_random_event(rng, now_ms)])
    meter.linger_s = 2.0

    async def publish_late() -> None:
        # Once the first entry is read (pending), two more arrive during the linger.
        while (await client.xpending(meter.stream, "meter"))["pending"] == 0:
            await asyncio.sleep(0.01)
        await _publish(client, meter.stream, _random_event(rng, now_ms), _random_event(rng, now_ms))

    late = asyncio.create_task(publish_late())
    assert await meter.run_once(block_ms=1000) == 3
    await late
    assert (await client.xpending(meter.stream, "meter"))["pending"] == 0


async def test_a_meter_stopped_while_it_lingers_applies_what_it_read(clients):
    _, client = clients
    rng = random.Random(5)
    event = _random_event(rng, int(time.time() * 1000))
    meter = await _stream_of(client, [event])
    meter.linger_s = 30.0
    run = asyncio.create_task(meter.run_once(block_ms=1000))
    while (await client.xpending(meter.stream, "meter"))["pending"] == 0:
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert (await client.xpending(meter.stream, "meter"))["pending"] == 0
    assert await client.exists(f"{PREFIX}seen:{event.request_id}")
