"""Lossless, exact metering: a consumer group over the workers' usage stream.

Each event is applied by one Lua script that (1) claims its event_id (else,
in events from before it, its request_id: SET NX with a retention TTL), (2)
adds it to the minute/hour/day/month buckets of its
key, its tenant and the whole mesh, (3) records an audit entry, and (4) acks
the stream entry — atomically, so a replayed or re-claimed event never counts
twice and an applied one is never lost. The script says whether the event was
new: the process's counters (tokenmesh_usage_events_applied_total, per tenant)
count it only then, so they agree with the reports. Entries a crashed consumer
left pending are claimed by another after `claim_idle_s`.

Events are applied in batches: the meter lingers a moment (`linger_s`) after
the first new entries arrive so that more join them, then one script applies
the whole batch, with each bucket's increments summed, when none of its
requests was metered before. A batch holding a replay is applied one event
at a time (the per-event script), so a replay still counts once. At 100
requests/s, one round trip per event cost the meter ~1.8 ms of CPU per event
on our 2-core VM (each wake-up is dear there); batching costs a few tenths of
a second of metering delay, which reports never notice.

Each entry a worker's spool shipped names its spool and the spool position
the event ends at (services/inference/usage_log.py); the script that applies
it also raises that spool's applied mark to the position, in the same atomic
step. The worker forgets spooled events only below that mark, so a Redis that
loses writes (a failover to a lagging replica, a restart that lost its data)
rolls the mark back with the aggregates and the seen-markers, and the worker
ships again what it lost. A mark is the highest position applied: with several
usage replicas, entries below it may still be pending with another replica —
they are in the stream, written before the entry that set the mark.

An entry that cannot be decoded (no `event` field, bytes that are not a
`UsageEvent`, an event without a request_id) is set aside: copied to the
dead-letter stream `<stream>:dead` and acked in one transaction, counted in
`tokenmesh_usage_dead_letters_total{reason}`, and metering goes on
(`tokenmesh usage dead-letters` lists them).
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram
from redis.exceptions import ResponseError

from services.core import contract
from services.core.pricing import Price
from services.core.redis_service import FORGET_IDLE_CONSUMERS, LUA_REDIS_NOW_MS, text
from services.inference.usage_log import (
    FIELD_EVENT,
    FIELD_POSITION,
    FIELD_SPOOL,
    MARK_TTL_S,
    spool_mark_key,
)
from services.usage import tenant_metrics
from services.usage.dimensions import (
    DIMENSION_FIELD_CAPS,
    MAX_DIMENSION_FIELDS,
    TAG_FIELDS,
    RowIncrement,
    event_rows,
)
from services.usage.prices import PriceBook
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.usage.v1 import usage_pb2

logger = logging.getLogger(__name__)
PREFIX = "tm:usage:"
GRANULARITIES = ("minute", "hour", "day", "month")
DEAD_LETTER_SUFFIX = ":dead"
# Poison floods must not grow Redis without bound: the newest entries are kept.
DEAD_LETTER_MAXLEN = 10_000
DEAD_LETTERS = Counter(
    "tokenmesh_usage_dead_letters_total",
    "Usage-stream entries set aside because they could not be decoded, by reason.",
    ["reason"],
)
# Why an entry cannot be metered (DEAD_LETTERS' reasons).
MISSING_EVENT, UNDECODABLE, NO_REQUEST_ID = "missing_event", "undecodable", "no_request_id"
for _reason in (MISSING_EVENT, UNDECODABLE, NO_REQUEST_ID):
    # Each series exists at 0 from the start: one born at 1 (a first dead letter,
    # which is rare) reads as no increase, and TokenmeshUsageDeadLetters stayed quiet.
    DEAD_LETTERS.labels(_reason)
# Counted once per event id, when first applied: a replay (the same event read
# again after a worker or meter restart) is only acked, as in the aggregates.
APPLIED = Counter(
    "tokenmesh_usage_events_applied_total",
    "Usage events applied to the aggregates and audit log, each once (replays not counted).",
)
# How far metering runs behind: a request's finish (the worker's clock) to its
# event applied here. Workers spool while Redis is away, so minutes can be normal
# after an outage; hours are not.
METER_DELAY = Histogram(
    "tokenmesh_usage_meter_delay_seconds",
    "A request's finish to its usage event applied to the aggregates.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600),
)

# Events whose finish time (a worker's clock) was out of bounds: counted at the bound.
CLAMPED = Counter(
    "tokenmesh_usage_events_clamped_total",
    "Usage events stamped further ahead than 5 minutes, or behind the 7-day dedupe "
    "window, by the worker's clock: counted at that bound (per read; a replay again).",
    ["direction"],
)

# The four counters of a dimension row, and which row of a dimension hash a
# request's row counts under (itself, the overflow row, or nil) given the
# hash's field cap (see dimensions.py).
# A hash's cap is the lower of the call's and its granularity's (its key ends
# ":<granularity>:<start>", dimension_key; GRANULARITY_CAPS: `_caps_lua`). It
# counts the fields of tag rows only (TAG_FIELDS, kept in the hash: no report
# reads a field that is not a row's): with the hash's length, a mesh-wide or
# tenant bucket's key rows (one a key) left a new tag value no row at all.
_ROW_FOR = (
    f"local TAG_FIELDS = {json.dumps(TAG_FIELDS)}\n"
    + """
local kinds = {'|requests', '|prompt', '|cached', '|completion'}
local function new_tag_row(dim, row)
  redis.call('HINCRBY', dim, TAG_FIELDS, #kinds)
  return row
end
local function row_for(dim, row, overflow, cap)
  if overflow == '' or redis.call('HEXISTS', dim, row .. '|requests') == 1 then
    return row
  end
  cap = math.min(cap, GRANULARITY_CAPS[string.match(dim, ':(%a+):%d+$')] or cap)
  local size = tonumber(redis.call('HGET', dim, TAG_FIELDS) or 0)
  if size < cap then return new_tag_row(dim, row) end
  if redis.call('HEXISTS', dim, overflow .. '|requests') == 1 then return overflow end
  if size < 2 * cap then return new_tag_row(dim, overflow) end
  return nil
end
"""
)


def _caps_lua(caps: Mapping[str, int]) -> str:
    """Returns the Lua table of each granularity's dimension field cap (_ROW_FOR's)."""
    return "local GRANULARITY_CAPS = {" + ", ".join(f"{g} = {c}" for g, c in caps.items()) + "}\n"


# Raises a spool's applied mark to `position` (never lowers it: with several
# replicas, entries are applied out of order).
_ADVANCE_MARK = """
local function advance_mark(key, position, ttl)
  if (tonumber(redis.call('GET', key)) or 0) < tonumber(position) then
    redis.call('SET', key, position, 'EX', ttl)
  end
end
"""

# How far ahead of Redis's clock an audit entry may be stamped (a worker's clock
# a little ahead); a later stamp is kept at that.
AUDIT_FUTURE_MS = 5 * 60 * 1000

# Lua: audit_add(key, stamp, member, retention ms), audit_trim(key, retention ms)
# (after LUA_REDIS_NOW_MS: `now` is Redis's clock; the rollouts' audit log uses them
# too). An audit log is trimmed by Redis's clock, and expires a retention after its
# last entry: trimmed from each new entry's stamp (a worker's clock), one stamped 100
# days ahead deleted its tenant's whole log, and a tenant that went quiet kept its
# log for good.
#
# A log also keeps only its newest AUDIT_MAX_ENTRIES (a script starts with
# `audit_prelude`): by time alone one tenant at 100 requests a second held ~780
# million entries over the 90 days, ~300 GB of the Redis every service shares. A
# script removes at most AUDIT_TRIM_STEP of the oldest: a log far over the cap (one
# from before it, or a cap lowered) shrinks over its next entries, never in one
# call that held Redis for minutes (400,000 removals took 0.25 s).
AUDIT_TRIM_STEP = 1000
AUDIT_FNS = f"""
local function audit_add(key, stamp, member, retention)
  local score = math.min(stamp, now + {AUDIT_FUTURE_MS})
  if score > now - retention then redis.call('ZADD', key, score, member) end
end
local function audit_trim(key, retention)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - retention)
  local over = redis.call('ZCARD', key) - AUDIT_MAX_ENTRIES
  if over > 0 then
    redis.call('ZREMRANGEBYRANK', key, 0, math.min(over, {AUDIT_TRIM_STEP}) - 1)
  end
  redis.call('PEXPIRE', key, retention + {AUDIT_FUTURE_MS})
end
"""


def audit_prelude(max_entries: int) -> str:
    """The Lua line a script using AUDIT_FNS starts with: how many entries a log keeps."""
    return f"local AUDIT_MAX_ENTRIES = {int(max_entries)}\n"


# KEYS: stream, seen-key, audit-key, bucket hash keys (n), dimension hash keys
#       (n, in the same order), then the spool's applied mark if the entry names
#       a spool.
# ARGV: group, entry id, dedupe ttl, audit score, audit member, audit retention
#       ms, number of bucket field/increment entries, dimension field cap, the
#       entry's spool position ("": none), the mark's ttl, then per bucket its
#       ttl, then the bucket field/increment pairs (the same for all), then per
#       dimension row: field prefix, overflow prefix ("": never overflows),
#       requests, prompt, cached, completion.
# Returns 1 if the event was new (applied now), 0 if it was metered before (a
# replay: only acked), so that the process's counters count each event once.
# A replay raises the mark too: it was applied (before).
_APPLY = (
    LUA_REDIS_NOW_MS
    + _ROW_FOR
    + _ADVANCE_MARK
    + AUDIT_FNS
    + """
local marked = ARGV[9] ~= ''
local n = (#KEYS - 3 - (marked and 1 or 0)) / 2
local n_plain = tonumber(ARGV[7])
local cap = tonumber(ARGV[8])
local first_plain = 11 + n
local first_row = first_plain + n_plain
local new = redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[3]))
if new then
  for i = 1, n do
    local ttl = tonumber(ARGV[10 + i])
    local key = KEYS[3 + i]
    for j = first_plain, first_plain + n_plain - 1, 2 do
      redis.call('HINCRBY', key, ARGV[j], tonumber(ARGV[j + 1]))
    end
    redis.call('EXPIRE', key, ttl)
    local dim = KEYS[3 + n + i]
    for j = first_row, #ARGV, 6 do
      local row = row_for(dim, ARGV[j], ARGV[j + 1], cap)
      if row then
        for k = 1, 4 do
          redis.call('HINCRBY', dim, row .. kinds[k], tonumber(ARGV[j + 1 + k]))
        end
      end
    end
    redis.call('EXPIRE', dim, ttl)
  end
  audit_add(KEYS[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]))
  audit_trim(KEYS[3], tonumber(ARGV[6]))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if marked then advance_mark(KEYS[#KEYS], ARGV[9], ARGV[10]) end
if new then return 1 end
return 0
"""
)

# A batch of events none of which was metered before, in one atomic call; 0
# (and nothing written) if any was: the caller then applies them one by one.
# KEYS: stream, seen-keys (n), audit keys (n_audit), bucket hash keys
#       (n_bucket), dimension hash keys (n_dim), spools' applied marks (n_mark).
# ARGV: group, dedupe ttl, audit retention ms, dimension field cap, n, n_audit,
#       n_bucket, n_dim, n_ack, n_mark, the marks' ttl, then the entry ids to
#       ack (n_ack), then per event: its audit key's index, audit score, audit
#       member; then per bucket: ttl, pair count, field/increment pairs; then
#       per dimension hash: ttl, row count, per row: field prefix, overflow
#       prefix, requests, prompt, cached, completion (rows in first-seen order,
#       so the field cap picks the same rows as applying the events one by
#       one); then per mark: the highest spool position of the batch's entries.
_APPLY_BATCH = (
    LUA_REDIS_NOW_MS
    + _ROW_FOR
    + _ADVANCE_MARK
    + AUDIT_FNS
    + """
local n, n_audit = tonumber(ARGV[5]), tonumber(ARGV[6])
local n_bucket, n_dim, n_ack = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local n_mark = tonumber(ARGV[10])
local cap = tonumber(ARGV[4])
for i = 2, n + 1 do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 2, n + 1 do
  redis.call('SET', KEYS[i], '1', 'EX', tonumber(ARGV[2]))
end
local a = 12
local acks = {}
for i = 1, n_ack do acks[i] = ARGV[a]; a = a + 1 end
local audit0 = n + 1
local touched = {}
for i = 1, n do
  local index = tonumber(ARGV[a])
  audit_add(KEYS[audit0 + index], tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[3]))
  touched[index] = true
  a = a + 3
end
for index in pairs(touched) do audit_trim(KEYS[audit0 + index], tonumber(ARGV[3])) end
local bucket0 = audit0 + n_audit
for i = 1, n_bucket do
  local key, ttl, count = KEYS[bucket0 + i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, count do
    redis.call('HINCRBY', key, ARGV[a], tonumber(ARGV[a + 1]))
    a = a + 2
  end
  redis.call('EXPIRE', key, ttl)
end
local dim0 = bucket0 + n_bucket
for i = 1, n_dim do
  local dim, ttl, rows = KEYS[dim0 + i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, rows do
    local row = row_for(dim, ARGV[a], ARGV[a + 1], cap)
    if row then
      for k = 1, 4 do
        redis.call('HINCRBY', dim, row .. kinds[k], tonumber(ARGV[a + 1 + k]))
      end
    end
    a = a + 6
  end
  redis.call('EXPIRE', dim, ttl)
end
local mark0 = dim0 + n_dim
for i = 1, n_mark do
  advance_mark(KEYS[mark0 + i], ARGV[a], ARGV[11])
  a = a + 1
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(acks))
return 1
"""
)
# A batch holds at most this many entries (one script call; Redis runs a
# script alone, so a batch must stay short: ~1 ms at this size).
BATCH_MAX = 256


@dataclass(frozen=True)
class Retention:
    """Retention is how long each kind of usage data is kept, in seconds."""

    minute: int = 2 * 86400
    hour: int = 31 * 86400
    day: int = 400 * 86400
    month: int = 5 * 365 * 86400
    audit: int = 90 * 86400
    dedupe: int = 7 * 86400
    # Not a time: the most entries one audit log (a tenant's) keeps, newest first.
    audit_entries: int = 1_000_000

    def of(self, granularity: str) -> int:
        """Returns the TTL of one granularity's buckets."""
        ttl: int = getattr(self, granularity)
        return ttl


def bucket_start(unix_s: float, granularity: str) -> int:
    """Returns the UTC start (Unix seconds) of the bucket holding `unix_s`."""
    tm = time.gmtime(unix_s)
    if granularity == "minute":
        return int(unix_s) // 60 * 60
    if granularity == "hour":
        return int(unix_s) // 3600 * 3600
    if granularity == "day":
        return int(unix_s) // 86400 * 86400
    return _month(tm.tm_year, tm.tm_mon)


def _month(year: int, month: int) -> int:
    # calendar.timegm reads the date as UTC. time.mktime (less time.timezone) read it
    # in the process's zone: in Europe/Dublin every month started an hour early and
    # the next month's start was the same instant, so a month report never ended.
    return calendar.timegm((year, month, 1, 0, 0, 0))


def legacy_month_start(start: int) -> int:
    """Returns the start in the key where the meter wrote the month starting at
    `start` (UTC) before month keys were UTC: the first of the month read in the
    process's zone. Outside UTC (Europe/Dublin every month, Asia/Amman some) it
    differs, and reports read both keys (services.usage.reports), so the months
    metered before an upgrade are still reported. Nothing writes it any more.
    """
    tm = time.gmtime(start)
    # Exactly the old expression: the zone of this process stands for the old one's.
    return int(time.mktime((tm.tm_year, tm.tm_mon, 1, 0, 0, 0, 0, 0, 0)) - time.timezone)


def next_bucket(start: int, granularity: str) -> int:
    """Returns the start of the bucket after the one starting at `start`."""
    if granularity != "month":
        return start + {"minute": 60, "hour": 3600, "day": 86400}[granularity]
    tm = time.gmtime(start)
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return _month(year, month)


def bucket_key(scope: str, granularity: str, start: int) -> str:
    """Returns the hash holding one scope's counters for one bucket."""
    return f"{PREFIX}agg:{scope}:{granularity}:{start}"


def dimension_key(scope: str, granularity: str, start: int) -> str:
    """Returns the hash holding one scope's dimension rows for one bucket (see dimensions)."""
    return f"{PREFIX}dim:{scope}:{granularity}:{start}"


# Every event's scope: the whole mesh's usage (GetUsage `tenant: "*"`, admins only).
MESH_SCOPE = "all"


def scopes(event: inference_pb2.UsageEvent) -> list[str]:
    """Returns the scopes an event counts towards: its key, its tenant, everything."""
    out = [MESH_SCOPE]
    if event.tenant:
        out.append(f"tenant:{event.tenant}")
    if event.key_id:
        out.append(f"key:{event.key_id}")
    return out


def increments(event: inference_pb2.UsageEvent) -> list[tuple[str, int]]:
    """Returns the (field, amount) pairs an event adds to each of its buckets."""
    model = f"{event.model.name}|{event.model.version}"
    out = [
        (f"{model}|requests", 1),
        (f"{model}|prompt", event.usage.prompt_tokens),
        (f"{model}|completion", event.usage.completion_tokens),
        # v1 reports skip kinds they do not know: v2 reads cached prompt tokens here.
        (f"{model}|cached", min(event.cached_prompt_tokens, event.usage.prompt_tokens)),
        (f"{model}|fr:{event.finish_reason or 'unknown'}", 1),
    ]
    if event.HasField("template"):
        out.append((f"{model}|tpl:{template_label(event)}", 1))
    if event.cached:
        out += cache_increments(model, event)
    return out


def cache_increments(model: str, event: inference_pb2.UsageEvent) -> list[tuple[str, int]]:
    """Returns what a request the response cache answered adds: its saving.

    v1 reports sum these kinds (cached_requests...); v2's dimension rows skip them.
    """
    served, billed = event.served_usage, event.usage
    unbilled = served.prompt_tokens + served.completion_tokens
    unbilled -= billed.prompt_tokens + billed.completion_tokens
    return [
        (f"{model}|cache:requests", 1),
        (f"{model}|cache:completion", served.completion_tokens),
        (f"{model}|cache:unbilled", max(0, unbilled)),
    ]


def template_label(event: inference_pb2.UsageEvent) -> str:
    """Returns "name@version" of the template that rendered the event's prompt ("" if none)."""
    if not event.HasField("template"):
        return ""
    return f"{event.template.name}@{event.template.version}"


def audit_entry(event: inference_pb2.UsageEvent) -> usage_pb2.AuditEntry:
    """Returns the audit record of an event (prompts are never in events)."""
    entry = usage_pb2.AuditEntry(
        key_id=event.key_id,
        tenant=event.tenant,
        rpc=event.rpc,
        model=event.model.name,
        version=event.model.version,
        prompt_tokens=event.usage.prompt_tokens,
        completion_tokens=event.usage.completion_tokens,
        status="OK" if event.finish_reason in ("stop", "length") else event.finish_reason.upper(),
        finish_reason=event.finish_reason,
        trace_id=event.trace_id,
        request_id=event.request_id,
        # Unique: with the request id alone two requests' entries could be the same
        # bytes, and the log (a sorted set of them) kept one of the two.
        event_id=event.event_id,
        template=template_label(event),
        policy_hits=event.policy_hits,
    )
    entry.time.FromMilliseconds(event.finish_unix_ms)
    return entry


# An audit log's member is an entry's protobuf bytes after this mark (an entry never
# starts with a zero byte: no field has number 0). Members written before it are the
# bytes in hex: twice their size (0.55 KB a request held for the retention, 0.32 raw).
AUDIT_RAW_MARK = b"\x00"


def audit_member(entry: usage_pb2.AuditEntry) -> bytes:
    """Returns the audit log member that holds `entry`."""
    return AUDIT_RAW_MARK + entry.SerializeToString()


def audit_entry_of(member: bytes) -> usage_pb2.AuditEntry:
    """Returns the entry an audit log member holds (raw, or hex as written before)."""
    if member.startswith(AUDIT_RAW_MARK):
        return usage_pb2.AuditEntry.FromString(member[len(AUDIT_RAW_MARK) :])
    return usage_pb2.AuditEntry.FromString(bytes.fromhex(member.decode()))


def dead_letter_stream(stream: str) -> str:
    """Returns the stream where undecodable entries of `stream` are set aside."""
    return stream + DEAD_LETTER_SUFFIX


@dataclass(frozen=True)
class Poison:
    """Poison says why a stream entry cannot be metered.

    Attributes:
        reason: a metric label: missing_event, undecodable or no_request_id.
        detail: a human-readable explanation.
    """

    reason: str
    detail: str


def decode_entry(fields: dict[bytes, bytes]) -> inference_pb2.UsageEvent | Poison:
    """Returns the usage event of a stream entry, or why it cannot be metered."""
    raw = fields.get(FIELD_EVENT.encode())
    if raw is None:
        return Poison(MISSING_EVENT, "the entry has no event field")
    try:
        event = inference_pb2.UsageEvent.FromString(raw)
    except DecodeError as exc:
        return Poison(UNDECODABLE, f"not a UsageEvent: {exc}")
    if not event.request_id:
        # Deduplication is by request_id: without one it would merge with others.
        return Poison(NO_REQUEST_ID, "the event has no request_id")
    return event


#: A spool id longer than this is not a worker's (the entry still counts; it
#: moves no mark).
MAX_SPOOL_ID = 256

#: (a spool's applied-mark key, the spool position an entry's event ends at).
SpoolMark = tuple[str, int]


def entry_mark(stream: str, fields: dict[bytes, bytes]) -> SpoolMark | None:
    """Returns the applied mark an entry raises (None: it names no spool, e.g. one
    an earlier release's worker shipped)."""
    spool, position = fields.get(FIELD_SPOOL.encode()), fields.get(FIELD_POSITION.encode())
    if not spool or len(spool) > MAX_SPOOL_ID or position is None or not position.isdigit():
        return None
    return spool_mark_key(stream, spool.decode("utf-8", "replace"), "applied"), int(position)


def is_attempt_apart(event: inference_pb2.UsageEvent) -> bool:
    """Tells whether `event` is a job item's cut attempt, recorded apart from the item
    (services.inference.admission.set_attempt_apart): audited, never counted."""
    return contract.UNFINISHED_ATTEMPT_MARK in event.event_id


@functools.lru_cache(maxsize=16)
def _bucket_starts(minute: int) -> tuple[tuple[str, int], ...]:
    """Each granularity's bucket start for a finish time in this minute (a batch's
    events mostly share one)."""
    return tuple((g, bucket_start(minute * 60, g)) for g in GRANULARITIES)


def counted_at(event: inference_pb2.UsageEvent, retention: Retention) -> float:
    """Returns when an event counts (Unix seconds): its finish by the worker's clock,
    kept within [now - the dedupe window, now + AUDIT_FUTURE_MS] by this meter's.

    A worker's clock far off put usage in a month no report read yet (a year ahead:
    billed a year late) or one past retention (years behind: never billed), with no
    error anywhere. An event later than the dedupe window is one a replay could
    count twice anyway.
    """
    now = time.time()
    if not event.finish_unix_ms:
        return now
    finished = event.finish_unix_ms / 1000
    if finished > now + AUDIT_FUTURE_MS / 1000:
        CLAMPED.labels("ahead").inc()
        return now + AUDIT_FUTURE_MS / 1000
    if finished < now - retention.dedupe:
        CLAMPED.labels("behind").inc()
        return now - retention.dedupe
    return finished


@dataclass(frozen=True)
class Contribution:
    """Contribution is what one event adds to the aggregates and the audit log.

    Attributes:
        finished: when the request finished (Unix seconds).
        seen_key: the marker that it was metered (its event_id, else its request_id).
        audit_key, audit_score, audit_member: its audit entry and where it goes.
        buckets: (bucket hash, dimension hash, ttl) of each scope and granularity.
        plain: the (field, amount) pairs it adds to each bucket hash.
        rows: the rows it adds to each dimension hash.
    """

    finished: float
    seen_key: str
    audit_key: str
    audit_score: int
    audit_member: bytes
    buckets: tuple[tuple[str, str, int], ...]
    plain: list[tuple[str, int]]
    rows: list[RowIncrement]


def contribution(
    event: inference_pb2.UsageEvent, price: Price | None, retention: Retention
) -> Contribution:
    """Returns what `event`, priced at `price`, adds (see Contribution)."""
    finished = counted_at(event, retention)
    starts = _bucket_starts(int(finished) // 60)
    buckets = tuple(
        (bucket_key(scope, g, start), dimension_key(scope, g, start), retention.of(g))
        for scope in scopes(event)
        for g, start in starts
    )
    # A job item's cut attempt billed nothing and is not one of the caller's requests
    # (its finished run is): counted, a job cut by a restart read as more requests
    # than it had items. It stays in the audit log.
    attempt = is_attempt_apart(event)
    return Contribution(
        finished=finished,
        seen_key=f"{PREFIX}seen:{event.event_id or event.request_id}",
        audit_key=f"{PREFIX}audit:{event.tenant or '-'}",
        audit_score=int(finished * 1000),  # the entry keeps the worker's own stamp
        audit_member=audit_member(audit_entry(event)),
        buckets=buckets,
        plain=[] if attempt else increments(event),
        rows=[] if attempt else event_rows(event, price, template_label(event)),
    )


@dataclass
class _Batch:
    """_Batch sums the contributions of events into one _APPLY_BATCH call.

    Events with the same buckets (the same key, tenant and minute) are summed
    once, then spread over their buckets. An event id seen twice in one batch
    (a replay read with its original) counts once: its later entries are only
    acked.
    """

    retention: Retention
    acks: list[str] = field(default_factory=list)
    seen: dict[str, None] = field(default_factory=dict)
    counted: list[tuple[inference_pb2.UsageEvent, float]] = field(default_factory=list)
    audits: dict[str, int] = field(default_factory=dict)
    audit_args: list[str | int | bytes] = field(default_factory=list)
    groups: dict[tuple[tuple[str, str, int], ...], _Sums] = field(default_factory=dict)
    rows_seen: int = 0
    marks: dict[str, int] = field(default_factory=dict)  # each spool's highest position

    def add(
        self,
        entry_id: str,
        event: inference_pb2.UsageEvent,
        price: Price | None,
        mark: SpoolMark | None = None,
    ) -> None:
        self.acks.append(entry_id)
        if mark is not None:
            key, position = mark
            self.marks[key] = max(position, self.marks.get(key, 0))
        part = contribution(event, price, self.retention)
        if part.seen_key in self.seen:
            return
        self.seen[part.seen_key] = None
        self.counted.append((event, part.finished))
        index = self.audits.setdefault(part.audit_key, len(self.audits) + 1)
        self.audit_args += [index, part.audit_score, part.audit_member]
        sums = self.groups.setdefault(part.buckets, _Sums())
        sums.add_plain(part.plain)
        for row in part.rows:
            self.rows_seen += 1
            sums.add_row((row.prefix, row.overflow), row.counts, self.rows_seen)

    def _spread(self) -> tuple[dict[str, tuple[int, _Sums]], dict[str, tuple[int, _Sums]]]:
        buckets: dict[str, tuple[int, _Sums]] = {}
        dimensions: dict[str, tuple[int, _Sums]] = {}
        for group, sums in self.groups.items():
            for bucket, dimension, ttl in group:
                buckets.setdefault(bucket, (ttl, _Sums()))[1].add_plain(sums.plain.items())
                rows = dimensions.setdefault(dimension, (ttl, _Sums()))[1]
                for row, counts in sums.rows.items():
                    rows.add_row(row, counts, sums.first_seen[row])
        return buckets, dimensions

    def call(
        self, stream: str, group: str, field_cap: int
    ) -> tuple[list[str], list[str | int | bytes]]:
        """Returns the keys and arguments of the batch's _APPLY_BATCH call."""
        buckets, dimensions = self._spread()
        keys = [stream, *self.seen, *self.audits, *buckets, *dimensions, *self.marks]
        args: list[str | int | bytes] = [
            group,
            self.retention.dedupe,
            self.retention.audit * 1000,
            field_cap,
            len(self.seen),
            len(self.audits),
            len(buckets),
            len(dimensions),
            len(self.acks),
            len(self.marks),
            MARK_TTL_S,
            *self.acks,
            *self.audit_args,
        ]
        for ttl, sums in buckets.values():
            args += [ttl, len(sums.plain)]
            for name, amount in sums.plain.items():
                args += [name, amount]
        for ttl, sums in dimensions.values():
            args += [ttl, len(sums.rows)]
            # In the order the events first added each row: the dimension field
            # cap keeps the rows that came first, as one by one.
            for prefix, overflow in sorted(sums.rows, key=sums.first_seen.__getitem__):
                args += [prefix, overflow, *sums.rows[prefix, overflow]]
        args += self.marks.values()
        return keys, args


@dataclass
class _Sums:
    """Summed bucket fields and dimension rows, with when the batch first added each row."""

    plain: dict[str, int] = field(default_factory=dict)
    rows: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    first_seen: dict[tuple[str, str], int] = field(default_factory=dict)

    def add_plain(self, plain: Iterable[tuple[str, int]]) -> None:
        for name, amount in plain:
            self.plain[name] = self.plain.get(name, 0) + amount

    def add_row(self, row: tuple[str, str], counts: Sequence[int], seen: int) -> None:
        total = self.rows.get(row)
        if total is None:
            self.rows[row] = list(counts)
            self.first_seen[row] = seen
            return
        self.first_seen[row] = min(self.first_seen[row], seen)
        for i, amount in enumerate(counts):
            total[i] += amount


# What apply_batch takes of each entry: its id, its event, its price, its spool mark.
_Item = tuple[str, inference_pb2.UsageEvent, Price | None, SpoolMark | None]


def _stream_id(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


# A consumer of the group idle this long with nothing pending is forgotten
# (FORGET_IDLE_CONSUMERS). A live replica reads every few seconds (its idle time
# starts again each time); one forgotten reads under its name again later.
FORGET_CONSUMER_IDLE_S = 3600.0


class Meter:
    """Meter consumes the usage stream into aggregates, exactly once per request.

    Args:
        client: Redis.
        stream: the stream workers append to.
        group: the consumer group shared by every usage replica.
        consumer: this replica's consumer name.
        retention: TTLs of aggregates, audit entries and dedupe markers.
        claim_idle_s: pending entries idle this long are taken over.
        trim_interval_s: how often acknowledged entries are deleted from the stream.
        linger_s: how long a read waits for more entries to join the first ones
            (0: every read is applied at once).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        retention: Retention,
        claim_idle_s: float = 30.0,
        trim_interval_s: float = 60.0,
        linger_s: float = 0.0,
    ) -> None:
        self.redis = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.retention = retention
        self.claim_idle_s = claim_idle_s
        self.trim_interval_s = trim_interval_s
        self.linger_s = linger_s
        self.dead_letters = dead_letter_stream(stream)
        prelude = _caps_lua(DIMENSION_FIELD_CAPS) + audit_prelude(retention.audit_entries)
        self._apply = client.register_script(prelude + _APPLY)
        self._apply_batch = client.register_script(prelude + _APPLY_BATCH)
        self._forget_consumers = client.register_script(FORGET_IDLE_CONSUMERS)
        self.prices = PriceBook(client)
        self.applied_total = 0

    async def ensure_group(self) -> None:
        """Creates the consumer group (from the stream's start) if missing."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def apply(
        self,
        entry_id: str,
        event: inference_pb2.UsageEvent,
        price: Price | None = None,
        mark: SpoolMark | None = None,
    ) -> bool:
        """Applies one event (idempotently) at `price`, acks its stream entry and raises
        its spool's applied `mark`; tells whether it was new (False: metered before, a
        replay only acked)."""
        part = contribution(event, price, self.retention)
        keys = [
            self.stream,
            part.seen_key,
            part.audit_key,
            *(bucket for bucket, _, _ in part.buckets),
            *(dimension for _, dimension, _ in part.buckets),
            *([] if mark is None else [mark[0]]),
        ]
        args: list[str | int | bytes] = [
            self.group,
            entry_id,
            self.retention.dedupe,
            part.audit_score,
            part.audit_member,
            self.retention.audit * 1000,
            2 * len(part.plain),
            MAX_DIMENSION_FIELDS,
            "" if mark is None else mark[1],
            MARK_TTL_S,
            *(ttl for *_, ttl in part.buckets),
            *(field_or_amount for pair in part.plain for field_or_amount in pair),
        ]
        for row in part.rows:
            args += [row.prefix, row.overflow, *row.counts]
        new = bool(await self._apply(keys=keys, args=args))
        if new:  # a replay's counters moved when it was first applied
            self._count(event, part.finished)
        return new

    async def apply_batch(self, items: Sequence[_Item]) -> None:
        """Applies events (entry id, event, price, spool mark) in one call, or one by
        one if any was metered before (a replay); acks their stream entries either way."""
        if len(items) == 1:
            await self.apply(*items[0])
            return
        batch = _Batch(self.retention)
        for item in items:
            batch.add(*item)
        keys, args = batch.call(self.stream, self.group, MAX_DIMENSION_FIELDS)
        if not await self._apply_batch(keys=keys, args=args):
            for item in items:
                await self.apply(*item)
            return
        for event, finished in batch.counted:
            self._count(event, finished)

    def _count(self, event: inference_pb2.UsageEvent, finished: float) -> None:
        """Counts an event applied for the first time (never a replay)."""
        self.applied_total += 1
        APPLIED.inc()
        # As in the reports (`contribution`): a job item's cut attempt is not one of
        # the tenant's requests (its finished run is) and billed nothing.
        if not is_attempt_apart(event):
            tenant_metrics.observe(event)
        METER_DELAY.observe(max(0.0, time.time() - finished))

    async def set_aside(self, entry_id: bytes, fields: dict[bytes, bytes], poison: Poison) -> None:
        """Moves an entry that cannot be metered to the dead-letter stream and acks it.

        One transaction: a crash in between neither loses the entry nor leaves it
        pending (where every restart would trip over it again).
        """
        letter: dict[Any, Any] = {
            "stream_id": entry_id,
            "reason": poison.reason,
            "detail": poison.detail,
            "consumer": self.consumer,
            "unix_ms": str(int(time.time() * 1000)),
        }
        letter.update({b"orig:" + name: value for name, value in fields.items()})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letters, letter, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(self.stream, self.group, entry_id)
            await pipe.execute()
        DEAD_LETTERS.labels(poison.reason).inc()
        logger.error(
            "usage entry %s set aside in %s: %s",
            entry_id.decode(),
            self.dead_letters,
            poison.detail,
        )

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        decoded = [(entry_id, fields, decode_entry(fields)) for entry_id, fields in entries]
        events = [event for *_, event in decoded if not isinstance(event, Poison)]
        prices = await self.prices.lookup(events)
        batch: list[_Item] = []
        for entry_id, fields, event in decoded:
            if isinstance(event, Poison):
                # Its spool's mark waits for the spool's next entry: the spool
                # keeps this one a little longer, nothing more.
                await self.set_aside(entry_id, fields, event)
            else:
                mark = entry_mark(self.stream, fields)
                batch.append((entry_id.decode(), event, prices.at(event), mark))
        for start in range(0, len(batch), BATCH_MAX):
            await self.apply_batch(batch[start : start + BATCH_MAX])

    async def run_once(self, block_ms: int = 1000) -> int:
        """Reads and applies one batch of new entries; returns how many.

        Once the first entries arrive, waits `linger_s` for more to join them
        (unless a whole batch is already there).
        """
        entries = await self._read_new(BATCH_MAX, block_ms)
        if entries and len(entries) < BATCH_MAX and self.linger_s > 0:
            try:
                await asyncio.sleep(self.linger_s)
            except asyncio.CancelledError:
                # Stopping: apply what was read rather than leave it pending
                # until a restart or another replica's claim.
                await self._handle(entries)
                raise
            entries += await self._read_new(BATCH_MAX - len(entries), None)
        await self._handle(entries)
        return len(entries)

    async def _read_new(
        self, count: int, block_ms: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return [e for _, batch in reply or [] for e in batch]

    async def claim_stale(self) -> int:
        """Takes over entries another consumer read but never acked (it crashed)."""
        claimed = 0
        start = "0-0"
        while True:
            reply: Any = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=int(self.claim_idle_s * 1000),
                start_id=start,
                count=256,
            )
            start, entries = reply[0], reply[1]
            await self._handle(entries)
            claimed += len(entries)
            if start in (b"0-0", "0-0") or not entries:
                return claimed

    async def recover_own(self) -> int:
        """Applies entries this consumer read before a crash but never acked."""
        recovered = 0
        while True:
            reply: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: "0"}, count=256
            )
            entries = [e for _, batch in reply or [] for e in batch]
            if not entries:
                return recovered
            await self._handle(entries)
            recovered += len(entries)

    async def forget_idle_consumers(self, idle_s: float = FORGET_CONSUMER_IDLE_S) -> int:
        """Deletes the group's other consumers idle `idle_s` with nothing pending (gone
        replicas' names); returns how many."""
        args: list[str | int] = [self.group, int(idle_s * 1000), self.consumer]
        gone: Any = await self._forget_consumers(keys=[self.stream], args=args)
        return len(gone)

    async def trim(self) -> int:
        """Deletes stream entries the group has acknowledged; returns how many. Gone
        replicas' consumer names are forgotten too (`forget_idle_consumers`).

        Everything older than both the oldest pending entry and the group's
        last-delivered entry was applied (applying and acking are atomic), so
        nothing unmetered is ever trimmed.
        """
        groups: Any = await self.redis.xinfo_groups(self.stream)
        ours = next((g for g in groups if text(g["name"]) == self.group), None)
        if ours is None:
            return 0
        await self.forget_idle_consumers()
        threshold = text(ours["last-delivered-id"])
        pending: Any = await self.redis.xpending(self.stream, self.group)
        if pending and pending.get("pending"):
            threshold = min(threshold, text(pending["min"]), key=_stream_id)
        if threshold in ("0-0", ""):
            return 0
        return int(await self.redis.xtrim(self.stream, minid=threshold, approximate=False))

    async def run_forever(self) -> None:
        """Consumes until cancelled or until it fails (run it under a Supervisor).

        Every failure, a Redis outage included, ends the run: the supervisor
        backs off and starts a new one, which recreates the group (a flushed
        Redis loses it) and first finishes what this consumer read but never
        acked.
        """
        await self.ensure_group()
        await self.recover_own()
        last_claim = last_trim = 0.0
        while True:
            if time.monotonic() - last_claim > self.claim_idle_s / 2:
                last_claim = time.monotonic()
                await self.claim_stale()
            if time.monotonic() - last_trim > self.trim_interval_s:
                last_trim = time.monotonic()
                await self.trim()
            await self.run_once()
