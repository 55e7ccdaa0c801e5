"""Jobs in Redis (the AOF one): every change is one transaction or Lua script.

Keys (prefix `tm:jobs:`)::

    job:<id>             hash: owner, status, counters, times, webhook state
    job:<id>:items       hash: index -> JobItem bytes (deleted when the job ends)
    job:<id>:results     hash: index -> JobResult bytes (HSETNX: one per item)
    job:<id>:inflight    hash: index -> consumers (space-separated), the items a
                         runner started and has not finished or let go: two
                         after a takeover (deleted when the job ends)
    job:<id>:attempts    list: the latest WebhookAttempt bytes
    batch:<batch id>     hash: the OpenAI batch a job runs, if any (openai_batches.py):
                         it expires with its job
    owner:<key id>       zset: the key's jobs by creation time (members older than a
                         job can live are dropped at the key's next job; the whole
                         set expires as its newest job would)
    idem:<key id>:<key>  the job an idempotency key created (24 h; an OpenAI batch
                         creation's own for RETRY_HOLD_S)
    batchretry:<key id>:<hash>  the job an OpenAI batch request created, for a
                         retry of it (RETRY_HOLD_S; openai_batches.py)
    stored:<owner>       zset: what an owner's OpenAI files and batch records keep,
                         with stored:<owner>:bytes (openai_files.StorageLedger)
    work:<lane>          stream: one entry per item, consumer group `jobs-runner`
                         (once empty, its lane is retired and it expires in a day
                         unless a new job puts the lane back)
    lanes                set: every lane with work (a tenant, or a key without one)
    active               zset: unfinished jobs by deadline (the expiry sweep)
    hooks                zset: webhooks due, by time (a lease while one is sent)
    whsec:<key id>       hash: the key's webhook secrets: current, and the ones it
                         replaced whose overlap has not ended (previous,
                         previous:1, previous:2, newest first, each with its
                         previous_until_ms[:n])

An item's result is written, its counters added, the job finished when it
was the last one, and its stream entry acknowledged in one script
(`_FINISH_ITEM`), so a crash at any point leaves either nothing or all of it;
a replayed item finds its result and is only acknowledged.

A final status freezes the results: no script writes a result or a counter
of a job that ended. So a job is stopped in two steps, as an OpenAI batch is
cancelled: `stop` (a cancel, or its key revoked) makes it CANCELLING, no item
of it starts any more, and the runners cut the calls in flight; an item
that finishes meanwhile still keeps its result (the worker metered it). When
the last item in flight is finished or let go, the same script makes the job
CANCELLED, with every result it will ever have. (A cancel used to end the job
at once, and items in flight wrote their results after it: a later read of
a CANCELLED job's results, counts or output file differed from the first.)
A job with nothing in flight goes straight to CANCELLED. An item's mark names
every consumer that may be running it; each drops only its own name (it
finishes, lets the item go, finds its entry taken over, shuts down, or
resumes its own entry after a restart), and a stored result drops them all. A replica that
takes an entry over (`claim_idle_s`) cannot tell a dead runner from a stalled
one whose call still runs and will be metered, so it keeps the other's name:
a stopped job whose runner died with an item in flight ends `STOP_GRACE_S`
after the stop (the sweep). (A takeover dropped or replaced the other's mark:
the job ended CANCELLED and the stalled runner's metered result was thrown
away.)
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError, WatchError

from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.core.redis_service import LUA_REDIS_NOW_MS, text
from services.core.store_errors import reply_code
from services.jobs.secret_box import SEALED_PREFIX, SecretBox, SecretUnreadable
from services.jobs.validation import MAX_WINDOW_S
from tokenmesh.jobs.v1 import jobs_pb2

logger = logging.getLogger(__name__)
PREFIX = "tm:jobs:"
GROUP = "jobs-runner"
LANES_KEY = PREFIX + "lanes"
ACTIVE_KEY = PREFIX + "active"
HOOKS_KEY = PREFIX + "hooks"
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_ATTEMPTS_KEPT = 20

QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "QUEUED",
    "RUNNING",
    "CANCELLING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "EXPIRED",
)
STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED, EXPIRED)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
# Statuses in which a job's items may start.
RUNNABLE = frozenset({QUEUED, RUNNING})
# Why a job was stopped (its `stop_reason`; "" is its owner's cancel). DEADLINE: its
# completion window ended with items in flight; it ends EXPIRED, not CANCELLED.
KEY_REVOKED, KEY_EXPIRED, DEADLINE = "KEY_REVOKED", "KEY_EXPIRED", "DEADLINE"
# STORAGE_QUOTA: its results took its owner past its storage quota
# (TOKENMESH_OPENAI_STORAGE_BYTES_PER_OWNER), as an upload or a new job would.
STORAGE_QUOTA = "STORAGE_QUOTA_EXCEEDED"
# What _FINISH_ITEM answers for a result stored past its owner's quota.
OVER_QUOTA = 3
# The longest a stopped job stays CANCELLING when a runner died with one of its
# items in flight and no replica took the entry over (OpenAI: up to 10 minutes).
STOP_GRACE_S = 600
# Webhook states (Job.webhook.state).
HOOK_WAITING, HOOK_PENDING, HOOK_RETRYING, HOOK_DELIVERED, HOOK_DEAD = (
    "WAITING",
    "PENDING",
    "RETRYING",
    "DELIVERED",
    "DEAD_LETTER",
)


def job_key(job_id: str) -> str:
    """Returns the hash of a job."""
    return f"{PREFIX}job:{job_id}"


def items_key(job_id: str) -> str:
    """Returns the hash of a job's items."""
    return f"{PREFIX}job:{job_id}:items"


def results_key(job_id: str) -> str:
    """Returns the hash of a job's results."""
    return f"{PREFIX}job:{job_id}:results"


def inflight_key(job_id: str) -> str:
    """Returns the hash of a job's items in flight (index -> consumers, space-separated)."""
    return f"{PREFIX}job:{job_id}:inflight"


def attempts_key(job_id: str) -> str:
    """Returns the list of a job's latest webhook attempts."""
    return f"{PREFIX}job:{job_id}:attempts"


def owner_key(key_id: str) -> str:
    """Returns the zset of a key's jobs."""
    return f"{PREFIX}owner:{key_id}"


def batch_key_of_job(job_id: str) -> str:
    """Returns the hash of the OpenAI batch a job runs (openai_batches.batch_key of
    its batch id; no such key for a plain job)."""
    return f"{PREFIX}batch:batch_{job_id.removeprefix('job-')}"


FILE_KEY_PREFIX = PREFIX + "file:"  # an uploaded file's hash: services/jobs/openai_files.py


def ledger_key(owner: str) -> str:
    """Returns the zset of what an owner keeps: each object's Redis key -> when it goes
    (ms; for a batch that has not ended, the latest its record may expire)."""
    return f"{PREFIX}stored:{owner}"


def ledger_sizes_key(owner: str) -> str:
    """Returns the hash of the bytes each object of an owner's ledger is charged, and
    the totals (`total:bytes`, `total:files`)."""
    return f"{PREFIX}stored:{owner}:bytes"


# An owner's storage ledger (services/jobs/openai_files.py's StorageLedger, and the
# results _FINISH_ITEM stores): a script starts with `local LEDGER, SIZES = ...`
# (the two keys above), then these functions. An object's member is its own Redis
# key: a file's starts with FILE_KEY_PREFIX.
LEDGER_FUNCTIONS = (
    f"local FILE_PREFIX = {json.dumps(FILE_KEY_PREFIX)}\n"
    + """
local function is_file(id) return string.find(id, FILE_PREFIX, 1, true) == 1 end
local function forget(id)
  local size = redis.call('HGET', SIZES, id)
  if size then
    redis.call('HINCRBY', SIZES, 'total:bytes', -tonumber(size))
    if is_file(id) then redis.call('HINCRBY', SIZES, 'total:files', -1) end
    redis.call('HDEL', SIZES, id)
  end
  redis.call('ZREM', LEDGER, id)
end
-- The totals of what is kept now (what expired by `now` is forgotten first).
local function totals(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEDGER, '-inf', now)) do forget(id) end
  local h = redis.call('HMGET', SIZES, 'total:bytes', 'total:files')
  return tonumber(h[1] or 0), tonumber(h[2] or 0)
end
-- The ledger lives as long as the longest-lived object it charges.
local function keep_ledger(until_ms, now)
  local left = until_ms - now
  if redis.call('PTTL', LEDGER) < left then
    redis.call('PEXPIRE', LEDGER, left)
    redis.call('PEXPIRE', SIZES, left)
  end
end
local function charge(id, size, until_ms, now)
  redis.call('ZADD', LEDGER, until_ms, id)
  redis.call('HSET', SIZES, id, size)
  redis.call('HINCRBY', SIZES, 'total:bytes', size)
  if is_file(id) then redis.call('HINCRBY', SIZES, 'total:files', 1) end
  keep_ledger(until_ms, now)
end
-- Adds `size` to what `id` is charged (kept until `until_ms` at least).
local function add_to(id, size, until_ms, now)
  redis.call('ZADD', LEDGER, 'GT', until_ms, id)
  redis.call('HINCRBY', SIZES, id, size)
  redis.call('HINCRBY', SIZES, 'total:bytes', size)
  keep_ledger(until_ms, now)
end
-- Charges `id` unless a limit would be passed: {'ok'}, or {limit, in use, max}.
local function reserve(id, size, until_ms, now, max_bytes, max_files)
  local bytes, files = totals(now)
  if is_file(id) and files + 1 > max_files then return {'files', files, max_files} end
  if bytes + size > max_bytes then return {'bytes', bytes, max_bytes} end
  charge(id, size, until_ms, now)
  return {'ok'}
end
"""
)


def work_stream(lane: str) -> str:
    """Returns the stream of a lane's pending items."""
    return f"{PREFIX}work:{lane}"


def lane_of(stream: str) -> str:
    """Returns the lane (its owner, as the storage ledger names it) of a work stream."""
    return stream.removeprefix(f"{PREFIX}work:")


@dataclass
class Resealed:
    """What `JobStore.reseal_secrets` did: secrets checked, sealed again, and the
    key ids whose secrets open with none of the box's keys (rotate those)."""

    checked: int = 0
    resealed: int = 0
    unreadable: list[str] = field(default_factory=list)


def secret_key(key_id: str) -> str:
    """Returns the hash of a key's webhook secrets."""
    return f"{PREFIX}whsec:{key_id}"


#: Replaced secrets that may sign at once, each until its overlap ends: a second
#: rotation within an overlap overwrote the one "previous" slot, and the secret
#: receivers still verified with stopped signing at once. A rotation that would
#: keep a fourth is refused (or made with overlap 0s).
MAX_PREVIOUS_SECRETS = 3
# The hash fields of each replaced secret and its end, newest first (the first pair
# is what replicas from before the list read).
PREVIOUS_SLOTS = tuple(
    ("previous", "previous_until_ms") if n == 0 else (f"previous:{n}", f"previous_until_ms:{n}")
    for n in range(MAX_PREVIOUS_SECRETS)
)


def _live_previous(raw: Mapping[str, str], now: int) -> list[tuple[str, str, int]]:
    """Returns the replaced secrets of a secrets hash that still sign: (field, stored
    value, until ms), newest first."""
    out = []
    for slot, until_slot in PREVIOUS_SLOTS:
        until = int(raw.get(until_slot) or 0)
        if raw.get(slot) and until > now:
            out.append((slot, raw[slot], until))
    return out


def _utc_text(ms: int) -> str:
    stamp = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Returns a fresh job id: "job-" + 24 hex digits (fits request ids: `<job>:<n>`)."""
    return "job-" + secrets.token_hex(12)


def request_id(job_id: str, index: int) -> str:
    """Returns an item's stable request id."""
    return f"{job_id}:{index}"


def now_ms() -> int:
    """Returns Unix time in milliseconds."""
    return int(time.time() * 1000)


# What ends a job: its status, end time, no deadline any more, its webhook due
# (when it has one), its items and items in flight gone and everything kept for
# `retention`, the record of the OpenAI batch it runs (if any) too: the batch is
# listed and read for exactly as long as its job. The scripts below take the job's
# keys (`JobStore._job_keys`): KEYS 1 job, 2 items, 3 results, 4 active, 5 hooks,
# 6 attempts, 7 inflight, 8 batch, and the job id as ARGV[1]. Lua functions:
# finish(final status, now, retention), running(status), mark(index, consumer),
# let_go(index, consumer), finish_if_idle(now, retention).
_FINISH_FN = """
local function finish(status, now, retention)
  redis.call('HSET', KEYS[1], 'status', status, 'ended_ms', now)
  redis.call('ZREM', KEYS[4], ARGV[1])
  if redis.call('HGET', KEYS[1], 'webhook_url') ~= '' then
    redis.call('HSET', KEYS[1], 'webhook_state', 'PENDING', 'webhook_next_ms', now)
    redis.call('ZADD', KEYS[5], now, ARGV[1])
  end
  redis.call('DEL', KEYS[2], KEYS[7])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], retention) end
  redis.call('EXPIRE', KEYS[6], retention)
  redis.call('EXPIRE', KEYS[8], retention)
end
local function running(status) return status == 'QUEUED' or status == 'RUNNING' end
-- The consumers an item is in flight for, its mark space-separated: two after a
-- replica took over the entry of one that stalled (both may be running it).
local function marks(index)
  local names = {}
  for name in string.gmatch(redis.call('HGET', KEYS[7], index) or '', '%S+') do
    names[#names + 1] = name
  end
  return names
end
-- An item is in flight for `consumer` too (a replica it took the entry over from
-- keeps its mark: it may be stalled, not dead, its call still running).
local function mark(index, consumer)
  local names = marks(index)
  for _, name in ipairs(names) do if name == consumer then return end end
  names[#names + 1] = consumer
  redis.call('HSET', KEYS[7], index, table.concat(names, ' '))
end
-- An item is no longer in flight for `consumer` (only its own mark goes).
local function let_go(index, consumer)
  local kept = {}
  for _, name in ipairs(marks(index)) do
    if name ~= consumer then kept[#kept + 1] = name end
  end
  if #kept == 0 then
    redis.call('HDEL', KEYS[7], index)
  else
    redis.call('HSET', KEYS[7], index, table.concat(kept, ' '))
  end
end
-- How a stopped job ends: EXPIRED when its window ended (stop_reason DEADLINE).
local function stopped_as()
  return redis.call('HGET', KEYS[1], 'stop_reason') == 'DEADLINE' and 'EXPIRED' or 'CANCELLED'
end
-- A stopped job ends once none of its items is in flight: its results are final.
local function finish_if_idle(now, retention)
  if redis.call('HGET', KEYS[1], 'status') == 'CANCELLING'
     and redis.call('HLEN', KEYS[7]) == 0 then
    finish(stopped_as(), now, retention)
  end
end
"""

# KEYS: the job's keys, then the lane's stream (9).
# ARGV: job id, index, consumer, now ms, retention s, group, entry id.
# Starts an item: returns its JobItem bytes and marks it in flight for `consumer`
# (QUEUED -> RUNNING), or returns false and acknowledges its entry when it must not
# run (the job ended or is stopping, or the item has its result).
_START_ITEM = (
    _FINISH_FN
    + """
local status = redis.call('HGET', KEYS[1], 'status')
local has_result = redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1
if running(status) and not has_result then
  local item = redis.call('HGET', KEYS[2], ARGV[2])
  if item then
    mark(ARGV[2], ARGV[3])
    if status == 'QUEUED' then
      redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'started_ms', ARGV[4])
    end
    return item
  end
end
-- An item with its result is in flight for nobody (a replica that ran it again
-- after a takeover may still hold a mark).
if has_result then
  redis.call('HDEL', KEYS[7], ARGV[2])
  finish_if_idle(ARGV[4], tonumber(ARGV[5]))
elseif status == 'CANCELLING' then
  -- Only this consumer's own name leaves a stopping job's mark (it restarted and
  -- resumed its entry). Another's is a replica that let the entry go idle past
  -- the claim time: dead, or stalled with its call still running. Its result may
  -- yet come, metered: dropped here, the job ended CANCELLED and that result was
  -- thrown away. So the job stays CANCELLING until that replica finishes or lets
  -- the item go, at the latest until the sweep (STOP_GRACE_S).
  let_go(ARGV[2], ARGV[3])
  finish_if_idle(ARGV[4], tonumber(ARGV[5]))
end
redis.call('XACK', KEYS[9], ARGV[6], ARGV[7])
return false
"""
)

# KEYS: an owner's storage ledger and its sizes. ARGV: now ms. Returns the bytes it
# keeps (what went by now forgotten first).
_LEDGER_BYTES = (
    "local LEDGER, SIZES = KEYS[1], KEYS[2]\n"
    + LEDGER_FUNCTIONS
    + """
local bytes = totals(tonumber(ARGV[1]))
return bytes
"""
)

# KEYS: the job's keys, then the lane's stream (9), its owner's storage ledger and
#       its sizes (10, 11).
# ARGV: job id, index, result bytes, succeeded (1/0), prompt, completion,
#       cached, now ms, retention s, group, entry id, consumer, how long after
#       the job's deadline its results are charged (ms: the latest its record may
#       expire), the most bytes the owner may keep (0: no limit).
# Returns 1 when this call wrote the result, 0 when it did not: the item had one,
# or the job had ended (its results are final) or is gone; 3 when it wrote it and
# the owner now keeps more than it may (the caller stops the job).
_FINISH_ITEM = (
    "local LEDGER, SIZES = KEYS[10], KEYS[11]\n"
    + LEDGER_FUNCTIONS
    + _FINISH_FN
    + """
local wrote = 0
local status = redis.call('HGET', KEYS[1], 'status')
if running(status) or status == 'CANCELLING' then
  if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) == 1 then
    wrote = 1
    -- Charged to its owner as its items were: uncharged, one job of embeddings
    -- kept ~4 GB of results for the retention (~400 KB an item of 256 inputs).
    local now, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[14])
    local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_ms') or now)
    local bytes = totals(now)
    local size = string.len(ARGV[3])
    add_to(KEYS[3], size, deadline + tonumber(ARGV[13]), now)
    -- Past the quota by this ledger (which may still charge what went: the caller
    -- settles it before it stops the job).
    if max_bytes > 0 and bytes + size > max_bytes then wrote = 3 end
    local counter = ARGV[4] == '1' and 'succeeded' or 'failed'
    redis.call('HINCRBY', KEYS[1], counter, 1)
    redis.call('HINCRBY', KEYS[1], 'prompt_tokens', tonumber(ARGV[5]))
    redis.call('HINCRBY', KEYS[1], 'completion_tokens', tonumber(ARGV[6]))
    redis.call('HINCRBY', KEYS[1], 'cached_tokens', tonumber(ARGV[7]))
  end
  -- Its result is stored: in flight for nobody, whoever marked it (a replica that
  -- took the entry over and runs it again holds a mark this one must not leave).
  redis.call('HDEL', KEYS[7], ARGV[2])
  local h = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'total')
  local done = tonumber(h[1] or 0) + tonumber(h[2] or 0)
  if running(status) and done >= tonumber(h[3]) then
    finish(tonumber(h[1] or 0) > 0 and 'SUCCEEDED' or 'FAILED', ARGV[8], tonumber(ARGV[9]))
    forget(KEYS[2])  -- its items are deleted: so is their charge
  else
    finish_if_idle(ARGV[8], tonumber(ARGV[9]))
  end
end
redis.call('XACK', KEYS[9], ARGV[10], ARGV[11])
return wrote
"""
)

# KEYS: the job's keys, then the lane's stream (9).
# ARGV: job id, index, consumer, now ms, retention s, group, entry id ("": not
# this consumer's to acknowledge).
# Lets an item go without a result (its call was cut: the job is stopping or
# ended, or another replica took its entry over), acknowledges its entry, and
# ends a stopping job left with none in flight.
_LET_GO_ITEM = (
    _FINISH_FN
    + """
let_go(ARGV[2], ARGV[3])
finish_if_idle(ARGV[4], tonumber(ARGV[5]))
if ARGV[7] ~= '' then redis.call('XACK', KEYS[9], ARGV[6], ARGV[7]) end
return 1
"""
)

# KEYS: the job's keys. ARGV: job id, reason, now ms, retention s, stop by (ms).
# Stops a running job: CANCELLING (no item starts any more; the runners cut the
# calls in flight), or CANCELLED at once when none is in flight. Returns 1 when
# it stopped now, 2 when it was stopping already, 0 when it had ended (or is gone).
_STOP_JOB = (
    _FINISH_FN
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'CANCELLING' then return 2 end
if not running(status) then
  if not status then redis.call('ZREM', KEYS[4], ARGV[1]) end
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'CANCELLING', 'stop_reason', ARGV[2],
           'stopping_ms', ARGV[3], 'stop_by_ms', ARGV[5])
-- The sweep ends it by then even if a runner died with an item in flight.
redis.call('ZADD', KEYS[4], tonumber(ARGV[5]), ARGV[1])
finish_if_idle(ARGV[3], tonumber(ARGV[4]))
return 1
"""
)

# KEYS: the job's keys. ARGV: job id, final status, now ms, retention s, only
# before (ms; 0 = any time), stop by (ms).
# Returns 1 when the job ended (or, expiring with items in flight, stopped) now, 0
# when it had ended already (or was not due). A stopping job ends as it was stopped
# (CANCELLED, or EXPIRED), due at its `stop_by_ms` (not its deadline). A job that
# expires with items in flight is stopped first, as a cancel stops it (stop_reason
# DEADLINE): an item its worker answered, and metered, still stores its result;
# ended at once, the job threw it away and said it never ran.
_END_JOB = (
    _FINISH_FN
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'deadline_ms', 'stop_by_ms')
if not h[1] then redis.call('ZREM', KEYS[4], ARGV[1]) return 0 end
local final, due = ARGV[2], h[2]
if h[1] == 'CANCELLING' then
  final, due = stopped_as(), h[3]
elseif not running(h[1]) then
  return 0
end
if tonumber(ARGV[5]) > 0 and tonumber(due) > tonumber(ARGV[5]) then return 0 end
if h[1] ~= 'CANCELLING' and final == 'EXPIRED' and redis.call('HLEN', KEYS[7]) > 0 then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLING', 'stop_reason', 'DEADLINE',
             'stopping_ms', ARGV[3], 'stop_by_ms', ARGV[6])
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[1])
  return 1
end
finish(final, ARGV[3], tonumber(ARGV[4]))
return 1
"""
)

# KEYS: hooks. ARGV: lease ms, max count.
# Returns the due jobs and moves each one lease ms ahead (another replica does
# not take it meanwhile; a replica that dies with it leaves it due again). By
# Redis's clock: a replica whose clock ran a lease ahead took webhooks another
# replica was still sending, and each was delivered twice.
_CLAIM_HOOKS = (
    LUA_REDIS_NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
end
return due
"""
)

# KEYS: lanes, the lane's stream. ARGV: lane, seconds the empty stream is kept.
# Retires a lane whose stream is empty (every item acknowledged and trimmed):
# runners poll every lane in the set, and it only grew, by every tenant and key
# that ever ran a job. The stream (and its group) stays a day: deleted at once,
# a runner still blocked reading it got an error (Redis 7: UNBLOCKED), and one
# that had read the set before recreated it, group-less or lane-less. A job
# created meanwhile puts the lane back and keeps the stream (PERSIST, in its own
# transaction, which also makes the stream and group if they expired).
_RETIRE_LANE = """
if redis.call('XLEN', KEYS[2]) ~= 0 then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""
RETIRED_STREAM_TTL_S = 86400

# KEYS: job, attempts, hooks. ARGV: job id, attempt bytes, new state, next due ms
# (0: none), attempts kept, the round the attempt belongs to (its round_start).
# Records an attempt and the webhook's next state, unless the attempt came late:
# its round was delivered already, or a redelivery started a new one (a replica
# whose lease ran out while it waited; its failure overwrote the success of the
# replica that sent the event after it). Returns 1 when the state changed.
# This script, _REDELIVER and _NEXT_ATTEMPT first check that the job is still there:
# a write after it expired made its hash (and attempts) anew, kept for good.
_RECORD_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[3], ARGV[1]) return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
local round = tonumber(redis.call('HGET', KEYS[1], 'round_start') or '0')
if round ~= tonumber(ARGV[6]) or redis.call('HGET', KEYS[1], 'webhook_state') == 'DELIVERED' then
  return 0
end
redis.call('HSET', KEYS[1], 'webhook_state', ARGV[3], 'webhook_next_ms', ARGV[4])
-- The round's attempts that reached an end: the retry schedule's place (an attempt
-- cut by a stop counted in webhook_attempts and skipped a step of it).
redis.call('HINCRBY', KEYS[1], 'round_recorded', 1)
if tonumber(ARGV[4]) > 0 then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 1
"""

# KEYS: job, hooks. ARGV: job id, now ms. A new round of attempts, due now;
# `round_start` is where the round's attempt count starts (the retry schedule).
# An attempt in flight (a replica's claim scores the webhook at its lease's end,
# past its due time) makes the round due when that lease ends: due at once, another
# replica sent the same event beside it (each redelivery one more, concurrently).
_REDELIVER = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end
local attempts = redis.call('HGET', KEYS[1], 'webhook_attempts') or '0'
local due = tonumber(ARGV[2])
local leased = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
if leased > due and leased > tonumber(redis.call('HGET', KEYS[1], 'webhook_next_ms') or '0') then
  due = leased
end
redis.call('HSET', KEYS[1], 'webhook_state', 'PENDING', 'webhook_next_ms', due,
           'round_start', attempts, 'round_recorded', 0)
redis.call('ZADD', KEYS[2], due, ARGV[1])
return 1
"""

# KEYS: job, hooks. ARGV: job id. Counts a delivery attempt; returns its number
# (0: the job is gone, and so is its webhook).
_NEXT_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end
return redis.call('HINCRBY', KEYS[1], 'webhook_attempts', 1)
"""

# KEYS: an index zset (members scored by creation ms). ARGV: the member the page
# follows ("": none), count, that member's score ("": not known).
# Returns {found, page, ties}: found 0 when `after` is not listed and its place is
# not known; else the page (member, score, ...) after it in the zset's order (by
# score, then by member, descending). A member no longer listed (it expired, or a
# list dropped it) is followed from its place: the page is what comes after its
# score, and `ties` the members of its score, for the caller to keep those that
# come after the member itself (few: one millisecond's). One script: in two round
# trips, an object created between the rank and the range shifted the ranks, and
# the page repeated the member it should follow.
PAGE_AFTER = """
local count = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if rank then
    return {1, redis.call('ZREVRANGE', KEYS[1], rank + 1, rank + count, 'WITHSCORES'), {}}
  end
  if ARGV[3] == '' then return {0, {}, {}} end
end
local ties = {}
if ARGV[1] ~= '' then
  ties = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[3], 'WITHSCORES')
end
local page = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '-inf', 'WITHSCORES',
                        'LIMIT', 0, count)
return {1, page, ties}
"""
#: The place of a page's start when nothing precedes it: after every creation time.
FIRST_PAGE_MS = 2**62

# KEYS: secrets hash. ARGV: field, value read, new value. Returns 1 when replaced.
# Re-seals one stored secret: only if it still holds what was read (a rotation
# or another re-seal in between wins).
_RESEAL_SECRET = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


class UnknownCursor(LookupError):
    """UnknownCursor: a page was asked for after an object that is not listed (gone, or
    never there), whose place in the list is not known either."""


async def page_after(
    script: Any, index_key: str, after: str, count: int, place_ms: int | None
) -> list[tuple[str, int]]:
    """Returns up to `count` (member, score) of an index zset, newest first, that follow
    `after` ("": from the start); a member no longer listed is followed from its
    place (`place_ms`, its score).

    Raises:
        UnknownCursor: `after` is not listed and `place_ms` is None.
    """
    place = "" if place_ms is None else str(place_ms)
    found, page, ties = await script(keys=[index_key], args=[after, count, place])
    if not found:
        raise UnknownCursor(after)
    # Members of one score are ordered by their bytes (memcmp, as Python compares bytes).
    mark = after.encode()
    following = [(bytes(ties[i]), ties[i + 1]) for i in range(0, len(ties), 2)]
    pairs = [(m, sc) for m, sc in following if m < mark]
    pairs += [(bytes(page[i]), page[i + 1]) for i in range(0, len(page), 2)]
    return [(text(m), int(float(sc))) for m, sc in pairs[:count]]


class StopOutcome(enum.IntEnum):
    """What `JobStore.stop` did (the stop script's answer)."""

    ENDED_BEFORE = 0  # the job had ended (or is gone): nothing to stop
    STOPPED = 1
    STOPPING_ALREADY = 2


class JobState(NamedTuple):
    """JobState is what the runner's watch reads of a job it runs items of."""

    status: str
    owner: str


@dataclass(frozen=True)
class Owner:
    """Owner is the key a job runs as: what the edge vouched for when it was created.

    Attributes:
        key_id: the API key (or JWT subject).
        tenant: its tenant ("" when none).
        identity: every identity header the edge set (contract.IDENTITY_HEADERS),
            forwarded to the workers with each item.
    """

    key_id: str
    tenant: str
    identity: Mapping[str, str]

    @property
    def lane(self) -> str:
        """Returns the concurrency lane: the tenant, else the key."""
        return f"t.{self.tenant}" if self.tenant else f"k.{self.key_id}"


# Queues writes into a job's creating transaction: (pipeline, job id) -> ignored.
AlsoCreate = Callable[[Any, str], object]


@dataclass(frozen=True)
class NewJob:
    """NewJob is a validated job to create."""

    owner: Owner
    items: Sequence[jobs_pb2.JobItem]
    webhook_url: str
    metadata: Mapping[str, str]
    idempotency_key: str
    deadline_ms: int
    # How long the idempotency key answers this job (an OpenAI batch creation's own
    # key only while the creation may retry: openai_batches.RETRY_HOLD_S).
    idempotency_ttl_s: int = IDEMPOTENCY_TTL_S
    # A digest of what the creation asked for (request_fingerprint): another request
    # under a used idempotency key is refused, where it was answered the first's job
    # (a nightly key reused for a new file ran nothing, and returned the old results).
    # "": not checked. The field its key came in, for the refusal.
    fingerprint: str = ""
    idempotency_field: str = "idempotency_key"


def _idem_key(job: NewJob) -> str:
    """Returns the key its idempotency key is kept under ("" without one)."""
    if not job.idempotency_key:
        return ""
    return f"{PREFIX}idem:{job.owner.key_id}:{job.idempotency_key}"


@dataclass
class JobRecord:
    """JobRecord is a job's hash, decoded."""

    job_id: str
    fields: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        """Returns a field as text."""
        return self.fields.get(name, default)

    def number(self, name: str) -> int:
        """Returns a numeric field (0 when unset)."""
        return int(self.fields.get(name) or 0)

    @property
    def status(self) -> str:
        """Returns the job's status."""
        return self.get("status")

    @property
    def owner(self) -> Owner:
        """Returns who the job runs as."""
        identity = json.loads(self.get("identity", "{}"))
        return Owner(self.get("owner"), self.get("tenant"), identity)


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def _raise_unless_busygroup(replies: Sequence[Any]) -> None:
    """Raises the first error of a transaction's replies, but an existing group's."""
    for reply in replies:
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise reply


def is_missing_group(exc: ResponseError) -> bool:
    """Whether a stream command failed for a lane whose stream expired after it was
    retired (no group; Redis 7 answers a blocked read UNBLOCKED). Read by its code:
    Redis before 7 wraps a NOGROUP met inside a script (the runner's heartbeat) in a
    generic "Error running script" reply."""
    return reply_code(str(exc)) in ("NOGROUP", "UNBLOCKED")


class JobStore:
    """JobStore reads and changes jobs atomically.

    Args:
        client: the AOF Redis.
        retention_s: how long a finished job (and its results) is kept.
        secret_box: seals webhook secrets before they are stored (None: stored
            as they are; services/jobs/secret_box.py).
        storage_bytes: the most bytes an owner may keep (its storage quota, which its
            jobs' results are charged to: past it, the job that passed it stops,
            reason STORAGE_QUOTA); 0: no limit.
        settle: lowers an owner's charges to when its objects really go (the
            StorageLedger's `settle`: whether it lowered any), before a job is
            stopped for its quota.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        retention_s: int,
        secret_box: SecretBox | None = None,
        storage_bytes: int = 0,
        settle: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.secret_box = secret_box
        self.storage_bytes = storage_bytes
        self.settle = settle
        self._ledger_bytes = client.register_script(_LEDGER_BYTES)
        self._finish_item = client.register_script(_FINISH_ITEM)
        self._end_job = client.register_script(_END_JOB)
        self._start_item = client.register_script(_START_ITEM)
        self._let_go_item = client.register_script(_LET_GO_ITEM)
        self._stop_job = client.register_script(_STOP_JOB)
        self._claim_hooks = client.register_script(_CLAIM_HOOKS)
        self._record_attempt = client.register_script(_RECORD_ATTEMPT)
        self._reseal_secret = client.register_script(_RESEAL_SECRET)
        self._redeliver = client.register_script(_REDELIVER)
        self._next_attempt = client.register_script(_NEXT_ATTEMPT)
        self._page_after = client.register_script(PAGE_AFTER)
        self._retire_lane = client.register_script(_RETIRE_LANE)
        self._groups: set[str] = set()

    # -- creation ---------------------------------------------------------

    async def create(self, job: NewJob, also: AlsoCreate | None = None) -> tuple[str, bool]:
        """Creates a job (or finds the one its idempotency key made); returns (id, created).

        also: queues more writes, given the transaction and the new job's id, that
            commit with the job or not at all (an OpenAI batch's record: written
            apart, a failure between the two left a running, billed job without
            its batch, and the client's retry ran and billed it again).
        """
        idem = _idem_key(job)
        stream = work_stream(job.owner.lane)
        while True:
            job_id = new_job_id()
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    if idem:
                        await pipe.watch(idem)
                        existing = await pipe.get(idem)
                        if existing is not None and await self.redis.exists(
                            job_key(text(existing))
                        ):
                            await self._check_same_request(text(existing), job)
                            return text(existing), False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    # The group with the stream, in the job's transaction: a lane
                    # retired meanwhile (its stream deleted) comes back whole.
                    pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
                    self._queue_creation(pipe, job_id, job, stream)
                    if also is not None:
                        also(pipe, job_id)
                    if idem:
                        pipe.set(idem, job_id, ex=job.idempotency_ttl_s)
                    replies = await pipe.execute(raise_on_error=False)
                    _raise_unless_busygroup(replies)
                    return job_id, True
                except WatchError:
                    continue  # another request with the key won: read its job

    async def created_by(self, job: NewJob) -> str | None:
        """Returns the id of the job its idempotency key made, if it still exists (None:
        none); raises InvalidArgument when another request made it (see `create`)."""
        idem = _idem_key(job)
        existing = await self.redis.get(idem) if idem else None
        if existing is None or not await self.redis.exists(job_key(text(existing))):
            return None
        await self._check_same_request(text(existing), job)
        return text(existing)

    async def _check_same_request(self, job_id: str, job: NewJob) -> None:
        """Raises InvalidArgument when the job its idempotency key made was asked for by
        another request (a job from before fingerprints, or without one, is not checked)."""
        stored = await self.redis.hget(job_key(job_id), "fingerprint")
        if job.fingerprint and stored and text(stored) != job.fingerprint:
            raise InvalidArgument(
                [
                    FieldViolation(
                        job.idempotency_field,
                        "was used within 24 h for another request (another input or "
                        "parameters): a key answers one request; use a new key",
                    )
                ],
                reason="IDEMPOTENCY_KEY_REUSED",
            )

    def _queue_creation(self, pipe: Any, job_id: str, job: NewJob, stream: str) -> None:
        created = now_ms()
        owner = job.owner
        pipe.hset(
            job_key(job_id),
            mapping={
                "owner": owner.key_id,
                "tenant": owner.tenant,
                "lane": owner.lane,
                "identity": json.dumps(dict(owner.identity)),
                "status": QUEUED,
                "total": len(job.items),
                "succeeded": 0,
                "failed": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "created_ms": created,
                "deadline_ms": job.deadline_ms,
                "metadata": json.dumps(dict(job.metadata)),
                "idempotency_key": job.idempotency_key,
                "fingerprint": job.fingerprint,
                "webhook_url": job.webhook_url,
                "webhook_state": HOOK_WAITING if job.webhook_url else "",
                "webhook_attempts": 0,
            },
        )
        for start in range(0, len(job.items), 1000):
            chunk = job.items[start : start + 1000]
            pipe.hset(
                items_key(job_id),
                mapping={str(start + i): item.SerializeToString() for i, item in enumerate(chunk)},
            )
        for index in range(len(job.items)):
            pipe.xadd(stream, {"job": job_id, "i": str(index)})
        pipe.sadd(LANES_KEY, owner.lane)
        pipe.persist(stream)  # a retired lane's stream was set to expire
        pipe.zadd(owner_key(owner.key_id), {job_id: created})
        # No job outlives its window and then its retention: older members are gone.
        lifetime_s = int(MAX_WINDOW_S) + self.retention_s
        pipe.zremrangebyscore(owner_key(owner.key_id), "-inf", created - lifetime_s * 1000)
        pipe.expire(owner_key(owner.key_id), lifetime_s)
        pipe.zadd(ACTIVE_KEY, {job_id: job.deadline_ms})

    async def ensure_group(self, stream: str) -> None:
        """Creates the runners' consumer group on a lane's stream (once per process)."""
        if stream in self._groups:
            return
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    def forget_groups(self) -> None:
        """Forgets which consumer groups exist (a lane was retired: its group is gone)."""
        self._groups.clear()

    async def retire_lane_if_empty(self, stream: str) -> bool:
        """Drops a lane whose stream holds no entry (the stream expires in a day unless
        a job comes); True if it did."""
        lane = stream.removeprefix(work_stream(""))
        retire = self._retire_lane(keys=[LANES_KEY, stream], args=[lane, RETIRED_STREAM_TTL_S])
        return bool(await retire)

    # -- reading ----------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        """Returns a job's record, or None when there is none."""
        raw = await self.redis.hgetall(job_key(job_id))
        return JobRecord(job_id, _decode(raw)) if raw else None

    async def statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Returns the status of each job ("" for a job that is gone)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_key(job_id), "status")
            replies = await pipe.execute()
        return {j: text(r) if r is not None else "" for j, r in zip(job_ids, replies, strict=True)}

    async def owners(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """Returns the status and owner of each job (both "" for a job that is gone)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(job_key(job_id), ["status", "owner"])
            replies = await pipe.execute()
        return {
            job_id: JobState(*(text(v) if v is not None else "" for v in reply))
            for job_id, reply in zip(job_ids, replies, strict=True)
        }

    async def attempts(self, job_id: str) -> list[jobs_pb2.WebhookAttempt]:
        """Returns a job's latest webhook attempts, oldest first."""
        raw: Any = await self.redis.lrange(attempts_key(job_id), 0, -1)
        return [jobs_pb2.WebhookAttempt.FromString(r) for r in raw]

    async def result_and_status(self, job_id: str, index: int) -> tuple[bytes | None, str]:
        """Returns an item's stored result (None: none yet) and its job's status ("":
        gone), read together (MULTI): `finish_item` writes both at once, so a status
        that is final here comes with the result the item ended with."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(results_key(job_id), str(index))
            pipe.hget(job_key(job_id), "status")
            raw, status = await pipe.execute()
        return raw, text(status) if status is not None else ""

    async def results(self, job_id: str, indexes: Sequence[int]) -> list[bytes | None]:
        """Returns the stored results of `indexes` (None where an item has none)."""
        if not indexes:
            return []
        replies: Any = await self.redis.hmget(results_key(job_id), [str(i) for i in indexes])
        return list(replies)

    async def owned(
        self, key_id: str, before_ms: int, count: int, after: str = ""
    ) -> list[tuple[str, int]]:
        """Returns up to `count` of a key's jobs, newest first, that follow the job `after`,
        created at `before_ms` (without `after`: that were created before `before_ms`).

        By the job's place, not its time alone: a page that ended at one of several
        jobs created in the same millisecond skipped the others. A job no longer
        listed (expired, or dropped by a list) is followed from its place, the
        same millisecond's later jobs included: it used to skip those.
        """
        return await page_after(self._page_after, owner_key(key_id), after, count, before_ms)

    async def forget_owned(self, key_id: str, job_ids: Sequence[str]) -> None:
        """Drops jobs whose records expired from a key's list."""
        if job_ids:
            await self.redis.zrem(owner_key(key_id), *job_ids)

    # -- running ----------------------------------------------------------

    async def start_item(
        self, job_id: str, index: int, consumer: str, stream: str, entry_id: str
    ) -> jobs_pb2.JobItem | None:
        """Marks an item in flight for `consumer` and returns it (its job becomes
        RUNNING), or acknowledges its entry and returns None when it must not run: its
        job ended, is stopping or is gone, or the item has its result."""
        raw = await self._start_item(
            keys=[*self._job_keys(job_id), stream],
            args=[job_id, index, consumer, now_ms(), self.retention_s, GROUP, entry_id],
        )
        return jobs_pb2.JobItem.FromString(raw) if raw else None

    async def finish_item(
        self,
        job_id: str,
        index: int,
        result: jobs_pb2.JobResult,
        usage: tuple[int, int, int],
        stream: str,
        entry_id: str,
        consumer: str = "",
    ) -> bool:
        """Stores an item's result, counts it, charges it to the job's owner, ends the
        job after its last item (a stopping job after its last one in flight), and
        acknowledges the item's stream entry, atomically; False when it wrote
        nothing: the item had a result, or the job ended (its results are final) or
        is gone. A result that takes its owner past its storage quota is stored, and
        its job stopped (reason STORAGE_QUOTA): no more of its items run."""
        succeeded = "0" if result.HasField("error") else "1"
        lane = lane_of(stream)
        # The latest its results may stay: a stop's grace after its deadline, then the
        # retention (settled to when they go when the owner is refused).
        kept_after_deadline_ms = (STOP_GRACE_S + self.retention_s) * 1000
        wrote = await self._finish_item(
            keys=[*self._job_keys(job_id), stream, ledger_key(lane), ledger_sizes_key(lane)],
            args=[
                job_id,
                index,
                result.SerializeToString(),
                succeeded,
                *usage,
                now_ms(),
                self.retention_s,
                GROUP,
                entry_id,
                consumer,
                kept_after_deadline_ms,
                self.storage_bytes,
            ],
        )
        if wrote == OVER_QUOTA:
            # The result is stored: a failure from here on must not read as "not
            # stored" (a retry writes nothing). The next result checks again.
            try:
                if await self._over_quota(lane):
                    logger.warning("job %s stopped: its owner is past its storage quota", job_id)
                    await self.stop(job_id, STORAGE_QUOTA)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("job %s: its owner's storage quota not checked: %s", job_id, exc)
        return bool(wrote)

    async def _over_quota(self, owner: str) -> bool:
        """Tells whether `owner` keeps more than its quota once its charges are settled
        (an ended job's items, results that expired: charged until the latest they
        could go, which a stop on the ledger's word alone cut jobs for)."""
        if self.settle is None or not await self.settle(owner):
            return True  # nothing lowered: the ledger says what the finishing script read
        keys = [ledger_key(owner), ledger_sizes_key(owner)]
        return int(await self._ledger_bytes(keys=keys, args=[now_ms()])) > self.storage_bytes

    async def let_go(
        self, job_id: str, index: int, consumer: str, stream: str, entry_id: str
    ) -> None:
        """Lets an item in flight go without a result (its job is stopping or ended) and
        acknowledges its entry; a stopping job with nothing left in flight ends."""
        await self._let_go_item(
            keys=[*self._job_keys(job_id), stream],
            args=[job_id, index, consumer, now_ms(), self.retention_s, GROUP, entry_id],
        )

    async def drop_mark(self, job_id: str, index: int, consumer: str, stream: str) -> None:
        """Forgets that `consumer` runs an item whose entry another replica took over
        (its call was cut), leaving the entry to that replica; a stopping job with
        nothing left in flight ends."""
        await self._let_go_item(
            keys=[*self._job_keys(job_id), stream],
            args=[job_id, index, consumer, now_ms(), self.retention_s, GROUP, ""],
        )

    async def stop(self, job_id: str, reason: str = "") -> StopOutcome:
        """Stops a running job (a cancel: `reason` ""; its key revoked: KEY_REVOKED):
        no item of it starts any more, and it ends CANCELLED once none is in flight
        (at once when none is)."""
        stopped = await self._stop_job(
            keys=self._job_keys(job_id),
            args=[job_id, reason, now_ms(), self.retention_s, now_ms() + STOP_GRACE_S * 1000],
        )
        return StopOutcome(int(stopped))

    async def ack(self, stream: str, entry_id: str) -> None:
        """Acknowledges an entry whose item must not run (its job ended or is gone)."""
        await self.redis.xack(stream, GROUP, entry_id)

    async def end(self, job_id: str, status: str, due_before_ms: int = 0) -> bool:
        """Ends a running job with `status` (CANCELLED, EXPIRED) at once; False when it
        had ended. A stopping job ends as it was stopped (whatever `status` says). A job
        expiring with items in flight stops first (CANCELLING, stop_reason DEADLINE)
        and ends EXPIRED once they are finished or let go (see _END_JOB).

        With `due_before_ms`, only a job whose deadline is before it ends (the
        expiry sweep cannot end a job whose deadline moved; a stopping job is due
        `STOP_GRACE_S` after it was stopped).
        """
        now = now_ms()
        ended = await self._end_job(
            keys=self._job_keys(job_id),
            args=[job_id, status, now, self.retention_s, due_before_ms, now + STOP_GRACE_S * 1000],
        )
        return bool(ended)

    async def overdue(self, now: int, count: int = 100) -> list[str]:
        """Returns unfinished jobs whose deadline has passed."""
        raw: Any = await self.redis.zrangebyscore(ACTIVE_KEY, "-inf", now, start=0, num=count)
        return [text(r) for r in raw]

    async def active_page(self, cursor: int, count: int) -> tuple[list[str], int]:
        """Returns about `count` unfinished jobs (the `active` zset, in no order) from
        `cursor`, and the cursor to go on from (0: a pass over them all is done).

        ZSCAN, not a range by deadline or by rank: jobs end and stopped ones move
        (their deadline becomes `stop_by_ms`) while a pass goes on, and a scan still
        returns every job that stays active throughout it (some may come twice).
        """
        reply: Any = await self.redis.zscan(ACTIVE_KEY, cursor, count=count)
        next_cursor, members = reply
        return list(dict.fromkeys(text(member) for member, _ in members)), int(next_cursor)

    def _job_keys(self, job_id: str) -> list[str]:
        return [
            job_key(job_id),
            items_key(job_id),
            results_key(job_id),
            ACTIVE_KEY,
            HOOKS_KEY,
            attempts_key(job_id),
            inflight_key(job_id),
            batch_key_of_job(job_id),
        ]

    async def lanes(self) -> list[str]:
        """Returns every lane's stream."""
        members: Any = await self.redis.smembers(LANES_KEY)
        return sorted(work_stream(text(m)) for m in members)

    # -- webhooks ---------------------------------------------------------

    async def claim_due_hooks(self, lease_ms: int, count: int) -> list[str]:
        """Returns jobs whose webhook is due, leased to this replica for `lease_ms`."""
        raw = await self._claim_hooks(keys=[HOOKS_KEY], args=[lease_ms, count])
        return [text(r) for r in raw]

    async def drop_hook(self, job_id: str) -> None:
        """Forgets a due webhook that has nothing to send (its job is gone or it was sent)."""
        await self.redis.zrem(HOOKS_KEY, job_id)

    async def defer_hook(self, job_id: str, due_ms: int) -> None:
        """Makes a leased webhook due at `due_ms` instead, no attempt counted (its key
        had its share of the replica's attempts in flight); one whose job is gone
        meanwhile stays gone (XX)."""
        await self.redis.zadd(HOOKS_KEY, {job_id: due_ms}, xx=True)

    async def next_attempt(self, job_id: str) -> int | None:
        """Counts a delivery attempt; returns its number (None: the job is gone, and its
        webhook with it)."""
        number = int(await self._next_attempt(keys=[job_key(job_id), HOOKS_KEY], args=[job_id]))
        return number or None

    async def record_attempt(
        self,
        job_id: str,
        attempt: jobs_pb2.WebhookAttempt,
        state: str,
        next_ms: int,
        round_start: int,
    ) -> bool:
        """Records an attempt and the webhook's next state (next_ms 0: no further
        attempt); False when the attempt came late and changed no state (its round,
        `round_start` when it was sent, was delivered or replaced meanwhile)."""
        changed = await self._record_attempt(
            keys=[job_key(job_id), attempts_key(job_id), HOOKS_KEY],
            args=[
                job_id,
                attempt.SerializeToString(),
                state,
                next_ms,
                MAX_ATTEMPTS_KEPT,
                round_start,
            ],
        )
        return bool(changed)

    async def redeliver(self, job_id: str) -> bool:
        """Makes a final job's webhook due now, for a new round of attempts; False when
        the job is gone."""
        return bool(
            await self._redeliver(keys=[job_key(job_id), HOOKS_KEY], args=[job_id, now_ms()])
        )

    # -- webhook secrets --------------------------------------------------

    async def create_secret(self, key_id: str, secret: str) -> bool:
        """Stores a key's first webhook secret; False when it has one."""
        stored = self._seal(secret, key_id)
        return bool(await self.redis.hsetnx(secret_key(key_id), "current", stored))

    async def rotate_secret(self, key_id: str, secret: str, overlap_ms: int) -> None:
        """Makes `secret` the key's secret; the one it replaces signs too for
        `overlap_ms`, and earlier ones until their own overlaps end.

        A replaced secret this replica cannot open (sealed under a lost key) is
        dropped, not kept: kept, it failed every delivery ("rotate it") for the
        whole overlap, 24 h by default, so rotating did not fix what it was
        advised for, and reseal reported the key for good.

        Raises:
            FailedPrecondition: MAX_PREVIOUS_SECRETS replaced secrets still sign
                and this rotation would keep one more (overlap 0s keeps none).
        """
        name, stored = secret_key(key_id), self._seal(secret, key_id)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(name)
                    raw = _decode(await pipe.hgetall(name))
                    fields: dict[Any, Any] = {
                        "current": stored,
                        **self._kept_at_rotation(raw, key_id, overlap_ms),
                    }
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(name)
                    pipe.hset(name, mapping=fields)
                    await pipe.execute()
                    return
                except WatchError:
                    continue  # another rotation or a re-seal came first: read again

    def _kept_at_rotation(
        self, raw: Mapping[str, str], key_id: str, overlap_ms: int
    ) -> dict[str, str]:
        """Returns the previous-secret fields a rotation writes: the replaced secret
        (when it opens and overlaps) and the earlier ones that still sign and open."""
        now = now_ms()
        kept = [(stored, until) for _, stored, until in _live_previous(raw, now)]
        if raw.get("current") and overlap_ms > 0:
            kept.insert(0, (raw["current"], now + overlap_ms))
        readable = [(stored, until) for stored, until in kept if self._opens(stored, key_id)]
        if len(readable) > MAX_PREVIOUS_SECRETS:
            first_end = min(until for _, until in readable[1:])
            raise FailedPrecondition(
                f"{MAX_PREVIOUS_SECRETS} earlier webhook secrets of this key still sign; "
                f"rotate after {_utc_text(first_end)}, when the first of them stops, or "
                "with overlap 0s (the current secret then stops at once)",
                reason="WEBHOOK_SECRET_OVERLAPS",
            )
        fields: dict[str, str] = {}
        for (slot, until_slot), (stored, until) in zip(PREVIOUS_SLOTS, readable, strict=False):
            fields.update({slot: stored, until_slot: str(until)})
        return fields

    def _opens(self, stored: str, key_id: str) -> bool:
        try:
            self._open(stored, key_id)
        except SecretUnreadable:
            logger.warning("dropped the webhook secret of %s that no key opens", key_id)
            return False
        return True

    async def has_secret(self, key_id: str) -> bool:
        """Returns whether the key has a webhook secret (without reading it)."""
        return bool(await self.redis.hexists(secret_key(key_id), "current"))

    async def secrets_in_use(self, key_id: str) -> list[str]:
        """Returns the secrets a key's events are signed with now (current first).

        Raises:
            SecretUnreadable: a stored secret does not open with this replica's key.
        """
        raw = _decode(await self.redis.hgetall(secret_key(key_id)))
        out = [raw["current"]] if "current" in raw else []
        out += [stored for _, stored, _ in _live_previous(raw, now_ms())]
        return [self._open(stored, key_id) for stored in out]

    async def reseal_secrets(self) -> Resealed:
        """Seals every stored webhook secret under the current key: those a previous
        key sealed, and plain ones from before sealing. Safe to run again, and beside
        serving replicas (each value is replaced only if unchanged since read).
        Replaced secrets whose overlap has ended sign nothing and are skipped (one
        that no key opens was reported for good after its overlap).

        Raises:
            ValueError: this store has no sealing key.
        """
        if self.secret_box is None:
            raise ValueError("no webhook secrets key: nothing to seal with")
        done = Resealed()
        async for name in self.redis.scan_iter(match=secret_key("*"), count=200):
            redis_key = name.decode() if isinstance(name, bytes) else str(name)
            key_id = redis_key.removeprefix(secret_key(""))
            raw = _decode(await self.redis.hgetall(redis_key))
            slots = [("current", raw.get("current", ""))]
            slots += [(slot, stored) for slot, stored, _ in _live_previous(raw, now_ms())]
            for slot, stored in slots:
                if not stored:
                    continue
                try:
                    secret, stale = self.secret_box.open_with_age(stored, key_id)
                except SecretUnreadable:
                    done.unreadable.append(key_id)
                    continue
                if stale:
                    new = self.secret_box.seal(secret, key_id)
                    args = [slot, stored, new]
                    done.resealed += int(await self._reseal_secret(keys=[redis_key], args=args))
                done.checked += 1
        return done

    def _seal(self, secret: str, key_id: str) -> str:
        return secret if self.secret_box is None else self.secret_box.seal(secret, key_id)

    def _open(self, stored: str, key_id: str) -> str:
        if self.secret_box is not None:
            return self.secret_box.open(stored, key_id)
        if stored.startswith(SEALED_PREFIX):
            raise SecretUnreadable(
                f"the webhook secret of {key_id} is sealed and this replica has no key"
            )
        return stored
