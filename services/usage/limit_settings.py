"""Settings of the request-rate limits, shared by the usage service and the workers.

The usage service's RateLimitService decides the edge's non-inference routes;
each inference worker decides its own RPCs in-process
(services/inference/request_limits.py). Both count in the same windows with
the same limits, so both read these variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.core.settings import env, require
from services.core.tasks import Supervisor
from services.usage.ratelimit import RequestLimiterT


@dataclass(frozen=True)
class RequestLimitSettings:
    """RequestLimitSettings are the rate limiter's settings (a mixin of a service's settings)."""

    default_rpm: int = env(
        "TOKENMESH_RATELIMIT_DEFAULT_RPM", 600, "Requests per minute for keys that set no limit."
    )
    tier_rpm: tuple[str, ...] = env(
        "TOKENMESH_RATELIMIT_TIER_RPM",
        (),
        "Per-tier defaults for keys without a limit, e.g. standard=600,premium=6000.",
    )
    tenant_rpm: int = env(
        "TOKENMESH_RATELIMIT_TENANT_RPM",
        0,
        "Requests per minute for all of a tenant's keys; 0 = none.",
    )
    tenant_overrides: tuple[str, ...] = env(
        "TOKENMESH_RATELIMIT_TENANT_OVERRIDES",
        (),
        "Per-tenant request limits over TOKENMESH_RATELIMIT_TENANT_RPM, e.g. acme=6000.",
    )
    ratelimit_redis_url: str = env(
        "TOKENMESH_RATELIMIT_REDIS_URL",
        "",
        "Redis for request-rate windows (60 s of state, no persistence needed); empty = REDIS_URL.",
    )
    model_rpm: tuple[str, ...] = env(
        "TOKENMESH_RATELIMIT_MODEL_RPM",
        (),
        "Requests per minute per model across all callers, e.g. demo-lm=600.",
    )
    lease_size: int = env(
        "TOKENMESH_RATELIMIT_LEASE_SIZE",
        32,
        "Slots a decision far below its limits reserves for the next ones (0 = none).",
    )
    ratelimit_failure_mode_deny: bool = env(
        "TOKENMESH_RATELIMIT_FAILURE_MODE_DENY",
        False,
        "Refuse requests while the rate-limit store is unreachable (default: let them through).",
    )

    def tier_defaults(self) -> dict[str, int]:
        """Returns the per-tier default limits."""
        return _pairs(self.tier_rpm)

    def tenant_limits(self) -> dict[str, int]:
        """Returns per-tenant limits that override the tenant-wide default."""
        return _pairs(self.tenant_overrides)

    def model_limits(self) -> dict[str, int]:
        """Returns the per-model limits."""
        return _pairs(self.model_rpm)

    def __post_init__(self) -> None:
        base: Any = super()
        if hasattr(base, "__post_init__"):  # the service's own settings come next
            base.__post_init__()
        require(self.default_rpm >= 1, "TOKENMESH_RATELIMIT_DEFAULT_RPM", "must be >= 1")
        for variable, entries in (
            ("TOKENMESH_RATELIMIT_TIER_RPM", self.tier_rpm),
            ("TOKENMESH_RATELIMIT_TENANT_OVERRIDES", self.tenant_overrides),
            ("TOKENMESH_RATELIMIT_MODEL_RPM", self.model_rpm),
        ):
            require(
                all(
                    n and r.isascii() and r.isdigit()
                    for n, _, r in (e.partition("=") for e in entries)
                ),
                variable,
                "must be NAME=RPM[,NAME=RPM...]",
            )
        require(0 <= self.lease_size <= 1024, "TOKENMESH_RATELIMIT_LEASE_SIZE", "must be 0..1024")
        require(self.tenant_rpm >= 0, "TOKENMESH_RATELIMIT_TENANT_RPM", "must be >= 0")
        require(
            not self.ratelimit_redis_url
            or self.ratelimit_redis_url.startswith(("redis://", "rediss://", "unix://")),
            "TOKENMESH_RATELIMIT_REDIS_URL",
            "must be empty or start with redis://, rediss:// or unix://",
        )

    def limiter(
        self,
        cls: type[RequestLimiterT],
        client: aioredis.Redis,
        redis_url: str,
        supervisor: Supervisor,
    ) -> RequestLimiterT:
        """Builds a limiter (`cls`: RequestLimiter or RateLimitServicer) on `client`.

        redis_url: the URL of `client`, for the lean hot-path client.
        """
        return cls(
            client,
            self.default_rpm,
            self.tier_defaults(),
            self.tenant_rpm,
            self.tenant_limits(),
            self.model_limits(),
            redis_url=redis_url,
            lease_size=self.lease_size,
            supervisor=supervisor,
            failure_mode_deny=self.ratelimit_failure_mode_deny,
        )


def _pairs(entries: tuple[str, ...]) -> dict[str, int]:
    return {name: int(value) for name, _, value in (e.partition("=") for e in entries)}
