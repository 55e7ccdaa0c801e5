"""The usage spool ships every event to a real Redis Stream, and loses none
when Redis is down or the worker restarts."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core.errors import Unavailable
from services.inference.usage_log import UsageLog
from services.launcher.processes import reserve_port
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2


def _event(i: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=f"req-{i}",
        model=types_pb2.ModelRef(name="m", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=i, completion_tokens=2 * i, total_tokens=3 * i),
        finish_reason="length",
    )


async def _stream_ids(client: Any, stream: str) -> list[str]:
    entries = await client.xrange(stream)
    return [fields[b"request_id"].decode() for _, fields in entries]


async def _wait_shipped(log: UsageLog, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while log.backlog_bytes():
            await asyncio.sleep(0.02)


async def test_events_reach_the_stream_intact(tmp_path, redis_url):
    stream = f"test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    log = UsageLog(tmp_path, client, stream, max_backlog_bytes=1 << 20)
    log.start()
    try:
        for i in range(50):
            log.append(_event(i))
        await _wait_shipped(log)
        entries = await client.xrange(stream)
        assert [fields[b"request_id"].decode() for _, fields in entries] == [
            f"req-{i}" for i in range(50)
        ]
        decoded = inference_pb2.UsageEvent.FromString(entries[7][1][b"event"])
        assert decoded.usage.completion_tokens == 14 and decoded.model.name == "m"
    finally:
        await log.stop()
        await client.aclose()


async def test_redis_down_spools_then_ships_after_a_restart(tmp_path: Path, redis_url: str):
    stream = f"test:{uuid.uuid4().hex}"
    dead = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)
    log = UsageLog(tmp_path, dead, stream, max_backlog_bytes=1 << 20)
    log.start()
    for i in range(10):
        log.append(_event(i))
    await asyncio.sleep(0.3)
    assert log.backlog_bytes() > 0  # nothing could be shipped
    await log.stop(timeout_s=0.1)  # the worker stops (or crashes) with events spooled
    await dead.aclose()

    live = aioredis.from_url(redis_url)
    restarted = UsageLog(tmp_path, live, stream, max_backlog_bytes=1 << 20)
    restarted.start()
    try:
        await _wait_shipped(restarted)
        assert await _stream_ids(live, stream) == [f"req-{i}" for i in range(10)]
    finally:
        await restarted.stop()
        await live.aclose()


async def test_a_full_spool_refuses_new_work_instead_of_dropping(tmp_path: Path):
    dead = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)
    log = UsageLog(tmp_path, dead, "s", max_backlog_bytes=200)
    log.check_capacity()
    for i in range(10):
        log.append(_event(i))
    with pytest.raises(Unavailable) as info:
        log.check_capacity()
    assert info.value.reason == "USAGE_BACKLOG_FULL"
    await log.stop(timeout_s=0)
    await dead.aclose()
