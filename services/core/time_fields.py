"""Timestamp and Duration request fields, read with the range checks protobuf leaves to us.

A client can send any `seconds` and `nanos` on the wire; protobuf's
`ToNanoseconds()` then raises ValueError, which the error boundary would
report as INTERNAL. These helpers turn an out-of-range value into
INVALID_ARGUMENT naming the field (found by the hostile-input suite).
"""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from services.core.errors import FieldViolation, InvalidArgument

TIMESTAMP_RULE = "must be between 0001-01-01 and 9999-12-31 with nanos in [0, 999999999]"
DURATION_RULE = "must be within +-10000 years with nanos of the same sign as seconds"
MAX_DURATION_SECONDS = 315_576_000_000  # 10,000 years, google.protobuf.Duration's range


def timestamp_seconds(value: timestamp_pb2.Timestamp, field_name: str) -> float:
    """Returns a Timestamp as seconds since the epoch; raises InvalidArgument when out of range."""
    try:
        return value.ToNanoseconds() / 1e9
    except ValueError:
        raise InvalidArgument([FieldViolation(field_name, TIMESTAMP_RULE)]) from None


def timestamp_millis(value: timestamp_pb2.Timestamp, field_name: str) -> int:
    """Returns a Timestamp as whole milliseconds since the epoch (exact, unlike seconds * 1000)."""
    timestamp_seconds(value, field_name)
    return value.ToMilliseconds()


def duration_seconds(value: duration_pb2.Duration, field_name: str) -> float:
    """Returns a Duration in seconds; raises InvalidArgument when out of range.

    protobuf does not check a Duration it converts, so the range is checked here.
    """
    seconds, nanos = value.seconds, value.nanos
    in_range = abs(seconds) <= MAX_DURATION_SECONDS and abs(nanos) <= 999_999_999
    if not in_range or (seconds < 0 < nanos) or (nanos < 0 < seconds):
        raise InvalidArgument([FieldViolation(field_name, DURATION_RULE)])
    return seconds + nanos / 1e9
