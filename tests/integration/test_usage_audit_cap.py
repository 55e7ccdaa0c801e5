"""An audit log keeps its newest entries up to a cap, not only the retention's days.

By time alone one busy tenant's log (one entry a request, kept 90 days) grew
without bound in the Redis every service shares: ~780 million entries at 100
requests a second.
"""

from __future__ import annotations

import time
import uuid

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


async def test_a_tenants_audit_log_keeps_its_newest_entries_up_to_the_cap(redis_url: str) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    stream = f"usage-test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    meter = Meter(client, stream, "meter", "c", Retention(audit_entries=CAP))
    await meter.ensure_group()
    base = int(time.time() * 1000) - 60_000
    try:
        # One at a time (each applied alone), then several read together (one batch).
        for i in range(CAP + 1):
            event = _event(tenant, f"r{i}", base + i * 1000)
            await client.xadd(stream, {"request_id": f"r{i}", "event": event.SerializeToString()})
            while await meter.run_once(block_ms=50):
                pass
        for i in range(CAP + 1, 2 * CAP + 2):
            event = _event(tenant, f"r{i}", base + i * 1000)
            await client.xadd(stream, {"request_id": f"r{i}", "event": event.SerializeToString()})
        while await meter.run_once(block_ms=50):
            pass
        key = f"{PREFIX}audit:{tenant}"
        pairs = await client.zrange(key, 0, -1, withscores=True)
        scores = [int(pair[1]) for pair in pairs]
        newest = [base + i * 1000 for i in range(CAP + 2, 2 * CAP + 2)]
        assert scores == newest
    finally:
        await client.delete(stream)
        await client.aclose()


async def test_a_log_far_over_the_cap_shrinks_a_step_at_a_time(redis_url: str) -> None:
    # A log from before the cap (or a cap lowered) is not trimmed in one script: one
    # that removed it all held Redis for minutes (every other service waited).
    tenant = f"t{uuid.uuid4().hex[:8]}"
    stream = f"usage-test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    meter = Meter(client, stream, "meter", "c", Retention(audit_entries=CAP))
    await meter.ensure_group()
    key = f"{PREFIX}audit:{tenant}"
    base = int(time.time() * 1000) - 600_000
    old = AUDIT_TRIM_STEP + 10
    await client.zadd(key, {f"old{i}": base + i for i in range(old)})
    try:
        sizes = []
        for i in range(2):
            event = _event(tenant, f"r{i}", base + 100_000 + i)
            await client.xadd(stream, {"request_id": f"r{i}", "event": event.SerializeToString()})
            while await meter.run_once(block_ms=50):
                pass
            sizes.append(await client.zcard(key))
        assert sizes == [old + 1 - AUDIT_TRIM_STEP, CAP]
        # The oldest went first: the newest CAP stay.
        assert await client.zscore(key, "old0") is None
        assert await client.zscore(key, f"old{old - 1}") is not None
    finally:
        await client.delete(stream, key)
        await client.aclose()
