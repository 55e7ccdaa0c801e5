"""A report's edges use buckets that are still kept: past the minute buckets'
retention an edge is the hour holding it (past the hours', the day), and the
plan says which range it covers."""

from __future__ import annotations

import calendar

from services.usage.meter import Retention, bucket_start, next_bucket
from services.usage.reports import BucketPlan, plan_buckets

RETENTION = Retention()
NOW = calendar.timegm((2026, 12, 5, 16, 24, 7, 0, 0, 0))
DAY = 86400


def _contiguous(plan: BucketPlan) -> None:
    cursor = plan.start
    for granularity, bucket in plan.buckets:
        assert bucket == cursor  # no gaps, no overlaps
        cursor = next_bucket(bucket, granularity)
    assert cursor == plan.end


def _kept(plan: BucketPlan) -> None:
    for granularity, bucket in plan.buckets:
        if granularity != "month":
            assert bucket + RETENTION.of(granularity) > NOW, (granularity, bucket)


def test_a_range_starting_mid_hour_seven_days_ago_starts_at_that_hour() -> None:
    start = bucket_start(NOW - 7 * DAY, "hour") + 37 * 60  # 10:37 a week ago, say
    plan = plan_buckets(start, NOW, now=NOW)
    assert plan.buckets[0] == ("hour", start - 37 * 60)
    assert plan.start == start - 37 * 60
    assert plan.buckets[-1] == ("minute", bucket_start(NOW, "minute"))  # recent: exact
    _contiguous(plan)
    _kept(plan)


def test_an_end_older_than_the_minutes_ends_with_its_hour() -> None:
    start = bucket_start(NOW - 8 * DAY, "hour") + 37 * 60
    end = bucket_start(NOW - 7 * DAY, "hour") + 22 * 60
    plan = plan_buckets(start, end, now=NOW)
    assert plan.buckets[-1] == ("hour", end - 22 * 60)
    assert (plan.start, plan.end) == (start - 37 * 60, end - 22 * 60 + 3600)
    _contiguous(plan)
    _kept(plan)


def test_an_edge_older_than_the_hours_is_its_day() -> None:
    start = bucket_start(NOW - 40 * DAY, "day") + 5 * 3600 + 37 * 60
    plan = plan_buckets(start, NOW, now=NOW)
    assert plan.buckets[0] == ("day", bucket_start(start, "day"))
    _contiguous(plan)
    _kept(plan)


def test_recent_edges_stay_exact_to_the_minute() -> None:
    start, end = NOW - 3600 - 10.5, NOW - 600.25
    plan = plan_buckets(start, end, now=NOW)
    assert (plan.start, plan.end) == (
        bucket_start(start, "minute"),
        bucket_start(end, "minute") + 60,
    )
    assert {granularity for granularity, _ in plan.buckets} <= {"minute", "hour"}
    _contiguous(plan)
