"""Reports over ranges older than the minute buckets' retention count everything:
an edge whose minute buckets Redis has expired is read from its hour bucket,
and the response's effective range says so (v1 and v2 alike)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from services.usage.meter import Meter, Retention, bucket_key, bucket_start
from services.usage.reports import UsageReader
from services.usage.reports_v2 import DimensionReader
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_pb2
from tokenmesh.usage.v2 import usage_pb2 as v2_usage_pb2

DAY = 86400


@dataclass
class _Metered:
    client: aioredis.Redis
    scope: str
    hour: int  # the hour, five days ago, the event finished in
    finished: int  # 45 minutes into `hour`


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.02)


@pytest.fixture
async def metered(redis_url: str) -> AsyncIterator[_Metered]:
    """One event five days ago, in hour/day/month buckets only (its minute bucket expired)."""
    client = aioredis.from_url(redis_url)
    stream = f"usage-test:{uuid.uuid4().hex}"
    key = f"key_{uuid.uuid4().hex[:8]}"
    hour = bucket_start(time.time() - 5 * DAY, "hour")
    finished = hour + 45 * 60
    event = inference_pb2.UsageEvent(
        request_id=uuid.uuid4().hex,  # deduplicated across the whole Redis
        key_id=key,
        finish_reason="stop",
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
        finish_unix_ms=finished * 1000,
    )
    # Minute buckets kept one second stand in for the two days a real meter keeps
    # them: five days on, Redis has expired them as it will have in production.
    meter = Meter(client, stream, "meter", "c1", Retention(minute=1))
    await meter.ensure_group()
    await client.xadd(stream, {"request_id": event.request_id, "event": event.SerializeToString()})
    while await meter.run_once(block_ms=50):
        pass
    scope = f"key:{key}"
    minute = bucket_key(scope, "minute", bucket_start(finished, "minute"))
    hourly = bucket_key(scope, "hour", hour)
    assert await client.exists(hourly)

    async def minute_expired() -> bool:
        return not await client.exists(minute)

    await _until(minute_expired)
    try:
        yield _Metered(client, scope, hour, finished)
    finally:
        await client.delete(stream)
        await client.aclose()


async def test_v1_counts_usage_at_a_mid_hour_start_older_than_the_minute_buckets(
    metered: _Metered,
) -> None:
    start = metered.hour + 37 * 60  # "the last five days", asked for at hh:37
    report = await UsageReader(metered.client).report(
        metered.scope, start, time.time(), usage_pb2.GRANULARITY_UNSPECIFIED, by_version=False
    )
    assert (report.requests, report.total_tokens) == (1, 10)
    assert report.start_time.seconds == metered.hour  # the range it covers, from the hour


async def test_v1_counts_usage_at_an_end_older_than_the_minute_buckets(
    metered: _Metered,
) -> None:
    start, end = metered.hour - 3 * 3600, metered.hour + 52 * 60
    report = await UsageReader(metered.client).report(
        metered.scope, start, end, usage_pb2.GRANULARITY_HOUR, by_version=False
    )
    assert report.requests == 1
    assert (report.start_time.seconds, report.end_time.seconds) == (start, metered.hour + 3600)
    assert [b.totals.requests for b in report.buckets] == [1]


async def test_v2_counts_usage_at_a_mid_hour_start_older_than_the_minute_buckets(
    metered: _Metered,
) -> None:
    start = metered.hour + 37 * 60
    report = await DimensionReader(metered.client).report(
        metered.scope, start, time.time(), v2_usage_pb2.GRANULARITY_UNSPECIFIED, "model"
    )
    assert (report.totals.requests, report.totals.total_tokens) == (1, 10)
    assert report.start_time.seconds == metered.hour


async def test_a_minute_report_past_the_minutes_lists_the_hour_that_holds_the_usage(
    metered: _Metered,
) -> None:
    # The minute buckets read as empty: totals 1, buckets none.
    start, end = metered.hour + 37 * 60, metered.hour + 52 * 60
    one = await UsageReader(metered.client).report(
        metered.scope, start, end, usage_pb2.GRANULARITY_MINUTE, by_version=False
    )
    two = await DimensionReader(metered.client).report(
        metered.scope, start, end, v2_usage_pb2.GRANULARITY_MINUTE, "model"
    )
    for report, requests in ((one, one.requests), (two, two.totals.requests)):
        assert requests == 1
        assert [b.totals.requests for b in report.buckets] == [1]
        bucket = report.buckets[0]  # the finest bucket kept there, and it says so
        assert (bucket.start_time.seconds, bucket.end_time.seconds) == (
            metered.hour,
            metered.hour + 3600,
        )
