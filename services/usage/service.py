"""The usage service: metering consumer, reports and audit log."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import redis.asyncio as aioredis
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.core.redis_service import RedisBackedService
from services.core.server import RunningServer
from services.core.settings import RedisSettings, env, require
from services.core.tasks import SupervisedTask
from services.usage.limit_settings import RequestLimitSettings
from services.usage.meter import Meter, Retention
from services.usage.ratelimit import RateLimitServicer
from services.usage.reports import UsageReader
from services.usage.reports_v2 import DimensionReader
from services.usage.servicer import UsageServicer
from services.usage.servicer_v2 import UsageV2Servicer
from tokenmesh.usage.v1 import usage_service_pb2, usage_service_pb2_grpc
from tokenmesh.usage.v2 import usage_service_pb2 as usage_v2_service_pb2
from tokenmesh.usage.v2 import usage_service_pb2_grpc as usage_v2_service_pb2_grpc

SERVICE_NAME = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
V2_SERVICE_NAME = usage_v2_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
RATELIMIT_SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name


@dataclass(frozen=True)
class UsageSettings(RequestLimitSettings, RedisSettings):
    """UsageSettings configure the usage service."""

    usage_stream: str = env(
        "TOKENMESH_USAGE_STREAM", "tokenmesh:usage", "Redis Stream of usage events."
    )
    consumer_group: str = env(
        "TOKENMESH_USAGE_GROUP", "usage-meter", "Consumer group of usage replicas."
    )
    consumer: str = env(
        "TOKENMESH_USAGE_CONSUMER", socket.gethostname(), "This replica's consumer name."
    )
    claim_idle_s: float = env(
        "TOKENMESH_USAGE_CLAIM_IDLE_SECONDS", 30.0, "Pending events idle this long are taken over."
    )
    trim_interval_s: float = env(
        "TOKENMESH_USAGE_TRIM_SECONDS",
        60.0,
        "How often metered entries are deleted from the usage stream.",
    )
    retention_days: int = env(
        "TOKENMESH_USAGE_AUDIT_RETENTION_DAYS", 90, "Audit entries are kept this long."
    )
    audit_max_entries: int = env(
        "TOKENMESH_USAGE_AUDIT_MAX_ENTRIES",
        1_000_000,
        "The most audit entries kept per tenant (the newest; ~0.45 KB of Redis each).",
    )
    meter_linger_ms: int = env(
        "TOKENMESH_USAGE_METER_LINGER_MS",
        200,
        "How long the meter waits for more usage events to join the first ones, so that"
        " one Redis call applies them together (0: apply every read at once).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.claim_idle_s >= 1, "TOKENMESH_USAGE_CLAIM_IDLE_SECONDS", "must be >= 1")
        require(self.trim_interval_s >= 1, "TOKENMESH_USAGE_TRIM_SECONDS", "must be >= 1")
        require(self.retention_days >= 1, "TOKENMESH_USAGE_AUDIT_RETENTION_DAYS", "must be >= 1")
        require(self.audit_max_entries >= 1, "TOKENMESH_USAGE_AUDIT_MAX_ENTRIES", "must be >= 1")
        require(
            0 <= self.meter_linger_ms <= 5000, "TOKENMESH_USAGE_METER_LINGER_MS", "must be 0-5000"
        )


class UsageService(RedisBackedService):
    """UsageService meters the usage stream and serves tokenmesh.usage.v1."""

    name = "usage"

    def __init__(self, settings: UsageSettings) -> None:
        super().__init__(settings)
        self.settings = settings
        retention = Retention(
            audit=settings.retention_days * 86400, audit_entries=settings.audit_max_entries
        )
        self.meter = Meter(
            self.redis,
            settings.usage_stream,
            settings.consumer_group,
            settings.consumer,
            retention,
            settings.claim_idle_s,
            settings.trim_interval_s,
            settings.meter_linger_ms / 1000,
        )
        self._task: SupervisedTask | None = None
        # Request-rate windows live 60 s: a Redis without fsync-per-write keeps
        # the limiter's round trip short (the edge waits on it for every request).
        limits_url = settings.ratelimit_redis_url or settings.redis_url
        self._limits_redis = (
            aioredis.from_url(limits_url, socket_timeout=2.0)
            if settings.ratelimit_redis_url
            else self.redis
        )
        self.limiter = settings.limiter(
            RateLimitServicer, self._limits_redis, limits_url, self.tasks
        )

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME, V2_SERVICE_NAME, RATELIMIT_SERVICE]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(UsageReader(self.redis)), server
        )
        usage_v2_service_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageV2Servicer(DimensionReader(self.redis)), server
        )
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self.limiter, server)

    async def start(self, running: RunningServer) -> None:
        await super().start(running)
        await self.meter.ensure_group()
        self._task = self.tasks.spawn("usage-meter", self.meter.run_forever)

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.stop(timeout_s=5)
        await self.limiter.close()
        if self._limits_redis is not self.redis:
            await self._limits_redis.aclose()
        await super().stop()
