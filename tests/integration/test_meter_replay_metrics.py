"""The meter's Prometheus counters agree with its reports: a replay counts once, a
job item's cut attempt is no request.

The aggregates were always exact (the apply script claims each event id once),
but the process's counters (tokenmesh_usage_events_applied_total, per tenant)
counted every event handed to the script, replays included, and a cut job
attempt as one of the tenant's requests, which the reports leave out. The real
meter over a real Redis Stream, each test a stream of its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.core import contract
from services.usage.meter import Meter, Retention, bucket_key, bucket_start
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

TENANT = "t-replay"
MODEL = "demo-lm|1"


def _event(event_id: str, key: str, finish_reason: str = "stop") -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=event_id.split(contract.UNFINISHED_ATTEMPT_MARK)[0],
        event_id=event_id,
        key_id=key,
        tenant=TENANT,
        finish_reason=finish_reason,
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=5, completion_tokens=7, total_tokens=12),
        finish_unix_ms=int(time.time() * 1000),
    )


def _counters(finish_reason: str = "stop") -> tuple[float, ...]:
    """applied, the tenant's requests (of `finish_reason`), prompt and completion tokens."""
    names: tuple[tuple[str, dict[str, str]], ...] = (
        ("tokenmesh_usage_events_applied_total", {}),
        ("tokenmesh_tenant_requests_total", {"tenant": TENANT, "finish_reason": finish_reason}),
        ("tokenmesh_tenant_tokens_total", {"tenant": TENANT, "kind": "prompt"}),
        ("tokenmesh_tenant_tokens_total", {"tenant": TENANT, "kind": "completion"}),
    )
    return tuple(REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in names)


def _moved(before: tuple[float, ...], after: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(before, after, strict=True))


@pytest.fixture
async def meter(redis_url: str) -> AsyncIterator[Meter]:
    client = aioredis.from_url(redis_url)
    meter = Meter(client, f"usage-replay:{uuid.uuid4().hex}", "meter", "c1", Retention())
    await meter.ensure_group()
    yield meter
    await client.delete(meter.stream)
    await client.aclose()


async def _append(meter: Meter, event: inference_pb2.UsageEvent) -> None:
    fields = {"request_id": event.request_id, "event": event.SerializeToString()}
    await meter.redis.xadd(meter.stream, fields)  # type: ignore[arg-type]


async def _read_all(meter: Meter) -> None:
    """Applies every entry appended so far (one read: one batch, or one event)."""
    assert await meter.run_once(block_ms=10)
    pending: dict[str, int] = await meter.redis.xpending(meter.stream, meter.group)
    assert pending["pending"] == 0  # acked, replays included


async def _report(meter: Meter, key: str) -> dict[str, int]:
    day = bucket_key(f"key:{key}", "day", bucket_start(time.time(), "day"))
    row = cast(dict[bytes, bytes], await meter.redis.hgetall(day))
    return {k.decode(): int(v) for k, v in row.items()}


async def test_an_event_read_twice_counts_once(meter: Meter) -> None:
    # A worker restarted before its spool cursor was written ships the event again;
    # the meter reads the copy in a later batch.
    key, event_id = f"key_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    before = _counters()
    for _ in range(2):
        await _append(meter, _event(event_id, key))
        await _read_all(meter)
    assert meter.applied_total == 1
    assert _moved(before, _counters()) == (1, 1, 5, 7)
    report = await _report(meter, key)
    assert (report[f"{MODEL}|requests"], report[f"{MODEL}|completion"]) == (1, 7)


async def test_a_replay_in_a_batch_counts_once(meter: Meter) -> None:
    # The batch script refuses a batch holding an event metered before: its events
    # are then applied one by one, where only the new one counts.
    key, replayed, new = f"key_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, uuid.uuid4().hex
    await _append(meter, _event(replayed, key))
    await _read_all(meter)
    before = _counters()
    await _append(meter, _event(replayed, key))
    await _append(meter, _event(new, key))
    await _read_all(meter)
    assert meter.applied_total == 2
    assert _moved(before, _counters()) == (1, 1, 5, 7)
    assert (await _report(meter, key))[f"{MODEL}|requests"] == 2


async def test_a_cut_job_attempt_is_no_request_of_its_tenant(meter: Meter) -> None:
    # Recorded apart (services.inference.admission.set_attempt_apart): billed nothing,
    # audited, and left out of the reports' requests: the per-tenant counter agrees.
    key, item = f"key_{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:8]}:0"
    attempt = _event(f"{item}{contract.UNFINISHED_ATTEMPT_MARK}{uuid.uuid4().hex}", key)
    attempt.finish_reason = "cancelled"
    attempt.served_usage.CopyFrom(attempt.usage)
    attempt.usage.CopyFrom(types_pb2.TokenUsage())
    before = _counters("cancelled")
    await _append(meter, attempt)
    await _read_all(meter)
    assert meter.applied_total == 1  # applied: its audit entry written
    assert _moved(before, _counters("cancelled")) == (1, 0, 0, 0)
    assert f"{MODEL}|requests" not in await _report(meter, key)
