"""tokenmesh.usage.v2 reports: usage grouped by one dimension, with its cost.

Reads the same buckets as v1 (so both versions report the same totals) plus
their dimension rows (services.usage.dimensions), which carry the labels
and the price each request was metered at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.core.pricing import CURRENCY, format_amount
from services.usage.dimensions import (
    KINDS,
    Counts,
    GroupKey,
    GroupTotals,
    Row,
    all_cells,
    group,
    row_prefixes,
    totals,
)
from services.usage.meter import bucket_key, dimension_key
from services.usage.reports import (
    READ_BATCH,
    Read,
    ReportBucket,
    check_size,
    granularity_of,
    now,
    report_plan,
    too_large,
)
from tokenmesh.usage.v2 import usage_pb2, usage_service_pb2

_GRANULARITY: dict[int, str] = {
    usage_pb2.GRANULARITY_MINUTE: "minute",
    usage_pb2.GRANULARITY_HOUR: "hour",
    usage_pb2.GRANULARITY_DAY: "day",
    usage_pb2.GRANULARITY_MONTH: "month",
}
Plain = dict[tuple[str, str], Counts]
Rows = dict[Row, Counts]
# A report holds at most this many groups, its own and its buckets' together:
# a day of hourly buckets grouped by a tag with 5,000 values a bucket was an
# 8 MB answer that took 8.5 s of the usage service's CPU.
MAX_REPORT_GROUPS = 10_000
# The dimension hashes a report reads hold at most this many fields (4 a row):
# ~1 s of reading at worst, whatever the range and granularity.
MAX_REPORT_FIELDS = 2_000_000
# Buckets per pipeline: a dimension hash can hold ~20,000 fields, and adding up
# a batch (~1 µs a field) holds the event loop, which the rate limiter shares.
DIMENSION_BATCH = 4
_FEWER_VALUES = ", or group by a dimension with fewer values"


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def totals_pb(group_totals: GroupTotals) -> usage_pb2.UsageTotals:
    """Returns a group's counters and cost as a protobuf message (no cost: unset)."""
    counts, unpriced = group_totals.counts, group_totals.unpriced
    message = usage_pb2.UsageTotals(
        requests=counts.requests,
        prompt_tokens=counts.prompt,
        cached_prompt_tokens=counts.cached,
        completion_tokens=counts.completion,
        total_tokens=counts.prompt + counts.completion,
        unpriced_requests=unpriced.requests,
        unpriced_tokens=unpriced.prompt + unpriced.completion,
    )
    cost = group_totals.cost
    if cost is not None:
        message.cost.CopyFrom(
            usage_pb2.Cost(
                currency_code=CURRENCY,
                prompt=format_amount(cost.prompt),
                cached_prompt=format_amount(cost.cached_prompt),
                completion=format_amount(cost.completion),
                total=format_amount(cost.total),
            )
        )
    return message


def groups_pb(groups: dict[GroupKey, GroupTotals]) -> list[usage_pb2.UsageGroup]:
    """Returns the groups sorted by value."""
    return [
        usage_pb2.UsageGroup(
            value=key.value, model=key.model, version=key.version, totals=totals_pb(groups[key])
        )
        for key in sorted(groups, key=lambda k: (k.value, k.model, k.version))
    ]


def _add_plain(plain: Plain, fields: dict[bytes, bytes]) -> None:
    for raw_field, raw_value in fields.items():
        model, version, kind = raw_field.decode().split("|", 2)
        if kind in KINDS:
            plain[(model, version)].add(kind, int(raw_value))


# A dimension row's counters by the kind its hash field ends in.
_KIND_INDEX = {kind.encode(): index for index, kind in enumerate(KINDS)}


class _Span:
    """_Span is what one listed bucket's hashes (or the whole range's) add up to so far.

    It keeps only the rows its dimension needs (row_prefixes), added up by
    their fields' prefix bytes and parsed once per report (`parsed` is
    shared): hashing a Row per field was most of a report's CPU. It also
    counts the dimension's values seen so far, and those of them the report
    has not seen before (`seen`): each is a group of the bucket and of the
    report, known before the span is read to its end.
    """

    def __init__(self, dimension: str, parsed: dict[bytes, Row], seen: set[str]) -> None:
        self.dimension = dimension
        self.wanted = row_prefixes(dimension)
        self.parsed, self.seen = parsed, seen
        self.plain: Plain = defaultdict(Counts)
        self.by_prefix: dict[bytes, list[int]] = {}
        self.values: set[str] = set()
        self.unseen = 0

    def add(self, plain_fields: dict[bytes, bytes], row_fields: dict[bytes, bytes]) -> None:
        """Adds one bucket's v1 counters and dimension rows."""
        _add_plain(self.plain, plain_fields)
        for raw_field, raw_value in row_fields.items():
            if not raw_field.startswith(self.wanted):
                continue  # another tag's row: most of a busy bucket
            prefix, _, kind = raw_field.rpartition(b"|")
            counts = self.by_prefix.get(prefix)
            if counts is None:
                counts = self.by_prefix[prefix] = [0] * len(KINDS)
                self._count(self._row(prefix).label(self.dimension))
            index = _KIND_INDEX.get(kind)
            if index is not None:  # a kind of a later version: v1 skips those too
                counts[index] += int(raw_value)

    def _count(self, value: str | None) -> None:
        # None: a base row of a report by tag, key or tenant (or by model or
        # version, which no row labels): no group of its own.
        if value is not None and value not in self.values:
            self.values.add(value)
            self.unseen += value not in self.seen

    def _row(self, prefix: bytes) -> Row:
        row = self.parsed.get(prefix)
        if row is None:
            row = self.parsed[prefix] = Row.from_prefix(prefix.decode())
        return row

    def grouped(self) -> tuple[GroupTotals, dict[GroupKey, GroupTotals]]:
        """Returns the span's totals and its groups."""
        rows: Rows = defaultdict(Counts)
        for prefix, counts in self.by_prefix.items():
            rows[self._row(prefix)].plus(Counts(*counts))
        cells = all_cells(self.plain, rows)
        return totals(cells.items()), group(self.dimension, cells, rows)


class _Report:
    """_Report adds up a v2 report bucket by bucket, within MAX_REPORT_GROUPS."""

    def __init__(self, dimension: str, listed: bool) -> None:
        self.dimension, self.listed = dimension, listed
        self.parsed: dict[bytes, Row] = {}
        self.overall = GroupTotals()
        self.groups: dict[GroupKey, GroupTotals] = defaultdict(GroupTotals)
        self.buckets: list[usage_pb2.UsageBucket] = []
        self.listed_groups = 0
        self.seen: set[str] = set()  # the values of `groups`
        self.span = _Span(dimension, self.parsed, self.seen)

    def close(self, bucket: ReportBucket) -> None:
        """Ends the bucket being read: lists it (with usage) and adds it to the totals."""
        overall, groups = self.span.grouped()
        self.span = _Span(self.dimension, self.parsed, self.seen)
        self.overall.plus(overall)
        for key, group_totals in groups.items():
            self.groups[key].plus(group_totals)
            self.seen.add(key.value)
        if self.listed and overall.counts.requests:  # buckets without usage are left out
            self.listed_groups += len(groups)
            self.buckets.append(
                usage_pb2.UsageBucket(
                    start_time=_timestamp(bucket.start),
                    end_time=_timestamp(bucket.end),
                    totals=totals_pb(overall),
                    groups=groups_pb(groups),
                )
            )
        self.check()

    def check(self) -> None:
        """Raises FailedPrecondition once the report surely holds too many groups."""
        at_least = self.listed_groups + len(self.groups) + self.span.unseen
        if self.listed:
            at_least += len(self.span.values)  # the open bucket's own list
        if at_least > MAX_REPORT_GROUPS:
            raise too_large(f"it holds more than {MAX_REPORT_GROUPS:,} groups", _FEWER_VALUES)


class DimensionReader:
    """DimensionReader builds v2 usage reports of one scope over a time range."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def _check_fields(self, keys: list[str]) -> None:
        # HLEN is O(1): the rows are counted before any is read or parsed.
        fields = 0
        for first in range(0, len(keys), READ_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys[first : first + READ_BATCH]:
                    pipe.hlen(key)
                fields += sum(await pipe.execute())
        if fields > MAX_REPORT_FIELDS:
            raise too_large(
                f"its buckets hold {fields // 4:,} usage rows (labels and tag values),"
                f" more than the {MAX_REPORT_FIELDS // 4:,} a report reads",
                _FEWER_VALUES,
            )

    async def _pairs(
        self, scope: str, reads: list[Read]
    ) -> AsyncIterator[list[tuple[dict[bytes, bytes], dict[bytes, bytes]]]]:
        """Yields each read's (v1 counters, dimension rows), a pipeline at a time."""
        for first in range(0, len(reads), DIMENSION_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for granularity, start in reads[first : first + DIMENSION_BATCH]:
                    pipe.hgetall(bucket_key(scope, granularity, start))
                    pipe.hgetall(dimension_key(scope, granularity, start))
                hashes: list[Any] = await pipe.execute()
            yield list(zip(hashes[::2], hashes[1::2], strict=True))

    async def report(
        self, scope: str, start: float, end: float, granularity: int, dimension: str
    ) -> usage_service_pb2.GetUsageResponse:
        """Builds a v2 GetUsage response for one scope, grouped by `dimension`.

        The totals and groups are the listed buckets' sums (the same reads);
        with no granularity nothing is listed. A report too large to build
        within MAX_REPORT_FIELDS, MAX_REPORT_GROUPS and MAX_REPORT_BYTES is
        refused (FailedPrecondition) rather than cut: a billing export needs
        every group exact.
        """
        size = granularity_of(granularity, _GRANULARITY)
        plan = report_plan(start, end, size, now=now())
        reads = plan.reads()
        await self._check_fields([dimension_key(scope, *read) for read in reads])
        report = _Report(dimension, listed=size is not None)
        buckets = iter(plan.buckets)
        bucket = next(buckets)
        left = len(bucket.reads)
        async for pairs in self._pairs(scope, reads):
            for plain_fields, row_fields in pairs:
                report.span.add(plain_fields, row_fields)
                left -= 1
                if not left:
                    report.close(bucket)
                    bucket = next(buckets, bucket)
                    left = len(bucket.reads)
            report.check()
        response = usage_service_pb2.GetUsageResponse(
            totals=totals_pb(report.overall),
            group_by=dimension,
            groups=groups_pb(report.groups),
            buckets=report.buckets,
            start_time=_timestamp(plan.start),  # what the totals cover: the response says so
            end_time=_timestamp(plan.end),
        )
        return check_size(response)
