"""Token budgets: tokens per minute and per calendar month, per API key.

Admission reserves prompt + max_tokens atomically in Redis (shared by every
worker and edge replica); completion reconciles the reservation with the
tokens really used, releasing the rest. Minute budgets are an exact sliding
window of reservations, so a key with N tokens/min can use N tokens in any
minute — never fewer, never more.

Reservations are idempotent per (key, request id): a request id reserved
again within `REPLAY_TTL_S` while it holds a reservation, or after it was
reconciled as finished (a job item replayed after its jobs replica died
while it ran: the same `<job>:<n>`), is not charged again (workers pass the
request id only for the jobs service; any other caller's requests get ids of
their own: services.inference.admission.Request.usage_id), and reconciling
it makes the month's charge for that id its latest actual use, so a
replayed request costs the budget once, as the usage meter counts it once.

An id whose reservation was given back (refused before it ran, a job item's
attempt that did not finish, a reservation forgotten) holds nothing: its next
attempt is checked against the limits and reserves like a new request. Each
reservation call carries an attempt id of its own, so the late copy of a
forgotten call (the same attempt) still charges nothing.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.core.breaker import Breaker
from services.core.errors import QuotaViolation, ResourceExhausted
from services.core.redis_service import LUA_REDIS_NOW_MS, text

# How long a reservation is remembered by request id (replays are charged once).
REPLAY_TTL_S = 3600

# KEYS: window zset, window amounts hash, month counter, the request id's charge,
#       the id's "given back" mark, the id's forgotten attempts
# ARGV: (unused), request id, amount, tpm (0 = none), monthly (0 = none), month
#       ttl s, replay ttl s, this call's attempt id
# The minute window is scored by Redis's clock (TIME), the same for every worker
# (services.usage.ratelimit._SLIDING_WINDOWS says why).
# Returns {0 or 1, which budget failed ("" | "tpm" | "monthly"), retry_after_ms,
#          tokens used this minute and this month including this reservation}
_RESERVE = (
    LUA_REDIS_NOW_MS
    + """
local id, amount = ARGV[2], tonumber(ARGV[3])
local tpm, monthly = tonumber(ARGV[4]), tonumber(ARGV[5])
local used, month_used = 0, 0
-- The late copy of a call that was forgotten (_FORGET): it charges nothing.
if redis.call('SISMEMBER', KEYS[6], ARGV[8]) == 1 then
  return {1, '', 0, 0, 0}
end
-- This request id holds a reservation, or its run finished (a replay): admitted,
-- not charged again. One given back (charge 0, marked) holds nothing: this new
-- attempt is checked and reserves below, or a retry would pass any limit.
if redis.call('EXISTS', KEYS[4]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then
  return {1, '', 0, 0, 0}
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
end
-- In chunks: unpack() of more than ~8000 values overflows Lua's stack.
for i = 1, #expired, 1000 do
  redis.call('HDEL', KEYS[2], unpack(expired, i, math.min(i + 999, #expired)))
end
if tpm > 0 then
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
  if used + amount > tpm then
    local freed, retry = used, 60000
    local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    for i = 1, #members, 2 do
      freed = freed - tonumber(redis.call('HGET', KEYS[2], members[i]) or 0)
      if freed + amount <= tpm then retry = tonumber(members[i + 1]) + 60000 - now; break end
    end
    return {0, 'tpm', retry}
  end
end
if monthly > 0 then
  month_used = tonumber(redis.call('GET', KEYS[3]) or 0)
  if month_used + amount > monthly then return {0, 'monthly', -1} end
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, amount)
redis.call('PEXPIRE', KEYS[1], 61000)
redis.call('PEXPIRE', KEYS[2], 61000)
redis.call('INCRBY', KEYS[3], amount)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
-- A given-back id's charge was 0: it holds this reservation now.
redis.call('SET', KEYS[4], amount, 'EX', tonumber(ARGV[7]))
redis.call('DEL', KEYS[5])
return {1, '', 0, used + amount, month_used + amount}
"""
)

# KEYS: window amounts hash, month counter, the request id's charge, the id's
#       "a run finished" mark, the id's "given back" mark
# ARGV: request id, reserved, actual, replay ttl s, the run ("": any request that
#       ran; "finished": a job item's run that did; "unfinished": a run given
#       back, reconciled to 0; see TokenBudgets.reconcile)
# The month is charged what the id has not been charged yet (its charge, else
# `reserved`), so the id's total is its latest actual use however often it ran,
# except that an unfinished run reconciled after a finished one changes nothing.
# An unfinished run marks the id given back (its next attempt reserves anew); a
# run that ran unmarks it (its replays are charged nothing more).
_RECONCILE = """
if ARGV[5] == 'unfinished' and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local actual = tonumber(ARGV[3])
local charged = tonumber(redis.call('GET', KEYS[3]) or ARGV[2])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], actual)
end
redis.call('INCRBY', KEYS[2], actual - charged)
redis.call('SET', KEYS[3], actual, 'EX', tonumber(ARGV[4]))
if ARGV[5] == 'finished' then redis.call('SET', KEYS[4], '1', 'EX', tonumber(ARGV[4])) end
if ARGV[5] == 'unfinished' then
  redis.call('SET', KEYS[5], '1', 'EX', tonumber(ARGV[4]))
else
  redis.call('DEL', KEYS[5])
end
return 1
"""

# KEYS: window zset, window amounts hash, month counter, the request id's charge,
#       the id's "given back" mark, the id's forgotten attempts
# ARGV: request id, replay ttl s, the forgotten call's attempt id
# Takes back a reservation whose outcome its worker never learnt (the call timed
# out or was cancelled after it was sent): refunds what the id was charged, and
# leaves a charge of 0 marked given back (a new attempt reserves anew) and the
# call's attempt id, so that the reservation, should it reach Redis only now,
# charges nothing. Returns 1 if it refunded.
_FORGET = """
local charged = redis.call('GET', KEYS[4])
if charged then
  redis.call('INCRBY', KEYS[3], -tonumber(charged))
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('SET', KEYS[4], 0, 'EX', tonumber(ARGV[2]))
redis.call('SET', KEYS[5], '1', 'EX', tonumber(ARGV[2]))
redis.call('SADD', KEYS[6], ARGV[3])
redis.call('EXPIRE', KEYS[6], tonumber(ARGV[2]))
if charged then return 1 end
return 0
"""

# Which run a reconcile is for: "" any request that ran, "finished" a job item's
# run that finished, "unfinished" a run given back (refused before it ran, or a job
# item's attempt to be tried again): see TokenBudgets.reconcile.
Run = Literal["", "finished", "unfinished"]


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
    """

    def __init__(self, client: aioredis.Redis, replay_ttl_s: int = REPLAY_TTL_S) -> None:
        self.redis = client
        self.replay_ttl_s = replay_ttl_s
        self._reserve = client.register_script(_RESERVE)
        # A hung Redis fails reservations at once after a few timeouts
        # (services.core.breaker): requests are admitted unmetered without waiting.
        self.breaker = Breaker("budgets")
        self._reconcile = client.register_script(_RECONCILE)
        self._forget = client.register_script(_FORGET)

    def _keys(self, key_id: str, now: float) -> tuple[str, str, str]:
        label, _ = _month(now)
        base = f"tm:budget:{key_id}"
        return f"{base}:tpm", f"{base}:tpm:amounts", f"{base}:month:{label}"

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

    async def reserve(
        self,
        key_id: str,
        limits: Limits,
        request_id: str,
        amount: int,
        now: float | None = None,
        attempt: str = "",
    ) -> str:
        """Reserves `amount` tokens or raises ResourceExhausted naming the budget.

        `now` (time.time(); default: now) picks the month: reconcile and forget
        the reservation with the same. A call that fails after it was sent (a
        timeout, a cancel) may have reserved: `forget` it with the same `attempt`
        (an id of this call's own: its copy reaching Redis after the forget
        charges nothing, while another attempt at the request id reserves).

        Returns a warning naming each budget now at or over 80% ("" if none).
        """
        now = time.time() if now is None else now
        _, until_next_month = _month(now)
        self.breaker.check()  # raises BreakerOpen, a connection error: budgets fail open
        charge, _, given_back, forgotten = self._id_keys(key_id, request_id)
        try:
            ok, budget, retry_ms, *used = await self._reserve(
                keys=[*self._keys(key_id, now), charge, given_back, forgotten],
                args=[
                    int(now * 1000),
                    request_id,
                    amount,
                    limits.tokens_per_minute,
                    limits.monthly_tokens,
                    int(until_next_month) + 86400,
                    self.replay_ttl_s,
                    attempt,
                ],
            )
        except (RedisError, TimeoutError, OSError) as exc:
            self.breaker.failed_with(exc)  # a timeout or lost connection, not a reply
            raise
        self.breaker.succeeded()
        if ok:
            return _warning(limits, int(used[0]), int(used[1]))
        name = text(budget)
        if name == "tpm":
            retry_s = max(1.0, int(retry_ms) / 1000)
            limit = f"tokens_per_minute={limits.tokens_per_minute}"
        else:
            retry_s = until_next_month
            limit = f"monthly_tokens={limits.monthly_tokens}"
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
        the item's charge back to 0.
        """
        _, amounts, month = self._keys(key_id, time.time() if reserved_at is None else reserved_at)
        charge, finished, given_back, _ = self._id_keys(key_id, request_id)
        await self._reconcile(
            keys=[amounts, month, charge, finished, given_back],
            args=[request_id, reserved, actual, self.replay_ttl_s, run],
        )

    async def forget(
        self, key_id: str, request_id: str, reserved_at: float, attempt: str = ""
    ) -> bool:
        """Takes back a reservation whose answer never came (see _FORGET); returns
        whether one had been made. `reserved_at` and `attempt`: those it was
        reserved with."""
        window, amounts, month = self._keys(key_id, reserved_at)
        charge, _, given_back, forgotten = self._id_keys(key_id, request_id)
        refunded = await self._forget(
            keys=[window, amounts, month, charge, given_back, forgotten],
            args=[request_id, self.replay_ttl_s, attempt],
        )
        return bool(refunded)
