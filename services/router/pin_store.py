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

The key is read on every build, so a value that does not parse (written by
hand, by another version, or cut short) must not stop the builds and with them
every edge's updates: it reads as no pins, logged, and the build's own pins
replace it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio as aioredis

from services.router.snapshot import Pins

PINS_KEY = "tokenmesh:router:prefix-pins"

logger = logging.getLogger(__name__)


class PinStore:
    """PinStore reads and writes the last prefix pins (PINS_KEY)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def load(self) -> Pins:
        """Returns the pins stored last (none before any were, or if they do not parse)."""
        raw = await self.redis.get(PINS_KEY)
        if raw is None:
            return {}
        try:
            return _parse(json.loads(raw))
        # JSONDecodeError is a ValueError; a deeply nested value raises RecursionError.
        except (ValueError, TypeError, RecursionError) as exc:
            logger.warning("ignoring unreadable prefix pins in %s: %s", PINS_KEY, exc)
            return {}

    async def save(self, pins: Pins) -> None:
        """Stores `pins` as the last ones."""
        entries = [[*ref, dict(pins[ref])] for ref in sorted(pins)]
        await self.redis.set(PINS_KEY, json.dumps(entries, sort_keys=True))


def _parse(entries: Any) -> Pins:
    """The pins in `entries` (a list of entries: model, version, {head: address}), checked
    strictly."""
    if not isinstance(entries, list):
        raise TypeError(f"expected a list, got {type(entries).__name__}")
    pins: dict[tuple[str, str], dict[str, str]] = {}
    for entry in entries:
        match entry:
            case [str(model), str(version), dict(heads)] if all(
                isinstance(h, str) and isinstance(a, str) for h, a in heads.items()
            ):
                pins[(model, version)] = dict(heads)
            case _:
                raise TypeError(f"not a [model, version, {{head: address}}] entry: {entry!r:.80}")
    return pins
