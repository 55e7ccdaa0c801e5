"""Where an item runs: the router's worker registry and model catalogue, read from Redis.

The jobs service reads what the router keeps (the same AOF Redis) instead of
asking the router, so jobs keep running while the control plane restarts. It
never writes it. Workers that are draining or whose lease ran out are left
out; among the workers serving an item's model version it takes turns.

Which version: an item that pins one (or names an alias) runs there. One
that does not follows the catalogue's traffic split, as the edge's requests
do (weights, pins, sunsets: `ModelEntry.effective_weights`), drawn from the
item's request id so that a retried item draws the same version. The draw is
among the split's versions that some worker serves now. (Items used to go to
any worker serving the model, which ran its newest version: a canary at 10%,
or a version the split had rolled back, took a worker's whole share.)

Sunsets: an item naming a version past its sunset (or an alias of one), or no
version of a model whose versions are all past theirs, is refused as the edge
refuses such a request (`Sunset`, with the edge's text: the router's
`_sunset_routes`). Jobs and respond-async Completes never pass the edge's
model routes, and items used to run on a worker still loading the version,
or, naming none, to wait out the job's window for a version that never came.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.core.redis_service import text
from services.router.catalog import (
    CATALOG_KEY,
    ModelEntry,
    read_catalog,
    retired_model_text,
    version_sunset_text,
)
from services.router.registry import WORKERS_KEY, WorkerEntry

# The label of the newest version serving, unless the catalogue has an alias or a
# version of that name (as in the router's `model_routes`).
LATEST = "latest"


class Sunset(Exception):
    """Sunset: the item's model version is past its sunset; the message is the edge's
    NOT_FOUND text for the same request."""


@dataclass(frozen=True)
class Placement:
    """Placement is where an item runs: a worker, the version it must ask for ("" lets
    the worker choose: a model the catalogue does not know), and the worker pool its
    registration named (its certificate must say so: `ItemExecutor`)."""

    address: str
    version: str
    pool: str = ""

    @classmethod
    def on(cls, worker: WorkerEntry, version: str) -> Placement:
        """Returns the placement of an item on `worker`."""
        return cls(worker.address, version, worker.pool)


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
        self._catalog: dict[str, ModelEntry] = {}
        self._read_at = float("-inf")
        self._turn = itertools.count()

    async def workers(self) -> list[WorkerEntry]:
        """Returns the routable workers (read again when the snapshot is stale)."""
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            raw = await self.redis.hgetall(WORKERS_KEY)
            catalog = await read_catalog(self.redis)
            wall = time.time()
            entries = [WorkerEntry.from_json(text(k), v) for k, v in raw.items()]
            self._workers = sorted(
                (w for w in entries if w.routable(wall)), key=lambda w: w.worker_id
            )
            self._catalog = catalog
            self._read_at = now
        return self._workers

    async def pick(self, model: tuple[str, str], draw_key: str) -> Placement | None:
        """Returns where an item of `model` (name, version or alias or "") runs, or None
        when no worker serves it now. `draw_key` (the item's request id) chooses the
        version of an item that names none, by the catalogue's split.

        Raises:
            Sunset: it names a sunset version or alias, or no version of a model
                whose versions were all sunset (it would never be placed).
        """
        name, label = model
        workers = await self.workers()
        entry = self._catalog.get(name)
        now = time.time()
        retired = sunset_message(entry, label, now)
        if retired is not None:
            raise Sunset(retired)
        if not label and entry is not None:
            return self._by_split(name, entry, workers, draw_key, now)
        version = resolve(entry, label, now) if entry is not None else label
        serving = [w for w in workers if w.serves(name, version, entry)]
        known = entry is not None and entry.version(version) is not None
        if not serving and not known:
            # A version (or model) the catalogue does not know: any worker of the model
            # answers for it. A known one whose workers are away waits for them, as the
            # edge's route to its cluster does: sent to another version's worker, the
            # item failed NOT_FOUND for good.
            serving = [
                w
                for w in workers
                if any(m == name for m, _ in w.models) and (entry is None or entry.admits(w.pool))
            ]
            version = label
        if not serving:
            return None
        return Placement.on(serving[next(self._turn) % len(serving)], version)

    def _by_split(
        self,
        name: str,
        entry: ModelEntry,
        workers: list[WorkerEntry],
        draw_key: str,
        now: float,
    ) -> Placement | None:
        weights = entry.effective_weights(now)
        serving = {
            version: [w for w in workers if w.serves(name, version, entry)] for version in weights
        }
        available = {version: weights[version] for version, found in serving.items() if found}
        if not available:
            return None
        version = weighted_draw(available, draw_key)
        chosen = serving[version]
        return Placement.on(chosen[next(self._turn) % len(chosen)], version)


def resolve(entry: ModelEntry, label: str, now: float) -> str:
    """Returns the version `label` (a version, an alias or "latest") names, as the edge's
    routes do: a version of that name first, then an alias, then "latest" as the newest
    version serving (none left: the newest, which is sunset). Anything else is itself."""
    if entry.version(label) is not None:
        return label
    if label in entry.aliases:
        return entry.aliases[label]
    latest = entry.latest_version(now) if label == LATEST else None
    return label if latest is None else latest


def sunset_message(entry: ModelEntry | None, label: str, now: float) -> str | None:
    """Returns the edge's NOT_FOUND text for a request naming `label` ("" for none) of
    `entry` when it is refused for a sunset, else None (it may run).

    The same words as the router's `_sunset_routes` and `_retired_model_routes`:
    a client reads one answer whichever way its request went.
    """
    if entry is None or not entry.versions:
        return None
    if not label:
        if entry.effective_weights(now):
            return None
        return retired_model_text(entry.name, max(v.sunset_at or now for v in entry.versions))
    found = entry.version(resolve(entry, label, now))
    if found is None or not found.sunset(now):
        return None
    return version_sunset_text(entry.name, label, found.sunset_at or now)


async def sunset_of(client: aioredis.Redis, model: tuple[str, str]) -> str | None:
    """Returns `sunset_message` for `model` (name, version or alias or ""), read from the
    catalogue in `client` now (one model's entry: for a single request, not a runner)."""
    name, label = model
    raw = await client.hget(CATALOG_KEY, name) if name else None
    entry = ModelEntry.from_json(name, raw) if raw is not None else None
    return sunset_message(entry, label, time.time())


async def unknown_model(client: aioredis.Redis, name: str) -> bool:
    """Whether nothing knows model `name`: the catalogue (which every model a worker
    registered is added to) has no such model and no routable worker serves it.

    An item of it is never placed (`pick` returns None until the job's deadline), so
    a job or batch naming it is refused when it is created, and a Complete handed
    over for it NOT_FOUND. A model whose workers are restarting is still in the
    catalogue, and waits for them.
    """
    return bool(await unknown_models(client, [name]))


async def unknown_models(client: aioredis.Redis, names: Iterable[str]) -> list[str]:
    """Returns those of `names` that nothing knows (`unknown_model`), in their order:
    one catalogue read for all of them, and one registry read if any is not in it (a
    job naming thousands of made-up models read and parsed the registry for each)."""
    wanted = [name for name in dict.fromkeys(names) if name]
    if not wanted:
        return []
    listed = await client.hmget(CATALOG_KEY, wanted)
    missing = [name for name, raw in zip(wanted, listed, strict=True) if raw is None]
    if not missing:
        return []
    now = time.time()
    served = {
        model
        for key, raw in (await client.hgetall(WORKERS_KEY)).items()
        if (worker := WorkerEntry.from_json(text(key), raw)).routable(now)
        for model, _ in worker.models
    }
    return [name for name in missing if name not in served]


def weighted_draw(weights: Mapping[str, int], key: str) -> str:
    """Returns one of `weights`' versions, each with its weight's share of keys; the same
    key draws the same version while the weights stay the same."""
    total = sum(weights.values())
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % total
    for version in sorted(weights):
        point -= weights[version]
        if point < 0:
            return version
    raise AssertionError("unreachable: the points sum to the total")
