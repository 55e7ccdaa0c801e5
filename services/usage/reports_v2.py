"""tokenmesh.usage.v2 reports: usage grouped by one dimension, with its cost.

Reads the same buckets as v1 (so both versions report the same totals) plus
their dimension rows (services.usage.dimensions), which carry the labels
and the price each request was metered at.
"""

from __future__ import annotations

from collections import defaultdict
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
    totals,
)
from services.usage.meter import bucket_key, bucket_start, dimension_key, next_bucket
from services.usage.reports import MAX_BUCKETS, now, plan_buckets
from tokenmesh.usage.v2 import usage_pb2, usage_service_pb2

_GRANULARITY: dict[int, str] = {
    usage_pb2.GRANULARITY_MINUTE: "minute",
    usage_pb2.GRANULARITY_HOUR: "hour",
    usage_pb2.GRANULARITY_DAY: "day",
    usage_pb2.GRANULARITY_MONTH: "month",
}
Plain = dict[tuple[str, str], Counts]
Rows = dict[Row, Counts]


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


def _add_rows(rows: Rows, fields: dict[bytes, bytes]) -> None:
    for raw_field, raw_value in fields.items():
        row, kind = Row.parse(raw_field.decode())
        rows[row].add(kind, int(raw_value))


class DimensionReader:
    """DimensionReader builds v2 usage reports of one scope over a time range."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def read(self, scope: str, buckets: list[tuple[str, int]]) -> tuple[Plain, Rows]:
        """Returns the v1 counters per model version and the dimension rows of `buckets`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for granularity, start in buckets:
                pipe.hgetall(bucket_key(scope, granularity, start))
                pipe.hgetall(dimension_key(scope, granularity, start))
            hashes: list[Any] = await pipe.execute()
        plain: Plain = defaultdict(Counts)
        rows: Rows = defaultdict(Counts)
        for plain_fields, row_fields in zip(hashes[::2], hashes[1::2], strict=True):
            _add_plain(plain, plain_fields)
            _add_rows(rows, row_fields)
        return plain, rows

    async def _grouped(
        self, scope: str, buckets: list[tuple[str, int]], dimension: str
    ) -> tuple[GroupTotals, dict[GroupKey, GroupTotals]]:
        plain, rows = await self.read(scope, buckets)
        cells = all_cells(plain, rows)
        return totals(cells.items()), group(dimension, cells, rows)

    async def report(
        self, scope: str, start: float, end: float, granularity: int, dimension: str
    ) -> usage_service_pb2.GetUsageResponse:
        """Builds a v2 GetUsage response for one scope, grouped by `dimension`."""
        plan = plan_buckets(start, end, now=now())
        start, end = plan.start, plan.end  # what the totals cover: the response says so
        overall, groups = await self._grouped(scope, plan.buckets, dimension)
        response = usage_service_pb2.GetUsageResponse(
            totals=totals_pb(overall),
            group_by=dimension,
            groups=groups_pb(groups),
            start_time=_timestamp(start),
            end_time=_timestamp(end),
        )
        if granularity in _GRANULARITY:
            response.buckets.extend(
                await self._buckets(scope, start, end, _GRANULARITY[granularity], dimension)
            )
        return response

    async def _buckets(
        self, scope: str, start: float, end: float, granularity: str, dimension: str
    ) -> list[usage_pb2.UsageBucket]:
        out: list[usage_pb2.UsageBucket] = []
        cursor = bucket_start(start, granularity)
        while cursor < end and len(out) < MAX_BUCKETS:
            following = next_bucket(cursor, granularity)
            overall, groups = await self._grouped(scope, [(granularity, cursor)], dimension)
            if overall.counts.requests:
                out.append(
                    usage_pb2.UsageBucket(
                        start_time=_timestamp(cursor),
                        end_time=_timestamp(following),
                        totals=totals_pb(overall),
                        groups=groups_pb(groups),
                    )
                )
            cursor = following
        return out
