"""Envoy's RateLimitService: requests per minute per API key, exact, in Redis.

The edge sends one descriptor per request, (key_id, rpm, tier, tenant, model),
built from the identity headers it set itself (from JWT claims or ext_authz)
and the model the edge read from the body, so the key's limit travels with
the request and this service needs no key lookup. A request counts against
its key's window, its tenant's (when configured) and its model's (when
configured), all or nothing. A sliding
window log (one sorted set per key, trimmed atomically in Lua) admits exactly
`rpm` requests in any 60 seconds: no fixed-window burst, no early lock-out.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from services.core.errors import Unavailable
from services.core.interceptors import Context
from services.usage.script_client import ScriptClient

logger = logging.getLogger(__name__)
WINDOW_S = 60
WARN_AT = 0.8

# KEYS: one sliding window per limit; ARGV: now_ms, window_ms, hits, member, limit per key.
# All-or-nothing: the request is counted in every window or in none.
# Returns a flat list {allowed, used_1, oldest_1, used_2, oldest_2, ...}.
_SLIDING_WINDOWS = """
local now, window, hits = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local allowed = 1
local used = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  used[i] = redis.call('ZCARD', key)
  if used[i] + hits > tonumber(ARGV[4 + i]) then allowed = 0 end
end
local out = {allowed}
for i, key in ipairs(KEYS) do
  if allowed == 1 then
    for h = 1, hits do redis.call('ZADD', key, now, ARGV[4] .. ':' .. h) end
    used[i] = used[i] + hits
  end
  redis.call('PEXPIRE', key, window)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  table.insert(out, used[i])
  table.insert(out, oldest[2] or now)
end
return out
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


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """RateLimitServicer answers Envoy's ShouldRateLimit.

    Args:
        client: Redis.
        default_rpm: the limit for keys that set none and whose tier has no default.
        tier_rpm: per-tier defaults for keys that set no limit.
        tenant_rpm: a limit on all of a tenant's keys together (0 = none).
        tenant_overrides: per-tenant limits instead of `tenant_rpm`.
        model_rpm: per-model limits on all callers together.
        redis_url: the same Redis as `client`, for the lean hot-path client.
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
    ) -> None:
        self.redis = client
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
        self._windows: Callable[..., Awaitable[Any]] = (
            ScriptClient(redis_url, _SLIDING_WINDOWS)
            if redis_url.startswith("redis://")
            else client.register_script(_SLIDING_WINDOWS)
        )

    async def close(self) -> None:
        """Closes the hot-path connection."""
        if isinstance(self._windows, ScriptClient):
            await self._windows.close()

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

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        for descriptor in request.descriptors:
            entries = {e.key: e.value for e in descriptor.entries}
            if "key_id" in entries:
                await self._check(self.limits(entries), max(1, request.hits_addend), response)
        return response

    async def _check(
        self, limits: list[Limit], hits: int, response: rls_pb2.RateLimitResponse
    ) -> None:
        now_ms = int(time.time() * 1000)
        try:
            reply = await self._windows(
                keys=[limit.window_key for limit in limits],
                args=[
                    now_ms,
                    WINDOW_S * 1000,
                    hits,
                    next(self._hit_ids),
                    *(limit.limit for limit in limits),
                ],
            )
        except Exception as exc:  # Redis down: Envoy applies failure_mode_deny
            logger.warning("rate-limit store unavailable: %s", type(exc).__name__)
            raise Unavailable("rate-limit store unavailable", retry_after_s=1.0) from None
        allowed = bool(reply[0])
        for i, limit in enumerate(limits):
            used, oldest = int(reply[1 + 2 * i]), int(reply[2 + 2 * i])
            reset_s = max(1, (oldest + WINDOW_S * 1000 - now_ms + 999) // 1000)
            over = not allowed and used + hits > limit.limit
            response.statuses.append(_status(limit, used, reset_s, over))
            if over:
                response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
                response.response_headers_to_add.append(_header("retry-after", str(reset_s)))
                response.raw_body = (
                    f"rate limit exceeded: {limit.name}={limit.limit} for {limit.subject}; "
                    f"retry in {reset_s}s"
                ).encode()
            elif used >= WARN_AT * limit.limit:
                response.response_headers_to_add.append(
                    _header("x-tokenmesh-ratelimit-warning", f"{limit.name} {used}/{limit.limit}")
                )


def _status(
    limit: Limit, used: int, reset_s: int, over: bool
) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    return rls_pb2.RateLimitResponse.DescriptorStatus(
        code=rls_pb2.RateLimitResponse.OVER_LIMIT if over else rls_pb2.RateLimitResponse.OK,
        current_limit=rls_pb2.RateLimitResponse.RateLimit(
            name=limit.name,
            requests_per_unit=limit.limit,
            unit=rls_pb2.RateLimitResponse.RateLimit.MINUTE,
        ),
        limit_remaining=max(0, limit.limit - used),
        duration_until_reset=duration_pb2.Duration(seconds=reset_s),
    )


def _int(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0
