"""Usage reports read from the meter's buckets, and the audit log."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.core.errors import FieldViolation, InvalidArgument
from services.usage.meter import PREFIX, Retention, bucket_key, bucket_start, next_bucket
from tokenmesh.usage.v1 import usage_pb2, usage_service_pb2

_GRANULARITY: dict[int, str] = {
    usage_pb2.GRANULARITY_MINUTE: "minute",
    usage_pb2.GRANULARITY_HOUR: "hour",
    usage_pb2.GRANULARITY_DAY: "day",
    usage_pb2.GRANULARITY_MONTH: "month",
}
MAX_BUCKETS = 2000
_COARSE_TO_FINE = ("month", "day", "hour", "minute")
# The meter's bucket retention (the usage service sets only the audit log's).
_RETENTION = Retention()
# A bucket's hash expires its granularity's retention after its last increment,
# which comes after the bucket starts, but by other clocks (the worker's, Redis's):
# a bucket is read only while it is this much inside its retention.
_CLOCK_MARGIN_S = 3600


@dataclass
class Totals:
    """Totals are summed counters, per model/version and overall."""

    requests: int = 0
    prompt: int = 0
    completion: int = 0
    finish_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    templates: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cache: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, amount: int) -> None:
        """Adds one counter from a bucket hash field."""
        if kind == "requests":
            self.requests += amount
        elif kind == "prompt":
            self.prompt += amount
        elif kind == "completion":
            self.completion += amount
        elif kind.startswith("fr:"):
            self.finish_reasons[kind[3:]] += amount
        elif kind.startswith("tpl:"):
            self.templates[kind[4:]] += amount
        elif kind.startswith("cache:"):
            self.cache[kind[6:]] += amount

    def to_pb(self) -> usage_pb2.UsageTotals:
        """Returns the totals as a protobuf message."""
        return usage_pb2.UsageTotals(
            requests=self.requests,
            prompt_tokens=self.prompt,
            completion_tokens=self.completion,
            total_tokens=self.prompt + self.completion,
            requests_by_finish_reason=dict(self.finish_reasons),
            requests_by_template=dict(self.templates),
            cached_requests=self.cache["requests"],
            cached_completion_tokens=self.cache["completion"],
            cache_unbilled_tokens=self.cache["unbilled"],
        )


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def month_start(now: float) -> int:
    """Returns the start of the current calendar month (UTC)."""
    return bucket_start(now, "month")


@dataclass(frozen=True)
class BucketPlan:
    """BucketPlan is the buckets a report reads and the range they cover exactly."""

    buckets: list[tuple[str, int]]
    start: int  # the effective range: [start, end)
    end: int


def _finest_kept(at: int, now: float, retention: Retention) -> str:
    """Returns the finest granularity whose bucket holding `at` is surely still kept."""
    for granularity in ("minute", "hour", "day"):
        if bucket_start(at, granularity) + retention.of(granularity) - _CLOCK_MARGIN_S > now:
            return granularity
    return "month"  # older than every retention: a month bucket, if anything, is left


def plan_buckets(
    start: float, end: float, *, now: float, retention: Retention = _RETENTION
) -> BucketPlan:
    """Covers [start, end) with the fewest whole buckets (months, days, hours, minutes).

    The edges are the finest buckets still kept: a minute for recent usage,
    the hour (or day, or month) holding an edge whose minutes (or hours, or
    days) have expired. An expired bucket reads as empty, so a report from it
    would silently leave usage out; a billing user would rather be billed for
    a range a little wider than asked, and told so (the effective range in the
    response), than read a wrong total. Refusing the range instead would
    break the plainest query, "the last 7 days".
    """
    out: list[tuple[str, int]] = []
    first = bucket_start(start, _finest_kept(int(start), now, retention))
    cursor = first
    # `end` stays fractional: truncated, a report asked for in the first second
    # of a minute would leave out that minute's bucket and what it holds.
    while cursor < end:
        # `cursor` is a boundary of `finest`: a later bucket is kept at least as
        # finely as an earlier one, and a coarse boundary is a finer one too.
        finest = _finest_kept(cursor, now, retention)
        for granularity in _COARSE_TO_FINE[: _COARSE_TO_FINE.index(finest) + 1]:
            aligned = bucket_start(cursor, granularity) == cursor
            following = next_bucket(cursor, granularity)
            if aligned and following <= end or granularity == finest:
                out.append((granularity, cursor))
                cursor = following
                break
    return BucketPlan(out, first, cursor)


_AUDIT_TOKEN_VERSION = "2"  # version 1 was a bare offset from the newest entry
_AUDIT_TOKEN_INT = re.compile(r"-?[0-9]{1,19}")
_NOT_OURS = "is not a token this service issued"
_OFFSET_TOKEN = (
    "is an offset token of an earlier version of this service, which cannot resume a"
    " listing exactly (entries metered since would shift it); list again from the first page"
)


def _tenant_mark(tenant: str) -> str:
    # A token names its tenant by a digest: short, whatever the name's length.
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AuditListing:
    """AuditListing is one listing of a tenant's audit log, first page to last.

    Its range [start_ms, end_ms) is fixed by the first page (a default end is
    "now" then, not at each page) and `place` is the last entry listed,
    (score, member) as the sorted set holds them; the page token carries both.
    """

    tenant: str
    start_ms: int
    end_ms: int
    place: tuple[int, bytes] | None = None

    def token_after(self, score: int, member: bytes) -> str:
        """Returns the page token that resumes the listing after the entry (score, member)."""
        packed = base64.urlsafe_b64encode(bytes.fromhex(member.decode())).decode().rstrip("=")
        parts = [self.end_ms, self.start_ms, score, _tenant_mark(self.tenant), packed]
        return ".".join([_AUDIT_TOKEN_VERSION, *map(str, parts)])


def resume_listing(tenant: str, token: str) -> AuditListing:
    """Returns the listing a page token resumes; raises InvalidArgument naming
    `page_token` for a token this service did not issue for `tenant`, and for an
    offset token of an earlier version (resuming it could repeat or skip entries)."""
    if token.isdigit():
        raise InvalidArgument([FieldViolation("page_token", _OFFSET_TOKEN)])
    parts = token.split(".")
    numbers = parts[1:4]
    if (
        len(parts) != 6
        or parts[0] != _AUDIT_TOKEN_VERSION
        or not all(_AUDIT_TOKEN_INT.fullmatch(n) for n in numbers)
    ):
        raise InvalidArgument([FieldViolation("page_token", _NOT_OURS)])
    if parts[4] != _tenant_mark(tenant):
        raise InvalidArgument([FieldViolation("page_token", "was issued for another tenant")])
    try:
        raw = base64.urlsafe_b64decode(parts[5] + "=" * (-len(parts[5]) % 4))
    except (binascii.Error, ValueError):
        raise InvalidArgument([FieldViolation("page_token", _NOT_OURS)]) from None
    end_ms, start_ms, score = map(int, numbers)
    if not raw or not start_ms <= score < end_ms:
        raise InvalidArgument([FieldViolation("page_token", _NOT_OURS)])
    return AuditListing(tenant, start_ms, end_ms, (score, raw.hex().encode()))


class UsageReader:
    """UsageReader sums buckets for a scope over a time range."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def totals(
        self, scope: str, buckets: list[tuple[str, int]], by_version: bool
    ) -> tuple[Totals, dict[tuple[str, str], Totals]]:
        """Returns overall and per-model totals of `scope` over `buckets`."""
        overall = Totals()
        per_model: dict[tuple[str, str], Totals] = defaultdict(Totals)
        async with self.redis.pipeline(transaction=False) as pipe:
            for granularity, start in buckets:
                pipe.hgetall(bucket_key(scope, granularity, start))
            hashes = await pipe.execute()
        for fields in hashes:
            for raw_field, raw_value in fields.items():
                model, version, kind = raw_field.decode().split("|", 2)
                amount = int(raw_value)
                overall.add(kind, amount)
                per_model[(model, version if by_version else "")].add(kind, amount)
        return overall, per_model

    async def report(
        self, scope: str, start: float, end: float, granularity: int, by_version: bool
    ) -> usage_service_pb2.GetUsageResponse:
        """Builds a GetUsage response for one scope."""
        plan = plan_buckets(start, end, now=now())
        start, end = plan.start, plan.end  # what the totals cover: the response says so
        overall, per_model = await self.totals(scope, plan.buckets, by_version)
        totals = overall.to_pb()
        response = usage_service_pb2.GetUsageResponse(
            requests=totals.requests,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            total_tokens=totals.total_tokens,
            requests_by_finish_reason=dict(totals.requests_by_finish_reason),
            requests_by_template=dict(totals.requests_by_template),
            cached_requests=totals.cached_requests,
            cached_completion_tokens=totals.cached_completion_tokens,
            cache_unbilled_tokens=totals.cache_unbilled_tokens,
            by_model=[
                usage_pb2.ModelUsage(model=m, version=v, totals=t.to_pb())
                for (m, v), t in sorted(per_model.items())
            ],
            start_time=_timestamp(start),
            end_time=_timestamp(end),
        )
        if granularity in _GRANULARITY:
            response.buckets.extend(
                await self._buckets(scope, start, end, _GRANULARITY[granularity], by_version)
            )
        return response

    async def _buckets(
        self, scope: str, start: float, end: float, granularity: str, by_version: bool
    ) -> list[usage_pb2.UsageBucket]:
        out: list[usage_pb2.UsageBucket] = []
        cursor = bucket_start(start, granularity)
        while cursor < end and len(out) < MAX_BUCKETS:
            following = next_bucket(cursor, granularity)
            overall, per_model = await self.totals(scope, [(granularity, cursor)], by_version)
            if overall.requests:
                out.append(
                    usage_pb2.UsageBucket(
                        start_time=_timestamp(cursor),
                        end_time=_timestamp(following),
                        totals=overall.to_pb(),
                        by_model=[
                            usage_pb2.ModelUsage(model=m, version=v, totals=t.to_pb())
                            for (m, v), t in sorted(per_model.items())
                        ],
                    )
                )
            cursor = following
        return out

    async def audit(
        self, listing: AuditListing, page_size: int
    ) -> tuple[list[usage_pb2.AuditEntry], str]:
        """Returns the next page of a listing's entries, newest first, and the next page token.

        The page goes on after the listing's place, (score, member) in the
        sorted set's own order, not at an offset: entries metered between
        two pages (newer ones, or ones shipped late into a range already
        read) move no page, so nothing repeats and nothing is skipped.
        """
        key = f"{PREFIX}audit:{listing.tenant}"
        high = f"({listing.end_ms}"
        # One transaction: the place's ties and what follows them are one snapshot.
        async with self.redis.pipeline(transaction=True) as pipe:
            if listing.place is not None:
                score, _ = listing.place
                # Entries of the place's millisecond: the set orders them by
                # member, so those below the place's member come next. They are
                # few (one tenant's requests that finished in the same ms).
                pipe.zrevrangebyscore(key, score, score)
                high = f"({score}"
            pipe.zrevrangebyscore(
                key, high, listing.start_ms, start=0, num=page_size + 1, withscores=True
            )
            replies: list[Any] = await pipe.execute()
        rows: list[tuple[int, bytes]] = []
        if listing.place is not None:
            score, member = listing.place
            rows += [(score, m) for m in replies[0] if m < member]
        rows += [(int(s), m) for m, s in replies[-1]]
        page = rows[:page_size]
        entries = [usage_pb2.AuditEntry.FromString(bytes.fromhex(m.decode())) for _, m in page]
        return entries, listing.token_after(*page[-1]) if len(rows) > page_size else ""


def now() -> float:
    """Returns the current time (seconds); one place for tests to reason about."""
    return time.time()
