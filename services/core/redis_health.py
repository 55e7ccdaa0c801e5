"""Redis connection shared by Redis-backed services, with health tracking.

A service whose state lives in Redis is only useful while Redis answers: the
monitor pings it and reports the condition "redis" to the service's health
gate, so Envoy's health checks and the edge's /healthz see an outage within
one interval (the gate also hears from the service's supervised tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.core.tasks import HealthGate, SupervisedTask, Supervisor

logger = logging.getLogger(__name__)


class RedisHealthMonitor:
    """RedisHealthMonitor pings Redis and reports the result to the service's health gate.

    Args:
        client: the service's Redis client.
        gate: the service's health gate (condition "redis").
        interval_s: seconds between pings.
    """

    def __init__(self, client: aioredis.Redis, gate: HealthGate, interval_s: float = 1.0) -> None:
        self.client = client
        self.gate = gate
        self.interval_s = interval_s
        self.reachable = False
        self._task: SupervisedTask | None = None

    async def ping(self) -> bool:
        """Returns whether Redis answered a PING within the interval."""
        try:
            return bool(await asyncio.wait_for(self.client.ping(), timeout=self.interval_s))
        except (RedisError, OSError, TimeoutError):
            return False

    async def start(self, supervisor: Supervisor) -> None:
        """Waits for the first successful ping, then keeps watching under `supervisor`."""
        while not await self.ping():
            logger.warning("waiting for Redis")
            await asyncio.sleep(self.interval_s)
        self.reachable = True
        self._task = supervisor.spawn("redis-health", self._watch)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            reachable = await self.ping()
            if reachable != self.reachable:
                logger.warning("Redis is %s", "reachable again" if reachable else "unreachable")
                self.reachable = reachable
            # Every time, not only on change: a restarted watch re-asserts what it sees.
            await self.gate.report("redis", reachable)

    async def stop(self) -> None:
        """Stops watching and closes the client."""
        if self._task is not None:
            await self._task.stop(timeout_s=5)
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            await asyncio.wait_for(self.client.aclose(), timeout=5)
