"""Envoy's RateLimitService: requests per minute per API key, exact, in Redis.

The edge sends one descriptor per request, (key_id, rpm, tier, tenant, model),
built from the identity headers it set itself (from JWT claims or ext_authz)
and the model the edge read from the body, so the key's limit travels with
the request and this service needs no key lookup. A request counts against
its key's window, its tenant's (when configured) and its model's (when
configured), all or nothing. A sliding window log (one sorted set per key,
trimmed atomically in Lua) admits exactly `rpm` requests in any 60 seconds:
no fixed-window burst, no early lock-out.
Requests of a key far below its limits are admitted from a lease of reserved
slots without a Redis round trip (leases.py); near a limit every decision
reads the windows.

The decisions are `RequestLimiter`'s; `RateLimitServicer` answers Envoy's
RateLimitService with them (non-inference routes), and inference workers ask
a `RequestLimiter` of their own in-process for inference RPCs
(services/inference/request_limits.py): the same windows, leases and limits,
without a Python hop at the edge.

Errors are told apart: an unavailable store (connection refused or lost, a
timeout, a Redis that is loading, read-only or out of memory) answers
UNAVAILABLE, which Envoy turns into "allow" unless `failure_mode_deny`
(counted in `tokenmesh_ratelimit_fail_open_total`, or under failure_mode_deny
in `tokenmesh_ratelimit_fail_closed_total`); anything else is a bug:
logged, counted in `tokenmesh_ratelimit_errors_total`, and the RPC fails
(INTERNAL, from the error boundary), never disguised as an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2
from prometheus_client import Counter
from redis.exceptions import ResponseError

from services.core import contract
from services.core.breaker import Breaker, BreakerOpen, store_answered
from services.core.errors import QuotaViolation, ResourceExhausted, Unavailable
from services.core.interceptors import Context
from services.core.redis_service import LUA_REDIS_NOW_MS
from services.core.store_errors import STORE_UNAVAILABLE as REDIS_UNAVAILABLE
from services.core.store_errors import is_store_refusal
from services.core.tasks import SupervisedTask, Supervisor
from services.usage.leases import (
    LEASE_HOLD_MS,
    LEASE_TTL_S,
    SETTLE_INTERVAL_S,
    SETTLE_SCRIPT,
    Lease,
    LeaseKey,
    LeaseTable,
    settle_call,
)
from services.usage.script_client import ScriptClient, ScriptRefused, ScriptUnavailable

logger = logging.getLogger(__name__)
DECISIONS = Counter(
    "tokenmesh_ratelimit_decisions_total",
    "Rate-limit decisions by where they were made: from a window lease or in Redis.",
    ["path"],
)
LEASED, READ = DECISIONS.labels("lease"), DECISIONS.labels("redis")
FAIL_OPEN = Counter(
    "tokenmesh_ratelimit_fail_open_total",
    "Requests let through unlimited because the rate-limit store was unreachable.",
)
FAIL_CLOSED = Counter(
    "tokenmesh_ratelimit_fail_closed_total",
    "Requests refused because the rate-limit store was unreachable (failure_mode_deny).",
)
OVER_LIMIT = Counter(
    "tokenmesh_ratelimit_over_limit_total",
    "Requests refused by a rate limit, by limit (requests_per_minute, tenant_..., ...).",
    ["limit"],
)
ERRORS = Counter(
    "tokenmesh_ratelimit_errors_total",
    "Rate-limit work that failed for another reason than an unavailable store (bugs).",
    ["stage"],
)
# The store is unavailable: Redis out of reach or refusing for now, as every
# service's error boundary tells it (services/core/store_errors.py), the lean
# client's equivalent, and socket errors. Everything else is a bug.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    *REDIS_UNAVAILABLE,
    ScriptUnavailable,
    OSError,
    TimeoutError,
)
WINDOW_S = 60
WARN_AT = 0.8
WARNING_HEADER = "x-tokenmesh-ratelimit-warning"
SHAPE_CACHE_SIZE = 16384
# How long a refund may take (then the request stays counted), and how long the
# refusal waits for it: Redis answers in well under a millisecond, so Envoy's
# retry elsewhere normally counts after the refund; during a stall the refusal
# goes out after REFUND_WAIT_S and the refund finishes behind it.
REFUND_TIMEOUT_S = 1.0
REFUND_WAIT_S = 0.05
# A decision cut before its reply (Envoy's 0.25 s timeout, the client's 1 s, a lost
# connection) may still run in Redis, and reserve a lease nobody holds: its slots
# are taken back after CUT_FORGET_DELAYS_S, again while a try met a stalled Redis
# (a try that waited over CUT_STALLED_S may have run before the cut script).
CUT_FORGET_DELAYS_S = (1.5, 3.0, 6.0, 12.0, 24.0)
CUT_STALLED_S = 0.1
# At most this many cut decisions are taken back at once (a stall at hundreds of
# decisions a second made one task each, and they filled the connection pool);
# the slots of the others leave the windows within a minute.
MAX_CUT_FORGETS = 32

# KEYS: one sliding window per limit; ARGV: (unused), window_ms, hits, member
# prefix, lease size, limit per key. All-or-nothing: the request is counted in
# every window or in none. When every window stays at most half full after it,
# `lease` more slots are reserved in each (see leases.py), else none. Windows
# are scored by Redis's clock (TIME), one for every replica: scored by each
# replica's own, a replica whose clock ran ahead dropped the others' recent
# hits as expired, and one behind added hits that the others dropped at once.
# Returns a flat list {allowed, leased, now_ms, used_1, oldest_1, ...}.
_SLIDING_WINDOWS = (
    LUA_REDIS_NOW_MS
    + """
local window, hits = tonumber(ARGV[2]), tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local allowed = 1
local used = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  used[i] = redis.call('ZCARD', key)
  local limit = tonumber(ARGV[5 + i])
  if used[i] + hits > limit then allowed = 0 end
  if (used[i] + hits + lease) * 2 > limit then lease = 0 end
end
if allowed == 0 then lease = 0 end
-- A lease's slots are scored LEASE_HOLD_MS ahead, past any admission the lease can
-- make: until its settle gives the used ones their admission times, none can leave
-- the window before the request it admitted (scored at the reservation, an unsettled
-- lease's slots left up to a second early: a failed settle, a killed replica).
local members = {}
for h = 1, hits + lease do
  table.insert(members, h > hits and now + LEASE_HOLD_MS or now)
  table.insert(members, ARGV[4] .. ':' .. h)
end
local out = {allowed, lease, now}
for i, key in ipairs(KEYS) do
  if allowed == 1 and #members > 0 then  -- none: a read of the windows (0 hits)
    redis.call('ZADD', key, unpack(members))
    used[i] = used[i] + hits
  end
  -- The key outlives its newest slot by a window: a lease's are scored ahead (expired
  -- at `window`, a window whose lease's settle failed went up to a second before the
  -- requests it admitted).
  redis.call('PEXPIRE', key, window + LEASE_HOLD_MS)
  -- When the window frees: its oldest entry's expiry, or for a request it refuses,
  -- the expiry that leaves room for it (used + hits - limit entries must go: more
  -- than one once a limit was lowered, or for hits > 1).
  local rank = 0
  if allowed == 0 and used[i] + hits > tonumber(ARGV[5 + i]) then
    rank = used[i] + hits - tonumber(ARGV[5 + i]) - 1
  end
  local oldest = redis.call('ZRANGE', key, rank, rank, 'WITHSCORES')
  table.insert(out, used[i])
  table.insert(out, oldest[2] or now)
end
return out
"""
).replace("LEASE_HOLD_MS", str(LEASE_HOLD_MS))


# KEYS: the windows a request was counted in. ARGV: its member. Takes the request back.
_FORGET_HIT = """
for _, key in ipairs(KEYS) do redis.call('ZREM', key, unpack(ARGV)) end
return 1
"""


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value)


@dataclass(frozen=True)
class Limit:
    """Limit is one sliding window a request counts against."""

    name: str  # e.g. "requests_per_minute" or "tenant_requests_per_minute"
    subject: str  # e.g. "key key_abc" or "tenant acme"
    window_key: str
    limit: int


@dataclass(frozen=True)
class WindowStatus:
    """WindowStatus is one window after a decision: its count and when it frees a slot."""

    limit: Limit
    used: int
    reset_s: int
    over: bool  # this window refused the request

    def refusal(self) -> str:
        """Returns the message a refused request gets (Envoy's 429 body, the worker's status)."""
        return (
            f"rate limit exceeded: {self.limit.name}={self.limit.limit} for {self.limit.subject}; "
            f"retry in {self.reset_s}s"
        )

    def error(self) -> ResourceExhausted:
        """Returns the error of a request this window refused: a worker's status, and the
        google.rpc details of the edge's 429 (`grpc-status-details-bin`)."""
        return ResourceExhausted(
            self.refusal(),
            retry_after_s=self.reset_s,
            quota_violations=[QuotaViolation(self.limit.subject, self.refusal())],
            reason=contract.RATE_LIMITED,
        )

    def warning(self) -> str:
        """Returns the x-tokenmesh-ratelimit-warning value at >= 80% of the limit, else ""."""
        if self.over or self.used < WARN_AT * self.limit.limit:
            return ""
        return f"{self.limit.name} {self.used}/{self.limit.limit}"


class Hit(NamedTuple):
    """Hit is where one admitted request was counted (`RequestLimiter.refund` takes it back)."""

    windows: tuple[str, ...]
    member: str  # its member in every window
    lease: Lease | None  # the lease it was admitted from (None: counted in Redis)


class RequestLimiter:
    """RequestLimiter decides requests against their sliding windows (see the module).

    Args:
        client: Redis.
        default_rpm: the limit for keys that set none and whose tier has no default.
        tier_rpm: per-tier defaults for keys that set no limit.
        tenant_rpm: a limit on all of a tenant's keys together (0 = none).
        tenant_overrides: per-tenant limits instead of `tenant_rpm`.
        model_rpm: per-model limits on all callers together.
        redis_url: the same Redis as `client`, for the lean hot-path client.
        lease_size: slots a decision far below its limits may reserve for the
            next ones (see leases.py); 0 = every decision goes to Redis.
        supervisor: runs the lease settler; a private one if omitted.
        failure_mode_deny: whether a decision the store cannot make refuses the
            request (the edge's and the workers' TOKENMESH_RATELIMIT_FAILURE_MODE_DENY);
            it picks the counter of such decisions, fail-open or fail-closed.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        default_rpm: int,
        tier_rpm: Mapping[str, int] | None = None,
        tenant_rpm: int = 0,
        tenant_overrides: Mapping[str, int] | None = None,
        model_rpm: Mapping[str, int] | None = None,
        redis_url: str = "",
        lease_size: int = 0,
        supervisor: Supervisor | None = None,
        failure_mode_deny: bool = False,
    ) -> None:
        self.redis = client
        # Counted where the store fails, read by whoever applies the mode (Envoy or
        # a worker's interceptor): one fail-open counter counted refusals too.
        self._unavailable = FAIL_CLOSED if failure_mode_deny else FAIL_OPEN
        self.default_rpm = default_rpm
        self.tier_rpm = dict(tier_rpm or {})
        self.tenant_rpm = tenant_rpm
        self.tenant_overrides = dict(tenant_overrides or {})
        self.model_rpm = dict(model_rpm or {})
        # Window members must be unique per hit across replicas: a random
        # prefix per process and a counter (cheaper than a uuid per request).
        prefix = os.urandom(8).hex()
        self._hit_ids = (f"{prefix}:{n}" for n in itertools.count())
        # The hot path: a lean pipelined client where the URL allows, else redis-py.
        self._windows: Callable[..., Awaitable[Any]]
        self._settle_script: Callable[..., Awaitable[Any]]
        if redis_url.startswith("redis://"):
            self._windows = ScriptClient(redis_url, _SLIDING_WINDOWS)
            self._settle_script = ScriptClient(redis_url, SETTLE_SCRIPT)
        else:
            self._windows = _refusals_unavailable(client, _SLIDING_WINDOWS)
            self._settle_script = _refusals_unavailable(client, SETTLE_SCRIPT)
        self._forget_hit = _refusals_unavailable(client, _FORGET_HIT)  # rare: refusals only
        self.leases = LeaseTable(lease_size)
        self._shapes: dict[tuple[tuple[str, str], ...], tuple[list[Limit], LeaseKey] | None] = {}
        self._tasks = supervisor if supervisor is not None else Supervisor("usage")
        self._settler: SupervisedTask | None = None
        # A hung store fails decisions at once after a few timeouts (services.core.breaker).
        self.breaker = Breaker("ratelimit")
        # Redis's clock minus this replica's, learned at every decision (see _SLIDING_WINDOWS).
        self._redis_clock_offset_ms = 0
        self._refunds: set[asyncio.Task[None]] = set()  # still running behind their refusals
        self._failure_mode_deny = failure_mode_deny
        self._cut_forgets: set[asyncio.Task[None]] = set()  # cut decisions' slots, later

    async def close(self) -> None:
        """Settles every lease (unused slots go back), finishes the refunds (each ends
        within REFUND_TIMEOUT_S) and closes the connections."""
        if self._settler is not None:
            await self._settler.stop(timeout_s=1)
        for forget in self._cut_forgets:  # their slots leave the windows within a minute
            forget.cancel()
        if self._refunds:
            await asyncio.wait(set(self._refunds))
        await self._settle(self.leases.due(everything=True))
        for script in (self._windows, self._settle_script):
            if isinstance(script, ScriptClient):
                await script.close()

    def limits(self, entries: Mapping[str, str]) -> list[Limit]:
        """Returns the windows a request with these descriptor entries counts against."""
        key_id = entries["key_id"]
        rpm = (
            _int(entries.get("rpm"))
            or self.tier_rpm.get(entries.get("tier", ""), 0)
            or self.default_rpm
        )
        limits = [Limit("requests_per_minute", f"key {key_id}", f"tm:ratelimit:rpm:{key_id}", rpm)]
        tenant = entries.get("tenant", "")
        tenant_rpm = self.tenant_overrides.get(tenant, self.tenant_rpm)
        if tenant and tenant_rpm:
            limits.append(
                Limit(
                    "tenant_requests_per_minute",
                    f"tenant {tenant}",
                    f"tm:ratelimit:tenant:{tenant}",
                    tenant_rpm,
                )
            )
        model = entries.get("model", "")
        if model in self.model_rpm:
            limits.append(
                Limit(
                    "model_requests_per_minute",
                    f"model {model}",
                    f"tm:ratelimit:model:{model}",
                    self.model_rpm[model],
                )
            )
        return limits

    async def decide(
        self, entries: tuple[tuple[str, str], ...], hits: int = 1
    ) -> list[WindowStatus] | None:
        """Counts a request with these descriptor entries in its windows, all or nothing.

        Returns each window's status (None: not a key's request, nothing to
        limit); raises Unavailable while the store is unreachable. `hits` 0
        only reads the windows.
        """
        counted = await self.count(entries, hits)
        return None if counted is None else counted[0]

    async def count(
        self, entries: tuple[tuple[str, str], ...], hits: int = 1
    ) -> tuple[list[WindowStatus], Hit | None] | None:
        """Decides as `decide`, and returns where a single admitted hit was counted
        (None: refused, or `hits` is not 1) for `refund`."""
        shape = self._shape(entries)
        if shape is None:
            return None
        return await self._check(*shape, hits)

    async def refund(self, hit: Hit) -> None:
        """Takes back a request counted in `hit`: its worker refused it before doing any
        work, in a way Envoy tries again on another worker, where the try counts."""
        if hit.lease is not None and hit.lease.give_back(hit.member):
            return  # a free slot of its lease again (the settler frees it, or it is reused)
        refund = asyncio.create_task(self._forget(hit))
        self._refunds.add(refund)
        refund.add_done_callback(self._refunds.discard)
        # Shielded: a refusal that stops waiting leaves the refund running.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(refund), REFUND_WAIT_S)

    async def _forget(self, hit: Hit) -> None:
        """Removes `hit` from its windows in Redis, or leaves it counted (the window
        may then refuse a request early, never admit one over).

        The call may be the breaker's probe, so its outcome is recorded like a
        decision's: a probe that recorded nothing kept the breaker open PROBE_S
        (10 s) more, every decision failing open (or refused, failure_mode_deny)
        while Redis answered.
        """
        try:
            self.breaker.check()
        except BreakerOpen as exc:  # not tried: nothing to record
            logger.warning("could not take back a refused request's count: %s", exc)
            return
        try:
            async with asyncio.timeout(REFUND_TIMEOUT_S):
                await self._forget_hit(keys=list(hit.windows), args=[hit.member])
        except STORE_UNAVAILABLE as exc:  # asyncio.timeout's TimeoutError too
            self.breaker.failed_with(exc)  # a timeout or lost connection, not a reply
            logger.warning("could not take back a refused request's count: %s", exc)
            return
        except Exception:
            self.breaker.succeeded()  # a bug or an error reply: the store is not hung
            raise
        self.breaker.succeeded()

    def _shape(self, entries: tuple[tuple[str, str], ...]) -> tuple[list[Limit], LeaseKey] | None:
        """Returns the limits of a descriptor and their lease key (None: not a key's).

        Cached: an edge sends the same few descriptors over and over, and the
        limits follow from the descriptor and this service's settings alone.
        """
        shape = self._shapes.get(entries)
        if shape is None and entries not in self._shapes:
            named = dict(entries)
            if "key_id" in named:
                limits = self.limits(named)
                shape = (limits, tuple((limit.window_key, limit.limit) for limit in limits))
            if len(self._shapes) >= SHAPE_CACHE_SIZE:
                self._shapes.clear()
            self._shapes[entries] = shape
        return shape

    def _now_ms(self) -> int:
        """Returns the time on Redis's clock, as this replica last learned it."""
        return int(time.time() * 1000) + self._redis_clock_offset_ms

    async def _check(
        self, limits: list[Limit], key: LeaseKey, hits: int
    ) -> tuple[list[WindowStatus], Hit | None]:
        now_ms = self._now_ms()
        lease = self.leases.admit(key, hits, now_ms)
        hit: Hit | None = None
        if lease is not None:
            LEASED.inc()
            allowed, counts, oldest = True, lease.counts, lease.oldest
            if hits == 1:
                hit = Hit(lease.windows, lease.used[-1][0], lease)
        else:
            READ.inc()
            allowed, counts, oldest, now_ms, member = await self._decide(key, limits, hits)
            if allowed and hits == 1:
                hit = Hit(tuple(window for window, _ in key), f"{member}:1", None)
        windows = []
        for limit, used, first in zip(limits, counts, oldest, strict=True):
            reset_s = max(1, (first + WINDOW_S * 1000 - now_ms + 999) // 1000)
            over = not allowed and used + hits > limit.limit
            if over:
                OVER_LIMIT.labels(limit.name).inc()
            windows.append(WindowStatus(limit, used, reset_s, over))
        return windows, hit

    async def _decide(
        self, key: LeaseKey, limits: list[Limit], hits: int
    ) -> tuple[bool, list[int], list[int], int, str]:
        """Asks Redis; returns (allowed, count per window, oldest score per window, the
        decision's time on Redis's clock, the prefix of its members: hit h is
        `<prefix>:<h>`)."""
        try:
            self.breaker.check()
        except BreakerOpen:
            self._unavailable.inc()  # the store failed its last decisions: not waited for
            raise Unavailable("rate-limit store unavailable", retry_after_s=1.0) from None
        # A read (0 hits: a retry's) asks for no lease.
        size = self.leases.request(key, [limit.limit for limit in limits]) if hits else 0
        member = next(self._hit_ids)
        windows = tuple(window for window, _ in key)
        lease: Lease | None = None
        sent_ms = int(time.time() * 1000)
        try:
            reply = await self._windows(
                keys=windows,
                args=[sent_ms, WINDOW_S * 1000, hits, member, size, *(n for _, n in key)],
            )
            self.breaker.succeeded()
            allowed, leased = bool(reply[0]), int(reply[1])
            redis_now_ms = int(reply[2])
            # Leases time their admissions on it (leases.py); the RTT's half is noise.
            self._redis_clock_offset_ms = redis_now_ms - sent_ms
            counts = [int(n) for n in reply[3::2]]
            oldest = [int(n) for n in reply[4::2]]
            if leased:
                lease = Lease(
                    windows=windows,
                    counts=counts,
                    oldest=oldest,
                    free=[f"{member}:{h}" for h in range(hits + leased, hits, -1)],
                    deadline=time.monotonic() + LEASE_TTL_S,
                    granted_ms=redis_now_ms,
                )
                self._start_settler()
        except asyncio.CancelledError:  # e.g. Envoy's 0.25 s: the script may still run
            self._forget_cut(windows, member, hits, size)
            raise
        except STORE_UNAVAILABLE as exc:  # Redis down: Envoy applies failure_mode_deny
            self.breaker.failed_with(exc)  # a timeout or lost connection, not a reply
            self._unavailable.inc()
            if not store_answered(exc):  # a refusal wrote nothing; a timeout may have
                self._forget_cut(windows, member, hits, size)
            logger.warning("rate-limit store unavailable: %s", type(exc).__name__)
            raise Unavailable("rate-limit store unavailable", retry_after_s=1.0) from None
        except Exception as exc:
            # A bug, not an outage: the boundary logs the traceback and answers INTERNAL.
            # The breaker records it as an answer: this call may be its probe, and a
            # probe that records nothing keeps it open for PROBE_S (10 s) more.
            self.breaker.succeeded()
            ERRORS.labels("decide").inc()
            logger.error(
                "rate-limit decision failed (not an outage): %s: %s", type(exc).__name__, exc
            )
            raise
        finally:  # also when cancelled: the next decision may ask for a lease again
            if size:  # (a decision that asked for none must not clear another's request)
                self.leases.granted(key, lease)
        return allowed, counts, oldest, redis_now_ms, member

    def _forget_cut(self, windows: tuple[str, ...], member: str, hits: int, size: int) -> None:
        """Takes back, later, what a decision cut before its reply may still count: the
        lease it asked for (no lease holds those slots: they stayed 60 s, and a brownout
        whose every grant was cut left a key about half its limit for a minute), and,
        under failure_mode_deny, its hits (the request was refused)."""
        first = 1 if self._failure_mode_deny else hits + 1
        members = [f"{member}:{h}" for h in range(first, hits + size + 1)]
        if members and len(self._cut_forgets) < MAX_CUT_FORGETS:
            forget = asyncio.create_task(self._forget_after_cut(windows, members))
            self._cut_forgets.add(forget)
            forget.add_done_callback(self._cut_forgets.discard)

    async def _forget_after_cut(self, windows: tuple[str, ...], members: list[str]) -> None:
        """Removes `members` once Redis has run the cut script: a try that answered
        at once met a Redis that was not stalled, so the cut script, in its input since
        the cut, ran before it; a try that failed or waited is made again."""
        for delay_s in CUT_FORGET_DELAYS_S:
            await asyncio.sleep(delay_s)
            if self.breaker.is_open:
                continue  # the store failed its last calls: not tried now
            started = time.monotonic()
            try:
                async with asyncio.timeout(REFUND_TIMEOUT_S):
                    await self._forget_hit(keys=list(windows), args=members)
            except STORE_UNAVAILABLE as exc:
                logger.debug("a cut rate-limit decision's slots not taken back yet: %s", exc)
                continue
            except Exception:  # a bug: they leave the windows within a minute
                ERRORS.labels("forget").inc()
                logger.exception("could not take back a cut rate-limit decision's slots")
                return
            if time.monotonic() - started < CUT_STALLED_S:
                return
        logger.warning("a cut rate-limit decision's %d slots stay counted", len(members))

    def _start_settler(self) -> None:
        if self._settler is None or self._settler.done():
            self._settler = self._tasks.spawn("ratelimit-lease-settler", self._settle_forever)

    async def _settle_forever(self) -> None:
        # Ends once nothing is leased (an idle limiter does not wake up); the
        # next grant starts it again.
        while self.leases.holds_any():
            await asyncio.sleep(SETTLE_INTERVAL_S)
            await self._settle(self.leases.due())

    async def _settle(self, leases: list[Lease]) -> None:
        """Gives used slots their admission time and frees the rest, in one call."""
        if not leases:
            return
        keys, args = settle_call(leases, WINDOW_S * 1000)
        try:
            await self._settle_script(keys=keys, args=args)
        except STORE_UNAVAILABLE as exc:  # they leave the windows within a minute and 2 s
            logger.warning("could not settle %d rate-limit leases: %s", len(leases), exc)
        except Exception:
            ERRORS.labels("settle").inc()
            raise  # a bug: the settler's supervisor logs it and restarts the settler


def _refusals_unavailable(client: aioredis.Redis, script: str) -> Callable[..., Awaitable[Any]]:
    """Registers `script` with redis-py; a call raises ScriptRefused where Redis refuses
    for now, as the lean client's does.

    Redis before 7 wraps a refusal met inside a script (READONLY during a failover,
    OOM at maxmemory) in a generic error reply: a ResponseError, which read as a
    bug (an ERROR line, tokenmesh_ratelimit_errors_total, INTERNAL) while Redis 7's
    ReadOnlyError read as "store unavailable".
    """
    registered = client.register_script(script)

    async def run(*, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await registered(keys=keys, args=args)
        except ResponseError as exc:
            if is_store_refusal(exc):
                raise ScriptRefused(str(exc)) from exc
            raise

    return run


RequestLimiterT = TypeVar("RequestLimiterT", bound=RequestLimiter)


class RateLimitServicer(RequestLimiter, rls_pb2_grpc.RateLimitServiceServicer):
    """RateLimitServicer answers Envoy's ShouldRateLimit with RequestLimiter's decisions."""

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        hits = max(1, request.hits_addend)
        windows: list[WindowStatus] = []
        for descriptor in request.descriptors:
            entries = tuple((e.key, e.value) for e in descriptor.entries)
            windows.extend(await self.decide(entries, hits) or ())
        for window in windows:
            _add_status(response, window)
        over = latest_freed(windows)
        if over is not None:
            # One Retry-After and one body, of the window that frees last: one per
            # window sent a client two contradicting Retry-After fields (10 and 50),
            # and the body named whichever window came last.
            response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
            response.response_headers_to_add.append(_header("retry-after", str(over.reset_s)))
            response.raw_body = over.refusal().encode()
            # A gRPC caller's details, those of the worker's own refusal (the edge's
            # response Lua drops the header from a REST answer, whose JSON has them).
            details = _header(contract.STATUS_DETAILS_HEADER, over.error().status_details_bin())
            response.response_headers_to_add.append(details)
            # A REST caller's QuotaFailure (gateway/refusal_details.py); then removed.
            subject = _header(contract.QUOTA_SUBJECT_HEADER, over.limit.subject)
            response.response_headers_to_add.append(subject)
        return response


def latest_freed(windows: Sequence[WindowStatus]) -> WindowStatus | None:
    """Returns the refusing window that frees last (None: none refuses): the request
    fits only once every one of them has room."""
    return max((w for w in windows if w.over), key=lambda w: w.reset_s, default=None)


def _add_status(response: rls_pb2.RateLimitResponse, window: WindowStatus) -> None:
    response.statuses.append(_status(window))
    if not window.over and (warning := window.warning()):
        response.response_headers_to_add.append(_header(WARNING_HEADER, warning))


def _status(window: WindowStatus) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    limit = window.limit
    return rls_pb2.RateLimitResponse.DescriptorStatus(
        code=rls_pb2.RateLimitResponse.OVER_LIMIT if window.over else rls_pb2.RateLimitResponse.OK,
        current_limit=rls_pb2.RateLimitResponse.RateLimit(
            name=limit.name,
            requests_per_unit=limit.limit,
            unit=rls_pb2.RateLimitResponse.RateLimit.MINUTE,
        ),
        limit_remaining=max(0, limit.limit - window.used),
        duration_until_reset=duration_pb2.Duration(seconds=window.reset_s),
    )


def _int(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0
