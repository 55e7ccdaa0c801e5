"""Usage reports against a real Redis and a real usage server: the bucket list adds
up to the totals, month buckets are UTC in any process zone, and every report is
bounded (buckets, groups, rows, the answer's size) before it costs much."""

from __future__ import annotations

import calendar
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from services.core.errors import InvalidArgument
from services.core.server import serving
from services.usage import meter as meter_module
from services.usage import reports, reports_v2
from services.usage.meter import Meter, Retention, bucket_start
from services.usage.reports import MAX_BUCKETS, UsageReader
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

HOUR = 3600
# Every call has a deadline: a report that never ends (the month loop, a minute
# report from 1970) fails the test instead of hanging it.
DEADLINE_S = 15


@dataclass
class Served:
    client: aioredis.Redis
    stream: str
    meter: Meter
    v1: Any  # the stubs on a grpc.aio channel (their types are a sync channel's)
    v2: Any
    key: str

    def headers(self) -> tuple[tuple[str, str], ...]:
        return (
            ("x-tokenmesh-key-id", self.key),
            ("x-tokenmesh-tenant", "acme"),
            ("x-tokenmesh-scopes", "usage:read"),
        )

    async def meter_events(self, *finished: tuple[float, dict[str, str]]) -> None:
        """Meters one request per (finish time, metadata)."""
        for at, metadata in finished:
            event = inference_pb2.UsageEvent(
                request_id=uuid.uuid4().hex,
                key_id=self.key,
                tenant="acme",
                finish_reason="stop",
                model=types_pb2.ModelRef(name="demo-lm", version="1"),
                usage=types_pb2.TokenUsage(prompt_tokens=3, completion_tokens=4),
                finish_unix_ms=int(at * 1000),
                metadata=metadata,
                api_version="v2",
            )
            fields = {"request_id": event.request_id, "event": event.SerializeToString()}
            await self.client.xadd(self.stream, fields)  # type: ignore[arg-type]
        while await self.meter.run_once(block_ms=50):
            pass


@pytest.fixture
def dublin() -> Iterator[None]:
    """The process's zone is Europe/Dublin (whose standard time is summer's) for a test."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Dublin"
    time.tzset()
    try:
        assert time.tzname != ("UTC", "UTC")  # the zone is installed, not UTC by default
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[Served]:
    client = aioredis.from_url(redis_url)
    stream = f"usage-test:{uuid.uuid4().hex}"
    meter = Meter(client, stream, "meter", "c1", Retention())
    await meter.ensure_group()
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=stream,
    )
    key = f"key_{uuid.uuid4().hex[:8]}"
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            stubs = v1_rpc.UsageServiceStub(channel), v2_rpc.UsageServiceStub(channel)
            yield Served(client, stream, meter, *stubs, key)
    await client.delete(stream)
    await client.aclose()


def _stamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def _details(error: grpc.aio.AioRpcError) -> tuple[list[str], str]:
    """Returns the fields a BadRequest names and the ErrorInfo reason."""
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    )
    bad_request, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    fields, reason = [], ""
    for detail in status.details:
        if detail.Unpack(bad_request):
            fields = [v.field for v in bad_request.field_violations]
        elif detail.Unpack(info):
            reason = info.reason
    return fields, reason


async def test_month_buckets_are_utc_whatever_the_process_zone(
    served: Served, dublin: None
) -> None:
    # In Europe/Dublin a month started at 23:00 the day before, and the month
    # after a month's start was the same instant: a month report never ended.
    await served.meter_events((time.time(), {}))
    month = calendar.timegm((*time.gmtime()[:2], 1, 0, 0, 0))
    one = await served.v1.GetUsage(
        v1_pb.GetUsageRequest(granularity=v1.GRANULARITY_MONTH),
        metadata=served.headers(),
        timeout=DEADLINE_S,
    )
    assert one.start_time.seconds == month  # "this calendar month (UTC)"
    assert [(b.start_time.seconds, b.totals.requests) for b in one.buckets] == [(month, 1)]
    two = await served.v2.GetUsage(
        v2_pb.GetUsageRequest(granularity=v2.GRANULARITY_MONTH),
        metadata=served.headers(),
        timeout=DEADLINE_S,
    )
    assert two.start_time.seconds == month
    assert [(b.start_time.seconds, b.totals.requests) for b in two.buckets] == [(month, 1)]


async def test_buckets_add_up_to_the_totals_of_a_range_starting_mid_hour(served: Served) -> None:
    hour = bucket_start(time.time(), "hour") - 3 * HOUR
    start = hour + 30 * 60  # hh:30 three hours ago
    await served.meter_events(*((hour + minutes * 60, {}) for minutes in (10, 29, 31, 70, 130)))
    request = v1_pb.GetUsageRequest(start_time=_stamp(start), granularity=v1.GRANULARITY_HOUR)
    one = await served.v1.GetUsage(request, metadata=served.headers(), timeout=DEADLINE_S)
    assert one.requests == 3  # hh:31, +70 and +130 minutes
    # The first bucket is cut to the range: the hour's first half is not in the totals.
    assert one.buckets[0].start_time.seconds == start
    assert one.buckets[0].end_time.seconds == hour + HOUR
    assert sum(b.totals.requests for b in one.buckets) == one.requests
    two = await served.v2.GetUsage(
        v2_pb.GetUsageRequest(start_time=_stamp(start), granularity=v2.GRANULARITY_HOUR),
        metadata=served.headers(),
        timeout=DEADLINE_S,
    )
    assert two.totals.requests == 3
    assert sum(b.totals.requests for b in two.buckets) == two.totals.requests


async def test_v1_without_granularity_lists_one_bucket_for_the_whole_range(served: Served) -> None:
    for metered in (False, True):  # a client reads buckets[0], usage or not
        if metered:
            await served.meter_events((time.time(), {}))
        report = await served.v1.GetUsage(
            v1_pb.GetUsageRequest(), metadata=served.headers(), timeout=DEADLINE_S
        )
        [bucket] = report.buckets
        assert (bucket.start_time, bucket.end_time) == (report.start_time, report.end_time)
        assert bucket.totals.requests == report.requests == int(metered)
        assert list(bucket.by_model) == list(report.by_model)


async def test_a_range_with_more_buckets_than_a_report_lists_is_refused(served: Served) -> None:
    # It listed the first 2000 minutes with usage and dropped the rest silently.
    for start in (time.time() - 2500 * 60, 0):
        for stub, request in (
            (
                served.v1,
                v1_pb.GetUsageRequest(start_time=_stamp(start), granularity=v1.GRANULARITY_MINUTE),
            ),
            (
                served.v2,
                v2_pb.GetUsageRequest(start_time=_stamp(start), granularity=v2.GRANULARITY_MINUTE),
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetUsage(request, metadata=served.headers(), timeout=DEADLINE_S)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _details(refused.value)[0] == ["granularity"]
            assert f"more than {MAX_BUCKETS}" in (refused.value.details() or "")


async def test_a_report_is_planned_before_redis_is_asked_anything() -> None:
    # A minute report from 1970 was 30 M sequential round trips; nothing listens here.
    client = aioredis.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(InvalidArgument) as refused:
        await UsageReader(client).report(
            "key:k", 0, time.time(), v1.GRANULARITY_MINUTE, by_version=False
        )
    assert refused.value.violations[0].field == "granularity"
    await client.aclose()


async def test_ranges_past_what_is_kept_or_what_a_timestamp_holds(served: Served) -> None:
    # An end_time in December 9999 was planned to 10000-01-01: INTERNAL.
    first = _stamp(-62135596800)  # 0001-01-01T00:00:00Z
    last = _stamp(253402300799)  # 9999-12-31T23:59:59Z
    for stub, pb in ((served.v1, v1_pb), (served.v2, v2_pb)):
        report = await stub.GetUsage(
            pb.GetUsageRequest(start_time=first, end_time=last, granularity=4),
            metadata=served.headers(),
            timeout=DEADLINE_S,
        )
        now = time.time()
        assert report.start_time.seconds == reports.oldest_kept(now)  # "everything kept"
        assert now < report.end_time.seconds <= now + reports.FUTURE_S + 60
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # nothing of it is kept
            await stub.GetUsage(
                pb.GetUsageRequest(start_time=first, end_time=_stamp(86400)),
                metadata=served.headers(),
                timeout=DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(refused.value)[0] == ["end_time"]


async def test_v2_reports_refuse_more_groups_than_the_bound(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 users an hour for 3 hours: 60 groups, and 60 more in hourly buckets.
    monkeypatch.setattr(reports_v2, "MAX_REPORT_GROUPS", 100, raising=False)
    hour = bucket_start(time.time(), "hour") - 3 * HOUR
    await served.meter_events(
        *((hour + h * HOUR + u, {"user": f"u{h}-{u}"}) for h in range(3) for u in range(20))
    )
    start = _stamp(hour)
    totals = await served.v2.GetUsage(
        v2_pb.GetUsageRequest(start_time=start, group_by="tag:user"),
        metadata=served.headers(),
        timeout=DEADLINE_S,
    )
    assert len(totals.groups) == 60 and totals.totals.requests == 60  # within the bound: exact
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.v2.GetUsage(
            v2_pb.GetUsageRequest(
                start_time=start, group_by="tag:user", granularity=v2.GRANULARITY_HOUR
            ),
            metadata=served.headers(),
            timeout=DEADLINE_S,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _details(refused.value)[1] == "USAGE_REPORT_TOO_LARGE"
    assert "more than 100 groups" in (refused.value.details() or "")
    by_model = await served.v2.GetUsage(  # the same buckets by model: 3 groups and 3 buckets
        v2_pb.GetUsageRequest(start_time=start, granularity=v2.GRANULARITY_HOUR),
        metadata=served.headers(),
        timeout=DEADLINE_S,
    )
    assert [b.totals.requests for b in by_model.buckets] == [20, 20, 20]


async def test_v2_reports_read_a_bounded_number_of_rows(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted (HLEN) before any row is read: reading and parsing them is the cost.
    hour = bucket_start(time.time(), "hour") - HOUR
    await served.meter_events(*((hour + u, {"user": f"u{u}"}) for u in range(30)))
    monkeypatch.setattr(reports_v2, "MAX_REPORT_FIELDS", 100, raising=False)  # 25 rows
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.v2.GetUsage(
            v2_pb.GetUsageRequest(start_time=_stamp(hour)),
            metadata=served.headers(),
            timeout=DEADLINE_S,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _details(refused.value)[1] == "USAGE_REPORT_TOO_LARGE"


async def test_an_hourly_report_by_a_tag_at_the_meters_cap_is_refused_not_built(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that tags each request with its own user id, ~85 a minute: each hour
    # bucket held the meter's ~5,000 values (before the per-granularity caps; such
    # buckets stay 31 days). The hourly report of a few hours was an 8 MB answer
    # (4 MiB is a gRPC client's default), after 8.5 s of CPU.
    # An earlier meter's, on a stream of its own (the service meters its stream too).
    monkeypatch.setattr(meter_module, "DIMENSION_FIELD_CAPS", {})
    stream = f"usage-test:{uuid.uuid4().hex}"
    earlier = Meter(served.client, stream, "meter", "earlier", Retention())
    await earlier.ensure_group()
    hour = bucket_start(time.time(), "hour") - 4 * HOUR
    try:
        await dataclasses.replace(served, stream=stream, meter=earlier).meter_events(
            *((hour + i * 0.7, {"user": f"user-{i:05d}"}) for i in range(5100))
        )
    finally:
        await served.client.delete(stream)
    scope = f"key:{served.key}"
    for kind in ("agg", "dim"):  # the hours after it look the same
        dump = await served.client.dump(f"tm:usage:{kind}:{scope}:hour:{hour}")
        assert dump is not None
        for later in (1, 2):
            at = hour + later * HOUR
            await served.client.restore(f"tm:usage:{kind}:{scope}:hour:{at}", 0, dump)
    start = _stamp(hour)
    whole = await served.v2.GetUsage(
        v2_pb.GetUsageRequest(start_time=start, group_by="tag:user"),
        metadata=served.headers(),
        timeout=DEADLINE_S,
    )
    assert len(whole.groups) <= reports_v2.MAX_REPORT_GROUPS
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.v2.GetUsage(
            v2_pb.GetUsageRequest(
                start_time=start, group_by="tag:user", granularity=v2.GRANULARITY_HOUR
            ),
            metadata=served.headers(),
            timeout=DEADLINE_S,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "narrow start_time..end_time" in (refused.value.details() or "")
