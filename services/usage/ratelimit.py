"""Envoy's RateLimitService: requests per minute per API key, exact, in Redis.

The edge sends one descriptor per request, (key_id, rpm), built from the
identity headers it set itself (from JWT claims or ext_authz), so the limit
travels with the request and this service needs no key lookup. A sliding
window log (one sorted set per key, trimmed atomically in Lua) admits exactly
`rpm` requests in any 60 seconds: no fixed-window burst, no early lock-out.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from services.core.errors import Unavailable
from services.core.interceptors import Context

logger = logging.getLogger(__name__)
WINDOW_S = 60
WARN_AT = 0.8

# KEYS[1]: the key's window; ARGV: now_ms, window_ms, limit, hits, member
# Returns {allowed (0/1), used after this request, oldest entry ms}.
_SLIDING_WINDOW = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, hits = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
local allowed = 0
if used + hits <= limit then
  for i = 1, hits do redis.call('ZADD', KEYS[1], now, ARGV[5] .. ':' .. i) end
  used = used + hits
  allowed = 1
end
redis.call('PEXPIRE', KEYS[1], window)
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {allowed, used, oldest[2] or now}
"""


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value)


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """RateLimitServicer answers Envoy's ShouldRateLimit.

    Args:
        client: Redis.
        default_rpm: the limit for keys that set none (their tier's default).
    """

    def __init__(self, client: aioredis.Redis, default_rpm: int) -> None:
        self.redis = client
        self.default_rpm = default_rpm
        self._window = client.register_script(_SLIDING_WINDOW)

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        hits = max(1, request.hits_addend)
        for descriptor in request.descriptors:
            entries = {e.key: e.value for e in descriptor.entries}
            if "key_id" not in entries:
                continue
            limit = int(entries.get("rpm") or 0) or self.default_rpm
            status = await self._check(entries["key_id"], limit, hits, response)
            response.statuses.append(status)
            if status.code == rls_pb2.RateLimitResponse.OVER_LIMIT:
                response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
        return response

    async def _check(
        self, key_id: str, limit: int, hits: int, response: rls_pb2.RateLimitResponse
    ) -> rls_pb2.RateLimitResponse.DescriptorStatus:
        now_ms = int(time.time() * 1000)
        try:
            allowed, used, oldest = await self._window(
                keys=[f"tm:ratelimit:rpm:{key_id}"],
                args=[now_ms, WINDOW_S * 1000, limit, hits, uuid.uuid4().hex],
            )
        except Exception as exc:  # Redis down: Envoy applies failure_mode_deny
            logger.warning("rate-limit store unavailable: %s", type(exc).__name__)
            raise Unavailable("rate-limit store unavailable", retry_after_s=1.0) from None
        reset_s = max(1, (int(oldest) + WINDOW_S * 1000 - now_ms + 999) // 1000)
        status = rls_pb2.RateLimitResponse.DescriptorStatus(
            code=rls_pb2.RateLimitResponse.OK if allowed else rls_pb2.RateLimitResponse.OVER_LIMIT,
            current_limit=rls_pb2.RateLimitResponse.RateLimit(
                name="requests_per_minute",
                requests_per_unit=limit,
                unit=rls_pb2.RateLimitResponse.RateLimit.MINUTE,
            ),
            limit_remaining=max(0, limit - int(used)),
            duration_until_reset=duration_pb2.Duration(seconds=reset_s),
        )
        if not allowed:
            response.response_headers_to_add.append(_header("retry-after", str(reset_s)))
            response.raw_body = (
                f"rate limit exceeded: requests_per_minute={limit} for key {key_id}; "
                f"retry in {reset_s}s"
            ).encode()
        elif int(used) >= WARN_AT * limit:
            response.response_headers_to_add.append(
                _header("x-tokenmesh-ratelimit-warning", f"requests_per_minute {int(used)}/{limit}")
            )
        return status
