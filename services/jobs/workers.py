"""Where the inference workers are: the router's worker registry, read from Redis.

The jobs service reads the registry the router keeps (the same AOF Redis)
instead of asking the router, so jobs keep running while the control plane
restarts. It never writes it. Workers that are draining or whose lease ran
out are left out; among the workers serving an item's model (and version,
when the item pins one) it takes turns.
"""

from __future__ import annotations

import itertools
import time

import redis.asyncio as aioredis

from services.core.redis_service import text
from services.router.registry import WORKERS_KEY, WorkerEntry


class WorkerDirectory:
    """WorkerDirectory picks a worker for a model, from a snapshot refreshed every `refresh_s`.

    Args:
        client: the Redis holding the router's worker registry.
        refresh_s: how old a snapshot may get before it is read again.
    """

    def __init__(self, client: aioredis.Redis, refresh_s: float = 1.0) -> None:
        self.redis = client
        self.refresh_s = refresh_s
        self._workers: list[WorkerEntry] = []
        self._read_at = float("-inf")
        self._turn = itertools.count()

    async def workers(self) -> list[WorkerEntry]:
        """Returns the routable workers (read again when the snapshot is stale)."""
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            raw = await self.redis.hgetall(WORKERS_KEY)
            wall = time.time()
            entries = [WorkerEntry.from_json(text(k), v) for k, v in raw.items()]
            self._workers = sorted(
                (w for w in entries if w.routable(wall)), key=lambda w: w.worker_id
            )
            self._read_at = now
        return self._workers

    async def pick(self, model: tuple[str, str]) -> str | None:
        """Returns host:port of a worker serving `model` (name, version or ""), or None."""
        name, version = model
        workers = await self.workers()
        serving = [w for w in workers if any(m == name and v == version for m, v in w.models)]
        if not serving:  # no version named, or an alias the worker resolves itself
            serving = [w for w in workers if any(m == name for m, _ in w.models)]
        if not serving:
            return None
        return serving[next(self._turn) % len(serving)].address
