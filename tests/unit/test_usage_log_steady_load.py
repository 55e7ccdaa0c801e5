"""Under steady load the usage spool's disk use stays bounded: the shipper never
finds the backlog empty (an event finishes during every round trip to Redis),
yet what the meter has applied is deleted. The spool used to shrink only when
nothing was waiting, so it grew by every shipped byte until the pod's volume filled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis

from services.core.tasks import Supervisor
from services.inference import usage_log
from services.inference.usage_log import UsageLog
from services.usage.meter import Meter, Retention
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

EVENT_BYTES = 1024  # about; a real event is ~150 bytes: fewer, larger ones ship as many bytes
SHIP_BYTES = 7 << 19  # 3.5 MiB: past three times what the spool may hold
BOUND_BYTES = 2 << 20  # a segment being appended to, one being deleted, and a batch


def _event(i: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=f"req-{i}",
        model=types_pb2.ModelRef(name="m", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=i, completion_tokens=2 * i, total_tokens=3 * i),
        finish_reason="stop",
        trace_id="t" * EVENT_BYTES,
    )


def _spool_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


class _CountingEvent(asyncio.Event):
    """The shipper's wake-up event: counts the waits (it waits only with nothing to ship)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    async def wait(self) -> Literal[True]:
        self.waits += 1
        return await super().wait()


class _BusyClient:
    """A real Redis client whose every batch shipped (the ship script's call) also
    finishes more requests (appends their events), as a worker under steady load does."""

    def __init__(self, redis: aioredis.Redis, on_trip: Callable[[], None]) -> None:
        self.redis, self.on_trip = redis, on_trip

    def register_script(self, script: str) -> Any:
        return self.redis.register_script(script)

    async def script_load(self, script: str) -> Any:
        return await self.redis.script_load(script)

    async def mget(self, *keys: str) -> Any:
        return await self.redis.mget(*keys)

    async def evalsha(self, *args: Any) -> Any:
        result = await self.redis.evalsha(*args)
        self.on_trip()  # finished while Redis answered: the backlog is never empty
        return result


async def test_a_spool_under_steady_load_stays_bounded_on_disk(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.01)
    redis = aioredis.from_url(redis_url)
    stream = f"test:{uuid.uuid4().hex}"
    # The usage service's meter, applying as events arrive.
    meter = Meter(redis, stream, "usage-meter", "c1", Retention())
    await meter.ensure_group()
    supervisor = Supervisor("usage-test")
    metering = supervisor.spawn("usage-meter", meter.run_forever)
    appended = 0
    peak = 0
    trips_under_load = 0
    idle_under_load = 0  # how often the shipper found nothing to ship while under load

    def trip() -> None:
        nonlocal appended, peak, trips_under_load, idle_under_load
        peak = max(peak, _spool_bytes(tmp_path))
        if log.shipped_total * EVENT_BYTES < SHIP_BYTES:
            for _ in range(16):
                log.append(_event(appended))
                appended += 1
            trips_under_load += 1
            idle_under_load = idle.waits

    client = _BusyClient(redis, trip)
    log = UsageLog(tmp_path, client, stream, 256 << 20, applied_grace_s=0)  # type: ignore[arg-type]
    idle = _CountingEvent()
    log._wake = idle
    log.append(_event(0))
    appended = 1
    log.start(Supervisor("inference-test"))
    try:
        async with asyncio.timeout(60):
            while log.shipped_total * EVENT_BYTES < SHIP_BYTES or log.backlog_bytes():
                await asyncio.sleep(0.01)
        assert trips_under_load > 100 and idle_under_load == 0  # never empty under load
        assert peak < BOUND_BYTES, f"the spool reached {peak / 2**20:.1f} MiB"
        assert await redis.xlen(stream) == appended  # every event shipped, once
    finally:
        await log.stop()
        await metering.stop(timeout_s=5)
        await redis.delete(stream)
        await redis.aclose()
