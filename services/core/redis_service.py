"""Base for services whose state lives in Redis (auth, router, usage), and reply helpers."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from services.core.redis_health import RedisHealthMonitor
from services.core.server import RunningServer, Service
from services.core.settings import RedisSettings


def text(reply: bytes | str) -> str:
    """Returns a Redis reply as str (clients here do not decode responses)."""
    return reply.decode() if isinstance(reply, bytes) else reply


class RedisBackedService(Service):
    """RedisBackedService is SERVING only while its Redis answers."""

    def __init__(self, settings: RedisSettings) -> None:
        self.redis = aioredis.from_url(settings.redis_url, socket_timeout=2.0)
        self.monitor = RedisHealthMonitor(self.redis, self.service_names())

    def service_names(self) -> Sequence[str]:
        raise NotImplementedError

    async def start(self, running: RunningServer) -> None:
        await self.monitor.start(running)

    async def stop(self) -> None:
        await self.monitor.stop()
