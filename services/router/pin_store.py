"""The last prefix pins, kept in Redis for every router replica to start from.

Each control-plane build pins a version's hot prompt heads starting from the
last pins (services.router.prefix_pins: a head stays where it was pinned while
that worker serves it). Kept in one replica's memory, two replicas each
started from their own: a replica that restarted, or that built from other
reports a moment earlier, pinned a head elsewhere, and the edges it feeds sent
it to another worker (both caches held it until it cooled). In Redis every
replica starts from the pins any of them stored last, so the same reports give
the same pins everywhere. One key, written whole and only when the pins
change; the last write wins, and the next build of every replica starts from
it.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from services.router.snapshot import Pins

PINS_KEY = "tokenmesh:router:prefix-pins"


class PinStore:
    """PinStore reads and writes the last prefix pins (PINS_KEY)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def load(self) -> Pins:
        """Returns the pins stored last (none before any were)."""
        raw = await self.redis.get(PINS_KEY)
        if raw is None:
            return {}
        return {
            (str(model), str(version)): {str(h): str(a) for h, a in pins.items()}
            for model, version, pins in json.loads(raw)
        }

    async def save(self, pins: Pins) -> None:
        """Stores `pins` as the last ones."""
        entries = [[*ref, dict(pins[ref])] for ref in sorted(pins)]
        await self.redis.set(PINS_KEY, json.dumps(entries, sort_keys=True))
