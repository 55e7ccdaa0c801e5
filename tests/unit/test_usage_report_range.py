"""A usage report's default range (services.usage.servicer.range_of)."""

from __future__ import annotations

import datetime

import pytest
from google.protobuf import timestamp_pb2

from services.core.errors import InvalidArgument
from services.usage.servicer import range_of
from tokenmesh.usage.v1 import usage_service_pb2 as pb


def _at(year: int, month: int, day: int, hour: int = 0) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.datetime(year, month, day, hour, tzinfo=datetime.UTC))
    return stamp


def _seconds(year: int, month: int, day: int, hour: int = 0) -> float:
    return datetime.datetime(year, month, day, hour, tzinfo=datetime.UTC).timestamp()


def test_an_end_on_the_first_of_a_month_reports_the_month_it_ends():
    """ "Everything up to the end of April" was refused, naming start_time, which the
    caller never sent: the default start was the end's own month, i.e. the end."""
    request = pb.GetUsageRequest(end_time=_at(2025, 5, 1))
    assert range_of(request) == (_seconds(2025, 4, 1), _seconds(2025, 5, 1))


def test_an_end_within_a_month_reports_from_that_months_start():
    request = pb.GetUsageRequest(end_time=_at(2025, 5, 17, 6))
    assert range_of(request) == (_seconds(2025, 5, 1), _seconds(2025, 5, 17, 6))


def test_a_start_after_the_end_is_refused():
    request = pb.GetUsageRequest(start_time=_at(2025, 5, 2), end_time=_at(2025, 5, 1))
    with pytest.raises(InvalidArgument):
        range_of(request)


def test_an_end_to_come_reports_from_this_months_start():
    """A far-future end took its own month's start: refused, naming start_time."""
    request = pb.GetUsageRequest(end_time=_at(2100, 3, 1))
    start, end = range_of(request)
    now = datetime.datetime.now(datetime.UTC)
    assert start == _seconds(now.year, now.month, 1) and end == _seconds(2100, 3, 1)
