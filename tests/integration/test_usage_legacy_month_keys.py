"""Months metered before month keys were UTC are still reported after the upgrade.

The meter wrote a month's hashes under the first of the month read in the
process's zone (`time.mktime(...) - time.timezone`); it now writes them under
the UTC first. Outside UTC the two differ (Europe/Dublin: every month), and a
report of a whole month from before the upgrade read the new, empty hash: 0.
The check runs in a process of its own with TZ set (time.tzset() here would
change every other test's zone), against a real usage server and Redis.
"""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
import time
import uuid

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.core.server import serving
from services.usage.meter import PREFIX, Meter, Retention
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_pb2 as v1
from tokenmesh.usage.v1 import usage_service_pb2 as v1_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as v1_rpc
from tokenmesh.usage.v2 import usage_pb2 as v2
from tokenmesh.usage.v2 import usage_service_pb2 as v2_pb
from tokenmesh.usage.v2 import usage_service_pb2_grpc as v2_rpc

DEADLINE_S = 15
TENANT = "acme"


def _old_month_key_start(year: int, month: int) -> int:
    # What the meter computed before month keys were UTC (38db9ca^ bucket_start).
    return int(time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone)


def _stamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromSeconds(int(unix_s))
    return stamp


# The meter counts an event older than its dedupe window (7 days) at the window's
# start: a request from mid last month is counted this month once the month is
# over 7 days old (from the 8th on, this test failed every month). A window of a
# year keeps last month's requests where they finished, whatever today's date.
UNCLAMPED = Retention(dedupe=366 * 86400)


async def _meter(client: aioredis.Redis, stream: str, key: str, at: float, team: str) -> None:
    """Meters one request that finished at `at`, through the real meter."""
    meter = Meter(client, stream, "meter", "c1", UNCLAMPED)
    await meter.ensure_group()
    event = inference_pb2.UsageEvent(
        request_id=uuid.uuid4().hex,
        key_id=key,
        tenant=TENANT,
        finish_reason="stop",
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=3, completion_tokens=4),
        finish_unix_ms=int(at * 1000),
        metadata={"team": team},
        api_version="v2",
    )
    fields = {"request_id": event.request_id, "event": event.SerializeToString()}
    await client.xadd(stream, fields)  # type: ignore[arg-type]
    while await meter.run_once(block_ms=50):
        pass


async def _as_the_old_meter_wrote_it(client: aioredis.Redis, month: int, legacy: int) -> None:
    """Moves every month hash of `month` (counters and dimension rows, every scope)
    to the key the old meter wrote: its content is what the old meter wrote there."""
    moved = 0
    async for key in client.scan_iter(match=f"{PREFIX}*:month:{month}"):
        await client.rename(key, key[: -len(str(month))] + str(legacy).encode())
        moved += 1
    assert moved == 2 * 3, moved  # agg: and dim:, for the key, the tenant and "all"


async def check(redis_url: str) -> None:
    """Meters a month before the upgrade (old keys) and after it, then reports it."""
    year, month = time.gmtime()[:2]
    last = calendar.timegm((year - (month == 1), (month - 2) % 12 + 1, 1, 0, 0, 0))
    this = calendar.timegm((year, month, 1, 0, 0, 0))
    legacy = _old_month_key_start(*time.gmtime(last)[:2])
    assert legacy != last, (os.environ.get("TZ"), time.tzname)  # a zone where they differ
    client = aioredis.from_url(redis_url)
    stream, key = f"usage-test:{uuid.uuid4().hex}", f"key_{uuid.uuid4().hex[:8]}"
    # Before the upgrade: two requests in the middle of last month, under the old key.
    for _ in range(2):
        await _meter(client, stream, key, last + 14 * 86400, "before")
    await _as_the_old_meter_wrote_it(client, last, legacy)
    # After it: one more of last month (shipped late from a spool) under the UTC key.
    await _meter(client, stream, key, last + 20 * 86400, "after")
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=redis_url
    )
    headers = (
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-tenant", TENANT),
        ("x-tokenmesh-scopes", "usage:read"),
    )
    start, end = _stamp(last), _stamp(this)  # all of last month
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            one = await v1_rpc.UsageServiceStub(channel).GetUsage(
                v1_pb.GetUsageRequest(
                    start_time=start, end_time=end, granularity=v1.GRANULARITY_MONTH
                ),
                metadata=headers,
                timeout=DEADLINE_S,
            )
            two = await v2_rpc.UsageServiceStub(channel).GetUsage(
                v2_pb.GetUsageRequest(
                    start_time=start,
                    end_time=end,
                    granularity=v2.GRANULARITY_MONTH,
                    group_by="tag:team",
                ),
                metadata=headers,
                timeout=DEADLINE_S,
            )
    await client.aclose()
    # Both keys are read and added up; each request counts once.
    assert (one.requests, one.prompt_tokens, one.completion_tokens) == (3, 9, 12), one
    assert [(b.start_time.seconds, b.totals.requests) for b in one.buckets] == [(last, 3)]
    assert two.totals.requests == 3, two
    assert {g.value: g.totals.requests for g in two.groups} == {"before": 2, "after": 1}


def test_a_month_metered_under_the_old_zone_key_is_reported_after_the_upgrade(
    own_redis: str,
) -> None:
    code = f"import asyncio; from {__name__} import check; asyncio.run(check({own_redis!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TZ": "Europe/Dublin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
