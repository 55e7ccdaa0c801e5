"""An audit log keeps its newest entries up to a cap, not only the retention's days.

By time alone one busy tenant's log (one entry a request, kept 90 days) grew
without bound in the Redis every service shares: ~780 million entries at 100
requests a second.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.usage.meter import AUDIT_TRIM_STEP, PREFIX, Meter, Retention
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

CAP = 3


def _event(tenant: str, request_id: str, finish_ms: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=request_id,
        event_id=f"{tenant}:{request_id}",
        key_id="key_x",
        tenant=tenant,
        finish_reason="stop",
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
        finish_unix_ms=finish_ms,
    )


@dataclass
class Audit:
    """A tenant of its own and a meter whose audit logs keep CAP entries."""

    tenant: str
    stream: str
    client: aioredis.Redis
    meter: Meter

    @property
    def key(self) -> str:
        return f"{PREFIX}audit:{self.tenant}"

    async def publish(self, index: int, finish_ms: int) -> None:
        event = _event(self.tenant, f"r{index}", finish_ms)
        await self.client.xadd(
            self.stream, {"request_id": f"r{index}", "event": event.SerializeToString()}
        )

    async def meter_all(self) -> None:
        while await self.meter.run_once(block_ms=50):
            pass


@asynccontextmanager
async def _audit(redis_url: str) -> AsyncIterator[Audit]:
    tenant, stream = f"t{uuid.uuid4().hex[:8]}", f"usage-test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    meter = Meter(client, stream, "meter", "c", Retention(audit_entries=CAP))
    await meter.ensure_group()
    audit = Audit(tenant, stream, client, meter)
    try:
        yield audit
    finally:
        await client.delete(stream, audit.key)
        await client.aclose()


async def test_a_tenants_audit_log_keeps_its_newest_entries_up_to_the_cap(redis_url: str) -> None:
    base = int(time.time() * 1000) - 60_000
    async with _audit(redis_url) as audit:
        # One at a time (each applied alone), then several read together (one batch).
        for i in range(CAP + 1):
            await audit.publish(i, base + i * 1000)
            await audit.meter_all()
        for i in range(CAP + 1, 2 * CAP + 2):
            await audit.publish(i, base + i * 1000)
        await audit.meter_all()
        pairs = await audit.client.zrange(audit.key, 0, -1, withscores=True)
        scores = [int(pair[1]) for pair in pairs]
        assert scores == [base + i * 1000 for i in range(CAP + 2, 2 * CAP + 2)]


async def test_a_log_far_over_the_cap_shrinks_a_step_at_a_time(redis_url: str) -> None:
    # A log from before the cap (or a cap lowered) is not trimmed in one script: one
    # that removed it all held Redis for minutes (every other service waited).
    base = int(time.time() * 1000) - 600_000
    old = AUDIT_TRIM_STEP + 10
    async with _audit(redis_url) as audit:
        await audit.client.zadd(audit.key, {f"old{i}": base + i for i in range(old)})
        sizes = []
        for i in range(2):
            await audit.publish(i, base + 100_000 + i)
            await audit.meter_all()
            sizes.append(await audit.client.zcard(audit.key))
        assert sizes == [old + 1 - AUDIT_TRIM_STEP, CAP]
        # The oldest went first: the newest CAP stay.
        assert await audit.client.zscore(audit.key, "old0") is None
        assert await audit.client.zscore(audit.key, f"old{old - 1}") is not None
