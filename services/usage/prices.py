"""The prices the meter charges usage at: each request at its model version's
price when the request finished, read from the router's catalogue in Redis.

One catalogue read per batch of stream entries (not per request), and always
after the batch's requests finished: a price change the catalogue already
holds is never missed, and its history says what applied before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.core.pricing import Price, price_at
from services.router.catalog import CATALOG_KEY, ModelEntry
from tokenmesh.inference.v1 import inference_pb2


@dataclass(frozen=True)
class Prices:
    """Prices are the catalogue models a batch of events needs, by name."""

    models: Mapping[str, ModelEntry]

    def at(self, event: inference_pb2.UsageEvent) -> Price | None:
        """Returns the price of the event's model version when it finished (None: none)."""
        model = self.models.get(event.model.name)
        version = model.version(event.model.version) if model is not None else None
        if version is None:
            return None
        return price_at(version.prices, event.finish_unix_ms)


class PriceBook:
    """PriceBook reads model-version prices from the catalogue."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def lookup(self, events: Sequence[inference_pb2.UsageEvent]) -> Prices:
        """Returns the catalogue entries of the events' models (one Redis round trip)."""
        names = sorted({event.model.name for event in events if event.model.name})
        if not names:
            return Prices({})
        raw: list[Any] = await self.redis.hmget(CATALOG_KEY, names)
        return Prices(
            {
                name: ModelEntry.from_json(name, doc)
                for name, doc in zip(names, raw, strict=True)
                if doc
            }
        )
