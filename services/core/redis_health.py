"""Redis connection shared by Redis-backed services, with health tracking.

A service whose state lives in Redis is only useful while Redis answers: the
monitor pings it and flips the service's health, so Envoy's health checks and
the edge's /healthz see an outage within one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.core.server import RunningServer

logger = logging.getLogger(__name__)


class RedisHealthMonitor:
    """RedisHealthMonitor pings Redis and mirrors the result into gRPC health.

    Args:
        client: the service's Redis client.
        names: the health entries that depend on Redis.
        interval_s: seconds between pings.
    """

    def __init__(
        self, client: aioredis.Redis, names: Sequence[str], interval_s: float = 1.0
    ) -> None:
        self.client = client
        self.names = list(names)
        self.interval_s = interval_s
        self.reachable = False
        self._task: asyncio.Task[None] | None = None

    async def ping(self) -> bool:
        """Returns whether Redis answered a PING within the interval."""
        try:
            return bool(await asyncio.wait_for(self.client.ping(), timeout=self.interval_s))
        except (RedisError, OSError, TimeoutError):
            return False

    async def start(self, running: RunningServer) -> None:
        """Waits for the first successful ping, then keeps watching in the background."""
        while not await self.ping():
            logger.warning("waiting for Redis")
            await asyncio.sleep(self.interval_s)
        self.reachable = True
        self._task = asyncio.create_task(self._watch(running))

    async def _watch(self, running: RunningServer) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            reachable = await self.ping()
            if reachable != self.reachable:
                logger.warning("Redis is %s", "reachable again" if reachable else "unreachable")
                self.reachable = reachable
                await running.set_serving(self.names, serving=reachable)

    async def stop(self) -> None:
        """Stops watching and closes the client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            await asyncio.wait_for(self.client.aclose(), timeout=5)
