"""Usage reports read from the meter's buckets, and the audit log."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.usage.meter import (
    PREFIX,
    Retention,
    audit_entry_of,
    bucket_key,
    bucket_start,
    legacy_month_start,
    next_bucket,
)
from tokenmesh.usage.v1 import usage_pb2, usage_service_pb2

_GRANULARITY: dict[int, str] = {
    usage_pb2.GRANULARITY_MINUTE: "minute",
    usage_pb2.GRANULARITY_HOUR: "hour",
    usage_pb2.GRANULARITY_DAY: "day",
    usage_pb2.GRANULARITY_MONTH: "month",
}
# A report lists at most this many buckets; a range holding more of its
# granularity's is refused before anything is read (an hourly report of a
# month is 744; a minute report from 1970 was 30 M Redis round trips).
MAX_BUCKETS = 2000
# A report's answer is at most this big: a gRPC client refuses more than 4 MiB
# by default, and Envoy's REST transcoder buffers at most 8 MiB.
MAX_REPORT_BYTES = 3 * 1024 * 1024
# No usage is metered in the future: an end this far ahead (a year for
# "this year" reports, with room) is as far as a report reads. 9999-12-31
# was read up to 10000-01-01, which no Timestamp holds (INTERNAL).
FUTURE_S = 366 * 86400
# Hashes per pipeline: a report's reads go in batches, and other requests on
# the event loop (the rate limiter's) run between them.
READ_BATCH = 256
_COARSE_TO_FINE = ("month", "day", "hour", "minute")
# The meter's bucket retention (the usage service sets only the audit log's).
_RETENTION = Retention()
# A bucket's hash expires its granularity's retention after its last increment,
# which comes after the bucket starts, but by other clocks (the worker's, Redis's):
# a bucket is read only while it is this much inside its retention.
_CLOCK_MARGIN_S = 3600
Read = tuple[str, int]  # one bucket hash: (granularity, start)
_Answer = TypeVar("_Answer", bound=Message)


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


def _iso(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def granularity_of(value: int, sizes: Mapping[int, str] = _GRANULARITY) -> str | None:
    """Returns the bucket size a request's granularity names (None: unspecified)."""
    if value == 0:  # GRANULARITY_UNSPECIFIED, in every version
        return None
    if value not in sizes:  # proto3 keeps an unknown enum number as it is
        raise InvalidArgument([FieldViolation("granularity", f"{value} is not a Granularity")])
    return sizes[value]


@dataclass(frozen=True)
class BucketPlan:
    """BucketPlan is the buckets that cover a report's range, and that range exactly."""

    buckets: list[Read]
    start: int  # the effective range: [start, end)
    end: int


@dataclass(frozen=True)
class ReportBucket:
    """ReportBucket is one bucket of a report's list: its range and the hashes it sums
    (with_legacy's: a month's may be two)."""

    start: int
    end: int
    reads: tuple[Read, ...]


@dataclass(frozen=True)
class ReportPlan:
    """ReportPlan is a report's effective range, split into the buckets it lists."""

    start: int
    end: int
    buckets: list[ReportBucket]

    def reads(self) -> list[Read]:
        """Returns every hash the report reads, bucket by bucket."""
        return [read for bucket in self.buckets for read in bucket.reads]


def oldest_kept(now: float, retention: Retention = _RETENTION) -> int:
    """Returns the start of the oldest month whose bucket is surely still kept."""
    return next_bucket(bucket_start(now - retention.month + _CLOCK_MARGIN_S, "month"), "month")


def _finest_kept(at: int, now: float, retention: Retention) -> str:
    """Returns the finest granularity whose bucket holding `at` is surely still kept."""
    for granularity in ("minute", "hour", "day"):
        if bucket_start(at, granularity) + retention.of(granularity) - _CLOCK_MARGIN_S > now:
            return granularity
    return "month"  # past the days' retention (a range starts no earlier than oldest_kept)


def _advance(cursor: int, granularity: str) -> int:
    following = next_bucket(cursor, granularity)
    if following <= cursor:  # a loop over buckets would never end
        raise RuntimeError(f"the {granularity} bucket after {cursor} starts at {following}")
    return following


def _kept_range(start: float, end: float, now: float, retention: Retention) -> tuple[float, float]:
    """Returns [start, end) cut to what can hold usage: the retention, and no further
    into the future than FUTURE_S; raises InvalidArgument for a range outside both."""
    oldest = oldest_kept(now, retention)
    if end <= oldest:
        kept = f"usage is kept {retention.month // (365 * 86400)} years"
        raise InvalidArgument(
            [
                FieldViolation(
                    "end_time", f"is before the oldest usage kept, {_iso(oldest)} ({kept})"
                )
            ]
        )
    latest = now + FUTURE_S
    if start >= latest:
        ahead = f"is more than {FUTURE_S // 86400} days after now (no usage is metered ahead)"
        raise InvalidArgument([FieldViolation("start_time", ahead)])
    return max(start, oldest), min(end, latest)


def _cover(first: int, end: float, now: float, retention: Retention) -> BucketPlan:
    """Covers [first, end) with the fewest whole buckets; `first` is a boundary of
    the finest granularity kept there."""
    out: list[Read] = []
    cursor = first
    # `end` stays fractional: truncated, a report asked for in the first second
    # of a minute would leave out that minute's bucket and what it holds.
    while cursor < end:
        # `cursor` is a boundary of `finest`: a later bucket is kept at least as
        # finely as an earlier one, and a coarse boundary is a finer one too.
        finest = _finest_kept(cursor, now, retention)
        for granularity in _COARSE_TO_FINE[: _COARSE_TO_FINE.index(finest) + 1]:
            aligned = bucket_start(cursor, granularity) == cursor
            following = _advance(cursor, granularity)
            if aligned and following <= end or granularity == finest:
                out.append((granularity, cursor))
                cursor = following
                break
    return BucketPlan(out, first, cursor)


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
    break the plainest query, "the last 7 days". For the same reason the range
    starts no earlier than the oldest month still kept (a range from 1970 is
    "everything kept", not 670 empty months) and ends no later than FUTURE_S
    from now: a plan is a few hundred buckets at most, whatever is asked.
    """
    start, end = _kept_range(start, end, now, retention)
    return _cover(
        bucket_start(start, _finest_kept(int(start), now, retention)), end, now, retention
    )


def with_legacy(buckets: list[Read]) -> tuple[Read, ...]:
    """Returns the hashes that hold `buckets`' usage: each bucket's, and a month's
    legacy hash (meter.legacy_month_start) where the process's zone puts it apart.

    Before month keys were UTC, a meter outside UTC wrote each month under that
    legacy key, so after an upgrade a report of a whole earlier month read 0.
    The two are added up: new usage goes only to the UTC key, so nothing counts
    twice. In UTC they are the same hash, read once.
    """
    out: list[Read] = []
    for granularity, start in buckets:
        out.append((granularity, start))
        if granularity == "month" and (legacy := legacy_month_start(start)) != start:
            out.append((granularity, legacy))
    return tuple(out)


def _coarser(a: str, b: str) -> str:
    return a if _COARSE_TO_FINE.index(a) <= _COARSE_TO_FINE.index(b) else b


def _too_many(granularity: str) -> InvalidArgument:
    return InvalidArgument(
        [
            FieldViolation(
                "granularity",
                f"start_time..end_time holds more than {MAX_BUCKETS} {granularity} buckets,"
                " the most a report lists: narrow the range or choose a coarser granularity",
            )
        ]
    )


def _kept_buckets(whole: BucketPlan, granularity: str, now: float, retention: Retention) -> int:
    """Returns how many whole `granularity` buckets still kept lie in the plan's range."""
    if granularity == "month":
        return 0  # a plan spans a few dozen months at most
    size = next_bucket(0, granularity)
    oldest = bucket_start(now - retention.of(granularity) + _CLOCK_MARGIN_S, granularity) + size
    first = bucket_start(max(whole.start, oldest) + size - 1, granularity)
    return max(0, (whole.end - first) // size)


def plan_report(
    start: float, end: float, granularity: str, *, now: float, retention: Retention = _RETENTION
) -> ReportPlan:
    """Splits a report's effective range (plan_buckets') into buckets of `granularity`.

    The list adds up to the totals: its buckets cover the effective range
    exactly, so the first and the last are cut to it where the range starts
    or ends inside one (each bucket's start and end say so). Where the
    granularity's buckets have expired (minutes after 2 days, hours after 31,
    days after 400), a bucket is the finest one still kept there (an hour, a
    day, a month). Raises InvalidArgument naming `granularity` when the
    range holds more than MAX_BUCKETS, before anything is read.
    """
    whole = plan_buckets(start, end, now=now, retention=retention)
    if _kept_buckets(whole, granularity, now, retention) > MAX_BUCKETS:
        raise _too_many(granularity)  # at once: the walk below took 20 ms to find out
    out: list[ReportBucket] = []
    cursor = whole.start
    while cursor < whole.end:
        if len(out) == MAX_BUCKETS:
            raise _too_many(granularity)
        size = _coarser(granularity, _finest_kept(cursor, now, retention))
        edge = min(_advance(bucket_start(cursor, size), size), whole.end)
        # A boundary of `size` is one of every finer granularity kept after it.
        part = _cover(cursor, edge, now, retention)
        out.append(ReportBucket(cursor, part.end, with_legacy(part.buckets)))
        cursor = part.end
    return ReportPlan(whole.start, cursor, out)


def report_plan(start: float, end: float, granularity: str | None, *, now: float) -> ReportPlan:
    """Returns plan_report's plan, or with no granularity one bucket: the effective range."""
    if granularity is not None:
        return plan_report(start, end, granularity, now=now)
    whole = plan_buckets(start, end, now=now)
    return ReportPlan(
        whole.start, whole.end, [ReportBucket(whole.start, whole.end, with_legacy(whole.buckets))]
    )


def check_size(response: _Answer) -> _Answer:
    """Returns `response`; raises FailedPrecondition when it is over MAX_REPORT_BYTES."""
    size = response.ByteSize()
    if size > MAX_REPORT_BYTES:
        raise too_large(f"its answer would be {size:,} bytes, more than {MAX_REPORT_BYTES:,}")
    return response


def too_large(what: str, advice: str = "") -> FailedPrecondition:
    """Returns the error that refuses a report too large to build or send."""
    return FailedPrecondition(
        f"this usage report is too large: {what}; narrow start_time..end_time or choose a"
        f" coarser granularity (or none){advice}",
        reason="USAGE_REPORT_TOO_LARGE",
    )


# Version 1 was a bare offset from the newest entry; version 2 carried its entry's
# bytes (its member was their hex); 3 carries the member itself (raw or hex).
_AUDIT_TOKEN_VERSION = "3"
_HEX_MEMBER_TOKEN_VERSION = "2"
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
        packed = base64.urlsafe_b64encode(member).decode().rstrip("=")
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
        or parts[0] not in (_AUDIT_TOKEN_VERSION, _HEX_MEMBER_TOKEN_VERSION)
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
    member = raw.hex().encode() if parts[0] == _HEX_MEMBER_TOKEN_VERSION else raw
    return AuditListing(tenant, start_ms, end_ms, (score, member))


PerModel = tuple[Totals, dict[tuple[str, str], Totals]]


def _response(overall: PerModel, plan: ReportPlan) -> usage_service_pb2.GetUsageResponse:
    totals = overall[0].to_pb()
    return usage_service_pb2.GetUsageResponse(
        requests=totals.requests,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.total_tokens,
        requests_by_finish_reason=dict(totals.requests_by_finish_reason),
        requests_by_template=dict(totals.requests_by_template),
        cached_requests=totals.cached_requests,
        cached_completion_tokens=totals.cached_completion_tokens,
        cache_unbilled_tokens=totals.cache_unbilled_tokens,
        by_model=_by_model(overall[1]),
        start_time=_timestamp(plan.start),  # what the totals cover: the response says so
        end_time=_timestamp(plan.end),
    )


def fold(fields: dict[bytes, bytes], by_version: bool, *into: PerModel) -> None:
    """Adds one bucket hash's counters to each (overall, per model) pair in `into`."""
    for raw_field, raw_value in fields.items():
        model, version, kind = raw_field.decode().split("|", 2)
        amount = int(raw_value)
        for overall, per_model in into:
            overall.add(kind, amount)
            per_model[(model, version if by_version else "")].add(kind, amount)


def _per_model() -> PerModel:
    return Totals(), defaultdict(Totals)


def _by_model(per_model: dict[tuple[str, str], Totals]) -> list[usage_pb2.ModelUsage]:
    return [
        usage_pb2.ModelUsage(model=m, version=v, totals=t.to_pb())
        for (m, v), t in sorted(per_model.items())
    ]


class UsageReader:
    """UsageReader sums buckets for a scope over a time range."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def hashes(self, keys: list[str]) -> list[dict[bytes, bytes]]:
        """Returns the hashes at `keys`, read in pipelines of READ_BATCH."""
        out: list[dict[bytes, bytes]] = []
        for first in range(0, len(keys), READ_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys[first : first + READ_BATCH]:
                    pipe.hgetall(key)
                out += await pipe.execute()
        return out

    async def report(
        self, scope: str, start: float, end: float, granularity: int, by_version: bool
    ) -> usage_service_pb2.GetUsageResponse:
        """Builds a GetUsage response for one scope.

        Every bucket listed and the totals are summed from the same reads, so
        the buckets add up to the totals; with no granularity the list is one
        bucket, the whole effective range (even without usage).
        """
        size = granularity_of(granularity)
        plan = report_plan(start, end, size, now=now())
        hashes = iter(await self.hashes([bucket_key(scope, *read) for read in plan.reads()]))
        overall = _per_model()
        buckets: list[usage_pb2.UsageBucket] = []
        for bucket in plan.buckets:
            own = _per_model()
            for _ in bucket.reads:
                fold(next(hashes), by_version, overall, own)
            if own[0].requests or size is None:  # buckets without usage are left out
                buckets.append(
                    usage_pb2.UsageBucket(
                        start_time=_timestamp(bucket.start),
                        end_time=_timestamp(bucket.end),
                        totals=own[0].to_pb(),
                        by_model=_by_model(own[1]),
                    )
                )
        response = _response(overall, plan)
        response.buckets.extend(buckets)
        return check_size(response)

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
        entries = [audit_entry_of(member) for _, member in page]
        return entries, listing.token_after(*page[-1]) if len(rows) > page_size else ""


def now() -> float:
    """Returns the current time (seconds); one place for tests to reason about."""
    return time.time()
