"""Token budgets: tokens per minute and per calendar month, per API key.

Admission reserves prompt + max_tokens atomically in Redis (shared by every
worker and edge replica); completion reconciles the reservation with the
tokens really used, releasing the rest. Minute budgets are an exact sliding
window of reservations, so a key with N tokens/min can use N tokens in any
minute — never fewer, never more.

Reservations are idempotent per (key, request id): a request id reserved
again within its replay TTL (`REPLAY_TTL_S`, or for a job item until its job's
deadline: `replay_ttl_s`) while it holds a reservation, or after it was
reconciled as finished (a job item replayed after its jobs replica died
while it ran: the same `<job>:<n>`), is not charged again (workers pass the
request id only for the jobs service; any other caller's requests get ids of
their own: services.inference.admission.Request.usage_id), and reconciling
it makes the month's charge for that id its actual use (a job item's first
run that finished: the usage meter bills the id's first event), so a
replayed request costs the budget once, as the usage meter counts it once.
A replay reconciles in the month the id's charge was reserved in
(`Reserved.reserved_at`), whenever it runs.

An id whose reservation was given back (refused before it ran, a job item's
attempt that did not finish, a reservation forgotten) holds nothing: its next
attempt is checked against the limits and reserves like a new request. Each
reservation call carries an attempt id of its own, so the late copy of a
forgotten call (the same attempt) still charges nothing.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.core.breaker import Breaker
from services.core.errors import QuotaViolation, ResourceExhausted
from services.core.redis_service import LUA_REDIS_NOW_MS, text

#: The name of a monthly budget's limit: its QuotaFailure subject ends with it, which
#: the OpenAI surface answers as `insufficient_quota` (services/inference/openai/errors.py).
MONTHLY_LIMIT = "monthly_tokens"

# How long a reservation is remembered by request id (replays are charged once).
REPLAY_TTL_S = 3600
# The longest a job item's may be (`reserve`'s `replay_ttl_s`): a job's window (at
# most 7 days) and a day; the usage meter remembers a billed id 7 days.
MAX_REPLAY_TTL_S = 8 * 86400
# How many recorded requests `recover` looks up per round trip.
_RECOVER_BATCH = 500
# Every holder of open reservations (services.inference.reservation_reaper).
HOLDERS_KEY = "tm:budget:holders"

# The window's running sum (`tm:budget:<key>:tpm:sum`, a hash: `tokens`, the sum of
# the window's amounts, and `entries`, how many amounts it sums): summing the amounts
# on every reservation cost the durable Redis's single thread O(the key's reservations
# in the last minute) per request. Every script here that changes the amounts keeps the
# sum exact, in the same script. A sum whose `entries` is not the amounts' count (the
# amounts changed by a script that keeps no sum: an earlier release's, during a rolling
# upgrade), or none at all (a window an earlier release wrote), is rebuilt from the
# amounts by the next reservation, so is one older than SUM_REBUILD_MS: once a minute
# per busy key that is O(window), amortised O(1) per reservation, and it bounds how long
# a change the count cannot see (an earlier release's reconcile) stays counted.
SUM_REBUILD_MS = 60_000
# How many of the window's oldest reservations a refusal reads to tell when enough of
# them will have expired; past them it answers when the newest one expires.
RETRY_WALK = 64
# Lua: `sum` and `valid` (the sum describes the amounts KEYS[amounts] now); the
# shadow copies' read of a caller's budgets (services.inference.shadow) uses it too.
READ_SUM = """
local sum = redis.call('HMGET', KEYS[SUM], 'tokens', 'entries')
local valid = sum[1] and tonumber(sum[2]) == redis.call('HLEN', KEYS[AMOUNTS])
sum = tonumber(sum[1])
"""
# Lua: writes the sum after a change of `delta` tokens to the amounts, when it was valid;
# drops it otherwise (the next reservation rebuilds it).
_WRITE_SUM = """
if valid then
  redis.call('HSET', KEYS[SUM], 'tokens', sum + delta, 'entries', redis.call('HLEN', KEYS[AMOUNTS]))
else
  redis.call('DEL', KEYS[SUM])
end
"""


def budget_lua(script: str, **keys: int) -> str:
    """Returns `script` with the sum's snippets' key positions (SUM, AMOUNTS) filled in."""
    for name, position in keys.items():
        script = script.replace(f"KEYS[{name}]", f"KEYS[{position}]")
    return script


# KEYS: window zset, window amounts hash, month counter, the request id's charge,
#       the id's "given back" mark, the id's forgotten attempts, the window's sum,
#       the holder's open reservations (ReservationReaper), the id's holder, the
#       holders, the id's "a run finished" mark, when the id's charge was reserved,
#       the attempts running on the id's charge
# ARGV: (unused), request id, amount, tpm (0 = none), monthly (0 = none), month
#       ttl s, replay ttl s, this call's attempt id, its field among the holder's
#       open reservations ("": not listed), that field's value, the holder, this
#       reservation's time (time.time(), as Python wrote it: it picks the month),
#       "1" to count this attempt among those running on the charge (a job item's)
# The minute window is scored by Redis's clock (TIME), the same for every worker
# (services.usage.ratelimit._SLIDING_WINDOWS says why).
# Returns {0 or 1, which budget failed ("" | "tpm" | "monthly"), retry_after_ms, tokens
#          used this minute and this month including this reservation, and for a
#          replay the time its id's charge was reserved ("": unknown)}. An amount
#          over a whole budget never gets here (check_within_whole_budget).
_RESERVE = (
    budget_lua(
        LUA_REDIS_NOW_MS
        + """
local id, amount = ARGV[2], tonumber(ARGV[3])
local tpm, monthly = tonumber(ARGV[4]), tonumber(ARGV[5])
local month_used = 0
-- Lists the id among this holder's open reservations and makes it the id's holder:
-- a dead holder's reaper gives back only what it still holds.
local function list_open(value)
  if ARGV[9] ~= '' then
    redis.call('HSET', KEYS[8], ARGV[9], value)
    redis.call('SET', KEYS[9], ARGV[11], 'EX', tonumber(ARGV[7]))
    redis.call('SADD', KEYS[10], ARGV[11])
  end
end
-- The late copy of a call that was forgotten (_FORGET): it charges nothing.
if redis.call('SISMEMBER', KEYS[6], ARGV[8]) == 1 then
  return {1, '', 0, 0, 0}
end
-- A job item's attempts that run on its charge: an attempt that ends unfinished
-- gives the charge back only when it was the last (another, tried again meanwhile
-- on another worker, runs on it: given back, the room was admitted twice).
local function running(fresh)
  if ARGV[13] == '1' and ARGV[8] ~= '' then
    if fresh then redis.call('DEL', KEYS[13]) end
    redis.call('SADD', KEYS[13], ARGV[8])
    redis.call('EXPIRE', KEYS[13], tonumber(ARGV[7]))
  end
end
-- This request id holds a reservation, or its run finished (a replay): admitted,
-- not charged again. One given back (charge 0, marked) holds nothing: this new
-- attempt is checked and reserves below, or a retry would pass any limit. A replay
-- of an unfinished one (a job item tried again on another worker after its first
-- worker died) takes the reservation over: it reconciles it.
-- The charge stays in the month it was reserved in (a retry past a month's end
-- reconciled it into the next month: the old one kept it all, the new one went
-- negative): the caller reconciles (or its reaper takes back) in that month.
if redis.call('EXISTS', KEYS[4]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then
  local at = redis.call('GET', KEYS[12])
  if redis.call('EXISTS', KEYS[11]) == 0 then
    list_open(at and ('[' .. at .. ', "' .. ARGV[8] .. '"]') or ARGV[10])
    running(false)
  end
  return {1, '', 0, 0, 0, at or ''}
end
"""
        + READ_SUM
        + """
-- Expired reservations leave the window and its sum: O(expired), each expires once.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
local delta = 0
-- In chunks: unpack() of more than ~8000 values overflows Lua's stack.
for i = 1, #expired, 1000 do
  local last = math.min(i + 999, #expired)
  for _, v in ipairs(redis.call('HMGET', KEYS[2], unpack(expired, i, last))) do
    delta = delta - (tonumber(v) or 0)
  end
  redis.call('HDEL', KEYS[2], unpack(expired, i, last))
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
end
if not valid then
  sum, delta, valid = 0, 0, true
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do sum = sum + tonumber(v) end
  redis.call('DEL', KEYS[7])
  redis.call('HSET', KEYS[7], 'tokens', sum, 'entries', redis.call('HLEN', KEYS[2]))
  redis.call('PEXPIRE', KEYS[7], SUM_REBUILD_MS)
end
local used = sum + delta
if tpm > 0 and used + amount > tpm then
"""
        + _WRITE_SUM
        + """
  -- When enough of the oldest reservations will have expired, read from at most
  -- RETRY_WALK of them (walking the whole window cost O(window) per refusal, and a
  -- key over its budget keeps retrying); beyond them, when the newest expires:
  -- everything now in the window has gone by then, and the request fits an empty one.
  local need, retry = used + amount - tpm, nil
  local oldest = redis.call('ZRANGE', KEYS[1], 0, RETRY_WALK - 1, 'WITHSCORES')
  local ids = {}
  for i = 1, #oldest, 2 do ids[#ids + 1] = oldest[i] end
  if #ids > 0 then
    local gone = 0
    for j, v in ipairs(redis.call('HMGET', KEYS[2], unpack(ids))) do
      gone = gone + (tonumber(v) or 0)
      if gone >= need then retry = tonumber(oldest[2 * j]) + 60000 - now; break end
    end
  end
  if not retry then
    local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    retry = newest[2] and tonumber(newest[2]) + 60000 - now or 60000
  end
  return {0, 'tpm', retry}
end
if monthly > 0 then
  month_used = tonumber(redis.call('GET', KEYS[3]) or 0)
  if month_used + amount > monthly then
"""
        + _WRITE_SUM
        + """
    return {0, 'monthly', 0}
  end
end
-- An id still in the window (given back, reserving anew) is replaced, not added.
local before = tonumber(redis.call('HGET', KEYS[2], id) or 0)
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, amount)
delta = delta - before + amount
"""
        + _WRITE_SUM
        + """
redis.call('PEXPIRE', KEYS[1], 61000)
redis.call('PEXPIRE', KEYS[2], 61000)
redis.call('INCRBY', KEYS[3], amount)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
-- A given-back id's charge was 0: it holds this reservation now.
redis.call('SET', KEYS[4], amount, 'EX', tonumber(ARGV[7]))
redis.call('SET', KEYS[12], ARGV[12], 'EX', tonumber(ARGV[7]))
redis.call('DEL', KEYS[5])
list_open(ARGV[10])
running(true)
return {1, '', 0, sum + delta, month_used + amount, ''}
""",
        SUM=7,
        AMOUNTS=2,
    )
    .replace("SUM_REBUILD_MS", str(SUM_REBUILD_MS))
    .replace("RETRY_WALK", str(RETRY_WALK))
)

# Lua (the KEYS and ARGV of _RECONCILE, below): makes the id's charge its actual use;
# the month is charged the difference, the minute window's amount becomes it.
_SETTLE_CHARGE = (
    """
-- A job item's charge is kept until its job's deadline (reserve's replay ttl),
-- longer than ARGV[4]: never shortened here.
local ttl = math.max(tonumber(ARGV[4]), redis.call('TTL', KEYS[3]))
local actual = tonumber(ARGV[3])
local charged = tonumber(redis.call('GET', KEYS[3]) or ARGV[2])
local before = redis.call('HGET', KEYS[1], ARGV[1])
if before then
"""
    + READ_SUM
    + """
  redis.call('HSET', KEYS[1], ARGV[1], actual)
  local delta = actual - tonumber(before)
"""
    + _WRITE_SUM
    + """
end
-- A month counter gone (its month ended a day ago: a job item's replay settles in
-- its first attempt's month) stays gone: INCRBY made it again, with no expiry.
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], actual - charged) end
redis.call('SET', KEYS[3], actual, 'EX', ttl)
"""
)

# KEYS: window amounts hash, month counter, the request id's charge, the id's
#       "a run finished" mark, the id's "given back" mark, the window's sum, the
#       holder's open reservations, the attempts running on the id's charge
# ARGV: request id, reserved, actual, replay ttl s, the run ("": any request that
#       ran; "finished": a job item's run that did; "unfinished": a run given
#       back, reconciled to 0; see TokenBudgets.reconcile), the reservation's
#       field among the holder's open ones ("": none), the run's attempt id
# The month is charged what the id has not been charged yet (its charge, else
# `reserved`), so the id's total is its latest actual use however often it ran,
# except that nothing changes once a job item's run finished (its "finished" mark):
# neither an unfinished run's reconcile landing late nor a second run that finished
# too (the item run again to its end, its result unstored: its jobs replica died
# between the answer and the store). The meter bills an id's first usage event and
# drops the rest, so the first finished run's charge is the one that matches it: the
# last one's left the month at 65 tokens against 30 metered.
# An unfinished run marks the id given back (its next attempt reserves anew); a
# run that ran unmarks it (its replays are charged nothing more).
_RECONCILE = budget_lua(
    """
if ARGV[6] ~= '' then redis.call('HDEL', KEYS[7], ARGV[6]) end
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
-- An unfinished attempt of a job item that another attempt still runs on (tried
-- again meanwhile): that one reconciles the charge.
if ARGV[5] == 'unfinished' and ARGV[7] and ARGV[7] ~= ''
    and redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('SREM', KEYS[8], ARGV[7])
  if redis.call('SCARD', KEYS[8]) > 0 then return 0 end
end
"""
    + _SETTLE_CHARGE
    + """
if ARGV[5] == 'finished' then redis.call('SET', KEYS[4], '1', 'EX', ttl) end
if ARGV[5] == 'unfinished' then
  redis.call('SET', KEYS[5], '1', 'EX', ttl)
else
  redis.call('DEL', KEYS[5])
end
return 1
""",
    SUM=6,
    AMOUNTS=1,
)

# KEYS: those of _RECONCILE, then the id's holder
# ARGV: those of _RECONCILE (`reserved` is `actual`, the run ""), then the dead holder
# Reconciles a request that a dead holder recorded (its usage event is in the spool
# the holder's successor opened) but whose reconcile never landed: the holder was
# killed between the two. Only while the id is still that holder's (a job item's
# replay that took it over since reconciles it) and either still listed among its
# open reservations, or taken back since by a reaper (a charge of 0, given back):
# this late reconcile charges the use. An id whose reconcile landed, or whose
# charge expired, is left alone. Returns 1 if it charged.
_RECOVER = budget_lua(
    """
if redis.call('GET', KEYS[9]) ~= ARGV[8] or redis.call('EXISTS', KEYS[4]) == 1 then
  return 0
end
if redis.call('HDEL', KEYS[7], ARGV[6]) == 0
    and not (redis.call('EXISTS', KEYS[5]) == 1 and redis.call('GET', KEYS[3]) == '0') then
  return 0
end
if not redis.call('GET', KEYS[3]) then return 0 end
"""
    + _SETTLE_CHARGE
    + """
redis.call('DEL', KEYS[5])
return 1
""",
    SUM=6,
    AMOUNTS=1,
)

# KEYS: window zset, window amounts hash, month counter, the request id's charge,
#       the id's "given back" mark, the id's forgotten attempts, the window's sum,
#       the holder's open reservations, the id's holder, the id's "a run finished"
#       mark, the attempts running on the id's charge
# ARGV: request id, replay ttl s, the forgotten call's attempt id, the
#       reservation's field among the holder's open ones ("": none), "1" to take
#       it back only while it is listed there and the holder still holds it (a
#       reaper: not reconciled since, nor taken over by a replay), the holder
# Takes back a reservation whose outcome its worker never learnt (the call timed
# out or was cancelled after it was sent), or whose worker died with it open
# (ReservationReaper): refunds what the id was charged, and leaves a charge of 0
# marked given back (a new attempt reserves anew) and the call's attempt id, so
# that the reservation, should it reach Redis only now, charges nothing (and a
# reconcile landing late charges what the request used). An id a run of which
# finished keeps its charge: the meter bills that run (a replay of it, admitted on
# it, whose call was cut refunded it, and the month missed the billed run). Returns
# 1 if it refunded.
_FORGET = budget_lua(
    """
-- A job item's charge, shared by the attempts that run on it (_RESERVE's running):
-- whose it is, is told by them, not by the holder (the last to take it over).
local shared = KEYS[11] and ARGV[3] ~= '' and redis.call('EXISTS', KEYS[11]) == 1
if ARGV[4] ~= '' then
  local listed = redis.call('HDEL', KEYS[8], ARGV[4]) == 1
  if ARGV[5] == '1' and not shared
      and not (listed and redis.call('GET', KEYS[9]) == ARGV[6]) then
    return 0
  end
end
if redis.call('EXISTS', KEYS[10]) == 1 then return 0 end
-- A job item's charge is kept until its job's deadline: never shortened here.
local ttl = math.max(tonumber(ARGV[2]), redis.call('TTL', KEYS[4]))
if shared then
  local was_running = redis.call('SREM', KEYS[11], ARGV[3]) == 1
  -- A reaper's attempt that settled already holds nothing; another attempt still
  -- running on the charge keeps it (this one's late copy charges nothing).
  if ARGV[5] == '1' and not was_running then return 0 end
  if redis.call('SCARD', KEYS[11]) > 0 then
    redis.call('SADD', KEYS[6], ARGV[3])
    redis.call('EXPIRE', KEYS[6], ttl)
    return 0
  end
end
local charged = redis.call('GET', KEYS[4])
if charged then
  -- DECRBY: `-tonumber('0')` is Lua's -0, sent as "-0", which INCRBY refuses. A
  -- month counter gone (see _RECONCILE) stays gone.
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('DECRBY', KEYS[3], charged) end
  redis.call('ZREM', KEYS[1], ARGV[1])
  local held = redis.call('HGET', KEYS[2], ARGV[1])
  if held then
"""
    + READ_SUM
    + """
    redis.call('HDEL', KEYS[2], ARGV[1])
    local delta = -tonumber(held)
"""
    + _WRITE_SUM
    + """
  end
end
redis.call('SET', KEYS[4], 0, 'EX', ttl)
redis.call('SET', KEYS[5], '1', 'EX', ttl)
redis.call('SADD', KEYS[6], ARGV[3])
redis.call('EXPIRE', KEYS[6], ttl)
if charged then return 1 end
return 0
""",
    SUM=7,
    AMOUNTS=2,
)

# Which run a reconcile is for: "" any request that ran, "finished" a job item's
# run that finished, "unfinished" a run given back (refused before it ran, or a job
# item's attempt to be tried again): see TokenBudgets.reconcile.
Run = Literal["", "finished", "unfinished"]


@dataclass(frozen=True)
class Reserved:
    """Reserved is an admitted reservation.

    Attributes:
        warning: each budget now at or over 80%, named ("" if none).
        reserved_at: when the request id's charge was reserved (time.time()): the
            call's `now`, or, for a replay that was admitted on an earlier attempt's
            charge (a job item tried again), that attempt's. Reconcile and forget
            the reservation with it: it picks the month that holds the charge.
    """

    warning: str
    reserved_at: float


@dataclass(frozen=True)
class Recorded:
    """Recorded is a request whose usage event a worker recorded (TokenBudgets.recover).

    Attributes:
        key_id: the API key it was charged to.
        request_id: its id in the budgets (the usage event's event_id).
        used: the tokens it used (prompt + completion, as billed).
        finished_at: when it ended (time.time()): the month, should the time its
            charge was reserved be gone.
    """

    key_id: str
    request_id: str
    used: int
    finished_at: float


@dataclass(frozen=True)
class Limits:
    """Limits are one key's token budgets (0 = unlimited)."""

    tokens_per_minute: int = 0
    monthly_tokens: int = 0

    @property
    def any(self) -> bool:
        """Tells whether the key has a token budget at all."""
        return bool(self.tokens_per_minute or self.monthly_tokens)


def _month(now: float) -> tuple[str, float]:
    """Returns the UTC month label and the seconds until the next month."""
    tm = time.gmtime(now)
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return f"{tm.tm_year:04d}{tm.tm_mon:02d}", calendar.timegm((year, month, 1, 0, 0, 0)) - now


class RequestOverBudget(ResourceExhausted):
    """RequestOverBudget refuses a request that needs more tokens than a whole budget.

    No wait can admit it, so it carries no RetryInfo and is sent as FAILED_PRECONDITION
    (HTTP 400, OpenAI `invalid_request_error`), which no client, SDK, edge retry policy
    or jobs executor (`services.jobs.execution.waits`) tries again: as RESOURCE_EXHAUSTED
    with "retry in 60s" (or 25 days) a client waited and was refused again, forever,
    and a job item waited until its job expired. Not INVALID_ARGUMENT: the request is
    valid, the key's budget (state an operator can raise) is what refuses it, and which
    field to lower (the prompt, max_tokens, n) is the caller's choice. A ResourceExhausted
    in kind: a stream charged as it goes (Admission.within_budget) ends at it as at a
    spent budget.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, key_id: str, limits: Limits, amount: int, budget: str) -> None:
        name, limit = (
            ("tokens_per_minute", limits.tokens_per_minute)
            if budget == "tpm"
            else ("monthly_tokens", limits.monthly_tokens)
        )
        largest = min(n for n in (limits.tokens_per_minute, limits.monthly_tokens) if n)
        super().__init__(
            f"this request needs {amount} tokens (its prompts' or inputs' tokens, and "
            f"max_tokens for each choice it generates), more than key {key_id}'s whole "
            f"{name}={limit}: it can never be admitted; the largest request the key can "
            f"make is {largest} tokens (lower max_tokens or n, or send shorter or fewer "
            "prompts or inputs)",
            quota_violations=[QuotaViolation(f"key:{key_id}:{name}", f"{name}={limit}")],
            reason="REQUEST_EXCEEDS_BUDGET",
            metadata={
                "limit": name,
                "limit_tokens": str(limit),
                "needed_tokens": str(amount),
                "max_request_tokens": str(largest),
            },
        )


def check_within_whole_budget(key_id: str, limits: Limits, amount: int) -> None:
    """Refuses, for good, `amount` tokens that exceed a whole budget of the key: no
    window, however empty, admits them. Checked here, before Redis: an over-budget
    request was admitted unmetered while the budgets' Redis was away (the script's
    own check never ran), and run to its end.

    Raises:
        RequestOverBudget: `amount` exceeds tokens_per_minute or monthly_tokens.
    """
    for budget, whole in (("tpm", limits.tokens_per_minute), ("monthly", limits.monthly_tokens)):
        if whole and amount > whole:
            raise RequestOverBudget(key_id, limits, amount, budget)


WARN_AT = 0.8


def _warning(limits: Limits, minute_used: int, month_used: int) -> str:
    close = [
        f"{name} {used}/{limit}"
        for name, used, limit in (
            ("tokens_per_minute", minute_used, limits.tokens_per_minute),
            ("monthly_tokens", month_used, limits.monthly_tokens),
        )
        if limit and used >= WARN_AT * limit
    ]
    return ", ".join(close)


class TokenBudgets:
    """TokenBudgets reserves and reconciles token budgets in Redis.

    Args:
        client: the Redis holding the budgets.
        replay_ttl_s: how long a request id's reservation is remembered (a
            reservation of the same id within it is not charged again).
        holder: this process's name among the holders of open reservations
            (ReservationReaper: a worker id and an incarnation id); "": its
            reservations are not listed, and nothing takes them back if it dies.
    """

    def __init__(
        self, client: aioredis.Redis, replay_ttl_s: int = REPLAY_TTL_S, holder: str = ""
    ) -> None:
        self.redis = client
        self.replay_ttl_s = replay_ttl_s
        self.holder = holder
        self._reserve = client.register_script(_RESERVE)
        # A hung Redis fails reservations at once after a few timeouts
        # (services.core.breaker): requests are admitted unmetered without waiting.
        self.breaker = Breaker("budgets")
        self._reconcile = client.register_script(_RECONCILE)
        self._forget = client.register_script(_FORGET)
        self._recover = client.register_script(_RECOVER)

    def _replay_ttl(self, wanted_s: int | None) -> int:
        """Returns how long a reservation's id is remembered: the budgets' own TTL, or
        longer where its caller asks (`wanted_s`, capped at MAX_REPLAY_TTL_S)."""
        if wanted_s is None:
            return self.replay_ttl_s
        return max(self.replay_ttl_s, min(wanted_s, MAX_REPLAY_TTL_S))

    def _keys(self, key_id: str, now: float) -> tuple[str, str, str]:
        """Returns the key's minute window, its amounts and the month's counter."""
        base = f"tm:budget:{key_id}"
        return f"{base}:tpm", f"{base}:tpm:amounts", self.month_key(key_id, now)

    @staticmethod
    def month_key(key_id: str, now: float) -> str:
        """Returns the counter of what the key was charged in the UTC month of `now`."""
        label, _ = _month(now)
        return f"tm:budget:{key_id}:month:{label}"

    @staticmethod
    def _sum_key(key_id: str) -> str:
        """Returns the key holding the minute window's running sum (SUM_REBUILD_MS)."""
        return f"tm:budget:{key_id}:tpm:sum"

    @staticmethod
    def _charge_key(key_id: str, request_id: str) -> str:
        """Returns the key holding what a request id was charged (its replays' guard)."""
        return f"tm:budget:{key_id}:req:{request_id}"

    @classmethod
    def _id_keys(cls, key_id: str, request_id: str) -> tuple[str, str, str, str]:
        """Returns a request id's charge, "a run finished" mark, "given back" mark and
        forgotten attempts keys."""
        charge = cls._charge_key(key_id, request_id)
        return charge, f"{charge}:finished", f"{charge}:released", f"{charge}:forgotten"

    @staticmethod
    def open_key(holder: str) -> str:
        """Returns the hash of `holder`'s open reservations: field `[key id, request
        id]`, value `[reserved_at, attempt]`, both JSON (ReservationReaper)."""
        return f"tm:budget:open:{holder}"

    @staticmethod
    def _open_field(holder: str, key_id: str, request_id: str) -> str:
        """Returns a reservation's field among `holder`'s open ones ("": no holder)."""
        return json.dumps([key_id, request_id]) if holder else ""

    async def reserve(
        self,
        key_id: str,
        limits: Limits,
        request_id: str,
        amount: int,
        now: float | None = None,
        attempt: str = "",
        listed: bool = False,
        replay_ttl_s: int | None = None,
        attempts_share: bool = False,
    ) -> Reserved:
        """Reserves `amount` tokens or raises ResourceExhausted naming the budget
        (RequestOverBudget, sent as FAILED_PRECONDITION, when `amount` exceeds a whole
        budget: no wait would admit it).

        `now` (time.time(); default: now) picks the month: reconcile and forget
        the reservation with the same. A call that fails after it was sent (a
        timeout, a cancel) may have reserved: `forget` it with the same `attempt`
        (an id of this call's own: its copy reaching Redis after the forget
        charges nothing, while another attempt at the request id reserves).

        `listed`: a reservation its request reconciles when it ends (not a charge
        of tokens already sent): listed among the holder's open reservations, so
        that it is taken back if this process dies first (ReservationReaper).

        `replay_ttl_s`: how long this id's charge is remembered, when longer than
        the budgets' own (a job item: until its job's deadline, at most
        MAX_REPLAY_TTL_S); reconciling or forgetting it keeps that.

        `attempts_share`: the id's attempts may run at once and share its charge (a
        job item tried again while an earlier attempt still runs): one that ends
        unfinished, or is forgotten, gives the charge back only when no other
        attempt still runs on it (`attempt` names each).

        Returns the warning naming each budget now at or over 80% and the time the
        id's charge was reserved, which picks the month its reconcile goes to.
        """
        check_within_whole_budget(key_id, limits, amount)
        now = time.time() if now is None else now
        _, until_next_month = _month(now)
        self.breaker.check()  # raises BreakerOpen, a connection error: budgets fail open
        charge, finished, given_back, forgotten = self._id_keys(key_id, request_id)
        try:
            ok, budget, retry_ms, *used = await self._reserve(
                keys=[
                    *self._keys(key_id, now),
                    charge,
                    given_back,
                    forgotten,
                    self._sum_key(key_id),
                    self.open_key(self.holder),
                    f"{charge}:holder",
                    HOLDERS_KEY,
                    finished,
                    f"{charge}:at",
                    f"{charge}:running",
                ],
                args=[
                    int(now * 1000),
                    request_id,
                    amount,
                    limits.tokens_per_minute,
                    limits.monthly_tokens,
                    int(until_next_month) + 86400,
                    self._replay_ttl(replay_ttl_s),
                    attempt,
                    self._open_field(self.holder, key_id, request_id) if listed else "",
                    json.dumps([now, attempt]),
                    self.holder,
                    repr(now),
                    "1" if attempts_share else "",
                ],
            )
        except (RedisError, TimeoutError, OSError) as exc:
            self.breaker.failed_with(exc)  # a timeout or lost connection, not a reply
            raise
        self.breaker.succeeded()
        if ok:
            charged_at = text(used[2]) if len(used) > 2 else ""
            reserved_at = float(charged_at) if charged_at else now
            return Reserved(_warning(limits, int(used[0]), int(used[1])), reserved_at)
        name = text(budget)
        if name == "tpm":
            retry_s = max(1.0, int(retry_ms) / 1000)
            limit = f"tokens_per_minute={limits.tokens_per_minute}"
        else:
            retry_s = until_next_month
            limit = f"{MONTHLY_LIMIT}={limits.monthly_tokens}"
        raise ResourceExhausted(
            f"token budget exceeded: this request needs {amount} tokens (prompt + max_tokens) "
            f"and {limit} for key {key_id} does not have them; retry in {retry_s:.0f}s",
            retry_after_s=retry_s,
            quota_violations=[QuotaViolation(f"key:{key_id}:{limit.split('=')[0]}", limit)],
            reason="TOKEN_BUDGET_EXCEEDED",
        )

    async def reconcile(
        self,
        key_id: str,
        request_id: str,
        reserved: int,
        actual: int,
        reserved_at: float | None = None,
        run: Run = "",
        attempt: str = "",
    ) -> None:
        """Replaces a reservation with the tokens really used (once per request id), in
        the month it was reserved in (`reserved_at`, time.time(); default: now): a
        request reserved on the 31st at midnight and reconciled after it charged the
        new month the difference, a negative counter that never expired.

        run: "" for a request that ran; "finished" for a job item's run that did;
        "unfinished" for a reservation given back (refused before it ran, or a job
        item's attempt cut, to be tried again: reconciled to 0), after which the
        id holds nothing and its next attempt reserves anew, checked against the
        limits. An unfinished run's reconcile that lands after a finished run's
        (its worker stalled, which is why its call timed out) is ignored: it set
        the item's charge back to 0. So is a second finished run's: the meter
        bills the id's first usage event, and the month keeps the first finished
        run's charge to match it. An unfinished run of a job item (`attempt`: the
        one it reserved with) that another attempt still runs on leaves the charge
        to that one.
        """
        at = time.time() if reserved_at is None else reserved_at
        await self._reconcile(
            keys=self._reconcile_keys(key_id, request_id, at, self.holder),
            args=[
                request_id,
                reserved,
                actual,
                self.replay_ttl_s,
                run,
                self._open_field(self.holder, key_id, request_id),
                attempt,
            ],
        )

    async def recover(self, holder: str, recorded: Sequence[Recorded]) -> int:
        """Reconciles the requests a dead `holder` recorded whose own reconciles never
        landed (see _RECOVER): `recorded` is what its spool holds of them. Returns how
        many it charged.

        A worker killed between appending a request's usage event and its reconcile
        reaching Redis (milliseconds, or as long as Redis was away) left the
        reservation open, and a reaper then gave all of it back: the month missed
        tokens the meter bills. Its successor on the same spool calls this at start.
        """
        open_fields = {text(field) for field in await self.redis.hkeys(self.open_key(holder))}
        charged = 0
        for start in range(0, len(recorded), _RECOVER_BATCH):
            batch = recorded[start : start + _RECOVER_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for one in batch:
                    charge, _, given_back, _ = self._id_keys(one.key_id, one.request_id)
                    pipe.get(f"{charge}:holder")
                    pipe.get(f"{charge}:at")
                    pipe.exists(given_back)
                replies = await pipe.execute()
            for index, one in enumerate(batch):
                id_holder, at, given_back = replies[3 * index : 3 * index + 3]
                listed = self._open_field(holder, one.key_id, one.request_id) in open_fields
                if text(id_holder or b"") == holder and (listed or given_back):
                    reserved_at = float(text(at)) if at else one.finished_at
                    charged += await self._recover_one(holder, one, reserved_at)
        return charged

    def _reconcile_keys(
        self, key_id: str, request_id: str, reserved_at: float, holder: str
    ) -> list[str]:
        """Returns _RECONCILE's KEYS (and, last, the id's holder: _RECOVER's)."""
        _, amounts, month = self._keys(key_id, reserved_at)
        charge, finished, given_back, _ = self._id_keys(key_id, request_id)
        return [
            amounts,
            month,
            charge,
            finished,
            given_back,
            self._sum_key(key_id),
            self.open_key(holder),
            f"{charge}:running",
            f"{charge}:holder",
        ]

    async def _recover_one(self, holder: str, one: Recorded, reserved_at: float) -> int:
        return int(
            await self._recover(
                keys=self._reconcile_keys(one.key_id, one.request_id, reserved_at, holder),
                args=[
                    one.request_id,
                    one.used,
                    one.used,
                    self.replay_ttl_s,
                    "",
                    self._open_field(holder, one.key_id, one.request_id),
                    "",
                    holder,
                ],
            )
        )

    async def forget(
        self, key_id: str, request_id: str, reserved_at: float, attempt: str = ""
    ) -> bool:
        """Takes back a reservation whose answer never came (see _FORGET); returns
        whether one had been made. `reserved_at` and `attempt`: those it was
        reserved with."""
        return await self._take_back(
            key_id, request_id, reserved_at, attempt, self.holder, only_listed=False
        )

    async def take_back_open(self, holder: str, field: str, value: str) -> bool:
        """Takes back one of a dead `holder`'s open reservations (its field and value in
        `open_key(holder)`), unless it was reconciled since; returns whether it
        refunded a charge."""
        key_id, request_id = json.loads(field)
        reserved_at, attempt = json.loads(value)
        return await self._take_back(
            key_id, request_id, float(reserved_at), attempt, holder, only_listed=True
        )

    async def _take_back(
        self,
        key_id: str,
        request_id: str,
        reserved_at: float,
        attempt: str,
        holder: str,
        only_listed: bool,
    ) -> bool:
        window, amounts, month = self._keys(key_id, reserved_at)
        charge, finished, given_back, forgotten = self._id_keys(key_id, request_id)
        field = self._open_field(holder, key_id, request_id)
        refunded = await self._forget(
            keys=[
                window,
                amounts,
                month,
                charge,
                given_back,
                forgotten,
                self._sum_key(key_id),
                self.open_key(holder),
                f"{charge}:holder",
                finished,
                f"{charge}:running",
            ],
            args=[
                request_id,
                self.replay_ttl_s,
                attempt,
                field,
                "1" if only_listed else "0",
                holder,
            ],
        )
        return bool(refunded)
