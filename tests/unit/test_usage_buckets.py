"""Usage buckets: UTC boundaries and exact coverage of a time range."""

from __future__ import annotations

import calendar

from services.core import contract
from services.usage.meter import Retention, bucket_start, contribution, next_bucket
from services.usage.reports import plan_buckets
from tokenmesh.inference.v1 import inference_pb2


def _utc(*fields: int) -> int:
    return calendar.timegm((*fields, 0, 0, 0))


def test_bucket_boundaries_are_utc():
    t = _utc(2026, 11, 22, 13, 47, 31)
    assert bucket_start(t, "minute") == _utc(2026, 11, 22, 13, 47, 0)
    assert bucket_start(t, "hour") == _utc(2026, 11, 22, 13, 0, 0)
    assert bucket_start(t, "day") == _utc(2026, 11, 22, 0, 0, 0)
    assert bucket_start(t, "month") == _utc(2026, 11, 1, 0, 0, 0)
    assert next_bucket(_utc(2026, 12, 1, 0, 0, 0), "month") == _utc(2027, 1, 1, 0, 0, 0)


def test_a_range_is_covered_by_whole_buckets_without_overlap():
    start, end = _utc(2026, 10, 30, 22, 58, 10), _utc(2026, 12, 2, 1, 3, 40)
    plan = plan_buckets(start, end, now=start).buckets  # every bucket still kept
    cursor = bucket_start(start, "minute")
    for granularity, bucket in plan:
        assert bucket == cursor  # contiguous, no gaps or overlaps
        cursor = next_bucket(bucket, granularity)
    assert cursor == bucket_start(end, "minute") + 60
    assert ("month", _utc(2026, 11, 1, 0, 0, 0)) in plan  # a whole month is one read
    assert len(plan) < 80


def test_the_minute_a_report_is_asked_in_is_covered_from_its_first_moment():
    minute = _utc(2026, 12, 1, 22, 24, 0)
    for end in (minute + 0.797, minute + 0.001, minute + 59.9):
        assert plan_buckets(minute - 600, end, now=end).buckets[-1] == ("minute", minute)


def test_a_job_items_cut_attempt_counts_as_no_request():
    # The jobs service tries it again; its finished run is the caller's request. It
    # counted one more: a job of 24 items cut by a restart read 25 requests.
    event = inference_pb2.UsageEvent(request_id="r", event_id="job_1:3", key_id="k")
    event.model.name, event.model.version = "m", "1"
    assert contribution(event, None, Retention()).plain
    event.event_id += f"{contract.UNFINISHED_ATTEMPT_MARK}abc"
    cut = contribution(event, None, Retention())
    assert cut.plain == [] and cut.rows == []
    assert cut.audit_member  # still in the audit log
