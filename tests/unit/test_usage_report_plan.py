"""A report's plan: month buckets in UTC whatever the process's zone, a bucket list
that partitions the effective range, and a bounded plan whatever the range."""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
import textwrap

import pytest

from services.core.errors import InvalidArgument
from services.usage import reports
from services.usage.meter import bucket_start, next_bucket
from services.usage.reports import MAX_BUCKETS, plan_buckets

NOW = calendar.timegm((2026, 12, 5, 16, 24, 7, 0, 0, 0))
DAY = 86400

# Zones where time.mktime(...) - time.timezone is not UTC: Dublin's standard time is
# its summer time (every month), the others changed their standard offset.
_ZONES = ("Europe/Dublin", "Asia/Almaty", "America/Scoresbysund", "Asia/Amman")
_CHECK = textwrap.dedent(
    """
    import calendar, time
    from services.usage.meter import bucket_start, next_bucket
    from services.usage.reports import plan_buckets
    assert time.tzname != ("UTC", "UTC"), time.tzname  # the zone is installed
    for year in range(2021, 2028):
        for month in range(1, 13):
            start = calendar.timegm((year, month, 1, 0, 0, 0))
            assert bucket_start(start + 4 * 86400, "month") == start, (year, month)
            assert bucket_start(start, "month") == start, (year, month)
            following = next_bucket(start, "month")
            assert following == calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    now = calendar.timegm((2026, 12, 5, 16, 24, 7))
    assert len(plan_buckets(now - 2 * 365 * 86400, now, now=now).buckets) < 200
    """
)


@pytest.mark.parametrize("zone", _ZONES)
def test_month_buckets_are_utc_in_any_process_zone(zone: str) -> None:
    # A fresh process: time.tzset() in this one would change every other test's zone.
    # Under Dublin the plan looped without end (no await) on a month that never advanced.
    env = {**os.environ, "TZ": zone}
    done = subprocess.run(
        [sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


_UTC_CHECK = textwrap.dedent(
    """
    import calendar
    from services.usage.reports import plan_report
    now = calendar.timegm((2026, 12, 5, 16, 24, 7))
    plan = plan_report(now - 4 * 365 * 86400, now, "month", now=now)
    months = [read for bucket in plan.buckets for read in bucket.reads if read[0] == "month"]
    assert len(months) > 40 and len(set(months)) == len(months), months
    assert all(len(bucket.reads) == 1 for bucket in plan.buckets[1:-1]), plan.buckets
    """
)


def test_in_utc_a_month_is_read_from_one_hash() -> None:
    # Outside UTC a month also reads the key the meter wrote before month keys
    # were UTC (tests/integration/test_usage_legacy_month_keys.py); in UTC that
    # key is the same one, and is read once.
    env = {**os.environ, "TZ": "UTC"}
    done = subprocess.run(
        [sys.executable, "-c", _UTC_CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def _partition(plan: reports.ReportPlan) -> None:
    cursor = plan.start
    for bucket in plan.buckets:
        assert bucket.start == cursor
        for granularity, start in bucket.reads:
            assert start == cursor  # contiguous, no gaps or overlaps
            cursor = next_bucket(start, granularity)
        assert cursor == bucket.end
    assert cursor == plan.end


def test_a_bucket_list_partitions_the_effective_range_of_the_totals() -> None:
    start, end = NOW - 3 * DAY - 5 * 3600 - 17 * 60, NOW - 600
    plan = reports.plan_report(start, end, "day", now=NOW)
    whole = plan_buckets(start, end, now=NOW)
    assert (plan.start, plan.end) == (whole.start, whole.end)
    _partition(plan)
    first, *_, last = plan.buckets
    assert (first.start, first.end) == (whole.start, bucket_start(start, "day") + DAY)
    assert (last.start, last.end) == (bucket_start(end, "day"), whole.end)
    assert all(b.end - b.start == DAY for b in plan.buckets[1:-1])


def test_where_the_granularity_expired_a_bucket_is_the_finest_kept() -> None:
    plan = reports.plan_report(NOW - 40 * DAY, NOW - 30 * DAY, "hour", now=NOW)
    _partition(plan)
    sizes = [b.end - b.start for b in plan.buckets]
    assert sizes[0] == DAY  # hours expire after 31 days: the days that hold them
    assert sizes[-1] == 3600


def test_the_bucket_count_is_bounded_before_anything_is_read() -> None:
    with pytest.raises(InvalidArgument) as refused:
        reports.plan_report(0, NOW, "minute", now=NOW)
    assert refused.value.violations[0].field == "granularity"
    assert f"more than {MAX_BUCKETS}" in refused.value.violations[0].description
    # Fewer minutes than the cap in the range are fine, however wide the whole is.
    assert len(reports.plan_report(NOW - 30 * 60, NOW, "minute", now=NOW).buckets) == 31


def test_a_plan_is_bounded_whatever_the_range() -> None:
    first, last = -62135596800, 253402300799  # 0001-01-01, 9999-12-31T23:59:59Z
    plan = plan_buckets(first, last, now=NOW)
    assert plan.start == reports.oldest_kept(NOW) == calendar.timegm((2022, 1, 1, 0, 0, 0))
    assert plan.end == bucket_start(NOW + reports.FUTURE_S, "minute") + 60
    assert len(plan.buckets) < 300
    assert len(reports.plan_report(first, last, "month", now=NOW).buckets) < 100
    with pytest.raises(InvalidArgument) as refused:
        plan_buckets(first, 86400, now=NOW)
    assert refused.value.violations[0].field == "end_time"
    with pytest.raises(InvalidArgument) as refused:
        plan_buckets(last - 60, last, now=NOW)
    assert refused.value.violations[0].field == "start_time"
