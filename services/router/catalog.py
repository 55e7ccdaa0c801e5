"""The model catalogue: models, versions, weights, pins, aliases, deprecation, fallbacks.

One Redis hash holds one JSON document per model. Every change is a
read-validate-write under WATCH, so concurrent admins (or router replicas)
never lose each other's updates, and every router replica builds the same
Envoy configuration from it.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from services.core.pricing import Price, PriceChange, with_change
from services.core.redis_service import known_fields, text

logger = logging.getLogger(__name__)

# The most versions the catalogue grows to from workers' registrations (each adds
# the versions it serves that the catalogue lacks). Every version is a cluster with
# health checks and routes on every edge, rebuilt each poll: one worker certificate
# added 256 versions a call, for good, until the route configuration outgrew the
# ADS stream's 16 MiB (a new edge got no routes) and each poll's rebuild took
# seconds on the router's event loop (~0.27 s at 2,000 versions).
MAX_REGISTERED_VERSIONS = 1000

CATALOG_KEY = "tokenmesh:router:catalog"
# Which worker pools serve each placed model (model -> its pools, comma-separated),
# kept apart from the catalogue's documents: a router of an earlier release rewrites
# a model's document with only the fields it knows (any change: a heartbeat naming a
# new version, a split), and a placement inside it was erased for good, its model
# open to every worker again. Read and changed with the documents, in one transaction.
PLACEMENTS_KEY = "tokenmesh:router:placements"
# How often one change is tried while other writers keep changing what it watches
# (the whole catalogue, and a guard's hash): then it gives up, retryable, instead
# of spinning; each retry waits a little longer, up to CHANGE_BACKOFF_MAX_S.
CHANGE_ATTEMPTS = 32
CHANGE_BACKOFF_MAX_S = 0.05
#: The latest time the catalogue keeps (9999-12-31T23:59:59Z, unix seconds): the last
#: second both an HTTP date (the Sunset header) and a protobuf Timestamp can carry.
MAX_TIME_S = 253_402_300_799
MAX_TIME_TEXT = "9999-12-31T23:59:59Z"


@dataclass(frozen=True)
class VersionEntry:
    """VersionEntry is one version of a catalogue model."""

    version: str
    weight: int = 0
    deprecated_at: float | None = None  # unix seconds
    sunset_at: float | None = None  # unix seconds
    prices: tuple[PriceChange, ...] = ()  # oldest first; see services.core.pricing

    @property
    def price(self) -> Price | None:
        """Returns the version's current price (None when it has none)."""
        return self.prices[-1].price if self.prices else None

    def to_json(self) -> dict[str, Any]:
        """Serialises the version for the catalogue document."""
        data: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "prices"}
        if self.prices:
            data["prices"] = [change.to_json() for change in self.prices]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VersionEntry:
        """Parses a version stored by `to_json`."""
        prices = tuple(PriceChange.from_json(c) for c in data.get("prices", ()))
        fields = {k: v for k, v in known_fields(cls, data).items() if k != "prices"}
        for name in ("deprecated_at", "sunset_at"):
            if fields.get(name) is not None:
                fields[name] = _kept_time(fields[name], str(data.get("version")), name)
        return cls(**fields, prices=prices)

    def sunset(self, now: float) -> bool:
        """Tells whether the version stopped serving."""
        return self.sunset_at is not None and self.sunset_at <= now


def pools_admit(pools: frozenset[str] | None, pool: str) -> bool:
    """Tells whether a worker of `pool` may serve a model placed on `pools` (empty or
    None: on none, so any worker identity may)."""
    return not pools or pool in pools


@dataclass(frozen=True)
class ModelEntry:
    """ModelEntry is a catalogue model and its routing policy."""

    name: str
    versions: tuple[VersionEntry, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    fallback: str = ""
    pinned: str = ""
    # Shadow traffic (`tokenmesh models shadow`): this share (percent) of the
    # model's live requests is mirrored to `shadow_version`; "" / 0 = none.
    shadow_version: str = ""
    shadow_percent: int = 0
    # The worker pools that serve the model (`tokenmesh models pools`); empty:
    # any worker identity, the shared `worker` one included. Stored apart
    # (PLACEMENTS_KEY), never in the model's document.
    worker_pools: frozenset[str] = frozenset()

    def admits(self, pool: str) -> bool:
        """Tells whether a worker of `pool` ("": the shared `worker` identity) may
        serve this model."""
        return pools_admit(self.worker_pools, pool)

    def latest_version(self, now: float) -> str | None:
        """Returns what "latest" names unless it is set explicitly: the newest version
        serving (none left: the newest, whose sunset answers); None without versions.
        The edge's routes and the jobs' placement both read it."""
        if not self.versions:
            return None
        serving = [v.version for v in self.versions if not v.sunset(now)]
        return serving[-1] if serving else self.versions[-1].version

    def version(self, label: str) -> VersionEntry | None:
        """Returns the version called `label`, if registered."""
        return next((v for v in self.versions if v.version == label), None)

    def effective_weights(self, now: float) -> dict[str, int]:
        """Returns each serving version's share of unpinned traffic (sums to 100 or is empty)."""
        serving = [v for v in self.versions if not v.sunset(now)]
        if self.pinned and any(v.version == self.pinned for v in serving):
            return {self.pinned: 100}
        weights = {v.version: v.weight for v in serving if v.weight > 0}
        if weights:
            return _to_percent(weights)  # a sunset version's share goes to the others
        # Every weighted version was sunset: the newest serving version takes over.
        return {serving[-1].version: 100} if serving else {}

    def primary_version(self, now: float) -> str:
        """Returns the version most traffic goes to (where other models fall back to)."""
        weights = self.effective_weights(now)
        return max(weights, key=lambda v: (weights[v], v)) if weights else ""

    def shadow(self, now: float) -> tuple[str, int] | None:
        """Returns (version, percent) of the model's active shadow traffic, if any."""
        found = self.version(self.shadow_version) if self.shadow_version else None
        if found is None or found.sunset(now) or self.shadow_percent <= 0:
            return None
        return found.version, self.shadow_percent

    def to_json(self) -> str:
        """Serialises the model for Redis."""
        data: dict[str, Any] = {
            "versions": [v.to_json() for v in self.versions],
            "aliases": dict(self.aliases),
            "fallback": self.fallback,
            "pinned": self.pinned,
        }
        if self.shadow_version:  # absent keys: documents written before shadows read the same
            data["shadow"] = {"version": self.shadow_version, "percent": self.shadow_percent}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, name: str, raw: str | bytes, pools: str | bytes | None = None) -> ModelEntry:
        """Parses a model stored by `to_json`, and its placement (PLACEMENTS_KEY's field)."""
        data: dict[str, Any] = json.loads(raw)
        shadow: dict[str, Any] = data.get("shadow") or {}
        return cls(
            name=name,
            versions=tuple(VersionEntry.from_json(v) for v in data.get("versions", [])),
            aliases=dict(data.get("aliases", {})),
            fallback=str(data.get("fallback", "")),
            pinned=str(data.get("pinned", "")),
            shadow_version=str(shadow.get("version", "")),
            shadow_percent=int(shadow.get("percent", 0)),
            # A document of the build before placements had their hash carried its
            # own (fail-closed: only that build wrote it); moved to the hash at the
            # model's next change (Catalog.change_if).
            worker_pools=(
                parse_pools(pools)
                if pools is not None
                else frozenset(str(p) for p in data.get("worker_pools", ()))
            ),
        )


def parse_pools(raw: str | bytes | None) -> frozenset[str]:
    """Returns the pools of a placement as stored (None: not placed)."""
    return frozenset(p for p in text(raw).split(",") if p) if raw else frozenset()


def pools_text(pools: frozenset[str]) -> str:
    """Returns a placement as stored."""
    return ",".join(sorted(pools))


def _to_percent(weights: Mapping[str, int]) -> dict[str, int]:
    """Scales weights to sum to 100 (largest remainders round up)."""
    total = sum(weights.values())
    if total == 100:
        return dict(weights)
    exact = {v: w * 100 / total for v, w in weights.items()}
    shares = {v: int(x) for v, x in exact.items()}
    for version in sorted(exact, key=lambda v: exact[v] - shares[v], reverse=True)[
        : 100 - sum(shares.values())
    ]:
        shares[version] += 1
    return shares


def _kept_time(seconds: float, version: str, name: str) -> float:
    """Returns a stored time the catalogue can show: one past MAX_TIME_S (or not a
    number) reads as MAX_TIME_S.

    An older router stored a sunset of 9999-12-31T23:59:59.999999999Z (the
    largest Timestamp, a common "never") as 253402300800.0, the year 10000:
    formatting it raised in every snapshot build and catalogue read, which froze
    every edge's configuration on every replica. Such a sunset means "never".
    """
    if math.isfinite(seconds) and seconds <= MAX_TIME_S:
        return seconds
    _warn_unformattable(version, name, repr(seconds))
    return float(MAX_TIME_S)


@functools.lru_cache(maxsize=256)
def _warn_unformattable(version: str, name: str, stored: str) -> None:
    """Logs a stored time past MAX_TIME_S once (every build reads the catalogue)."""
    logger.warning(
        "catalogue: version %r has %s %s, past %s: read as %s (set it again to store it)",
        version,
        name,
        stored,
        MAX_TIME_TEXT,
        MAX_TIME_TEXT,
    )


def _violation(field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field_name, description)])


def check_name(model: str) -> None:
    """Raises InvalidArgument unless `model` is a well-formed model name."""
    if not contract.is_model_name(model):
        raise _violation("model", f"must be {contract.MODEL_NAME_RULE}")


def check_version(version: str, field_name: str = "version") -> None:
    """Raises InvalidArgument unless `version` is a well-formed version label."""
    if not contract.is_model_version(version):
        raise _violation(field_name, f"must be {contract.MODEL_VERSION_RULE}")


def _check_weight(weight: int, field_name: str) -> None:
    if not 0 <= weight <= 100:
        raise _violation(field_name, "must be between 0 and 100")


def add_version(model: ModelEntry | None, name: str, version: str, weight: int) -> ModelEntry:
    """Returns `model` with `version` added (the first version of a model takes 100%)."""
    check_name(name)
    check_version(version)
    _check_weight(weight, "weight")
    model = model or ModelEntry(name=name)
    if model.version(version) is not None:
        return model
    if version in model.aliases:
        # Its exact route would come first: the alias (and callers of it) silently
        # moved to a new version at 0% (set_alias refuses the other way round).
        raise _violation("version", f"{version!r} is an alias of {model.name!r}; remove it first")
    if not model.versions:
        weight = 100  # a model's only version takes all of its traffic
    elif weight:
        raise _violation(
            "weight",
            "a new version of an existing model starts at 0; use SetTrafficSplit to move traffic",
        )
    versions = tuple(sorted((*model.versions, VersionEntry(version, weight)), key=_version_key))
    return replace(model, versions=versions)


def set_split(model: ModelEntry, weights: Mapping[str, int]) -> ModelEntry:
    """Returns `model` with new weights; unlisted versions get 0; the total must be 100."""
    for version, weight in weights.items():
        if model.version(version) is None:
            raise _unknown_version(model, version, "weights")
        _check_weight(weight, f"weights[{version}]")
    if sum(weights.values()) != 100:
        raise _violation("weights", f"must sum to 100 (they sum to {sum(weights.values())})")
    versions = tuple(replace(v, weight=weights.get(v.version, 0)) for v in model.versions)
    return replace(model, versions=versions)


def pin(model: ModelEntry, version: str, at: float | None = None) -> ModelEntry:
    """Returns `model` pinned to `version` ("" unpins); `at`: now (default: `now()`)."""
    if not version:
        return replace(model, pinned="")
    found = model.version(version)
    if found is None:
        raise _unknown_version(model, version, "version")
    if found.sunset(now() if at is None else at):
        # A pin to a sunset version does nothing (effective_weights skips it), yet it
        # was reported as the pin and refused StartRollout with MODEL_PINNED.
        raise _violation("version", f"version {version!r} of {model.name!r} was sunset")
    return replace(model, pinned=version)


def deprecate(model: ModelEntry, version: str, sunset_at: float, now: float) -> ModelEntry:
    """Returns `model` with `version` deprecated now and sunset at `sunset_at`."""
    entry = model.version(version)
    if entry is None:
        raise _unknown_version(model, version, "version")
    if sunset_at <= 0:
        raise _violation("sunset_time", "is required")
    if sunset_at <= now:
        # A sunset passed ends the version's routes at once: a typo in a date took
        # all of its traffic. Retiring now is a split without it, then a sunset.
        raise _violation("sunset_time", "must be in the future")
    if not sunset_at <= MAX_TIME_S:
        # Stored, it could not be formatted back (Sunset header, Timestamp): every
        # snapshot build and catalogue read raised (see _kept_time).
        raise _violation("sunset_time", f"must be at most {MAX_TIME_TEXT}")
    deprecated = replace(entry, deprecated_at=entry.deprecated_at or now, sunset_at=sunset_at)
    versions = tuple(deprecated if v.version == version else v for v in model.versions)
    return replace(model, versions=versions)


def set_alias(model: ModelEntry, alias: str, version: str) -> ModelEntry:
    """Returns `model` with `alias` pointing at `version` ("" removes the alias)."""
    if not contract.is_model_alias(alias):
        raise _violation("alias", f"must be {contract.MODEL_ALIAS_RULE}")
    if model.version(alias) is not None:
        raise _violation("alias", f"{alias!r} is already a version of {model.name!r}")
    aliases = dict(model.aliases)
    if version:
        if model.version(version) is None:
            raise _unknown_version(model, version, "version")
        aliases[alias] = version
    else:
        aliases.pop(alias, None)
    return replace(model, aliases=aliases)


def set_price(model: ModelEntry, version: str, price: Price | None, now: float) -> ModelEntry:
    """Returns `model` with `version` costing `price` from `now` on (None clears it)."""
    entry = model.version(version)
    if entry is None:
        raise _unknown_version(model, version, "version")
    priced = replace(entry, prices=with_change(entry.prices, PriceChange(int(now * 1000), price)))
    versions = tuple(priced if v.version == version else v for v in model.versions)
    return replace(model, versions=versions)


def set_fallback(model: ModelEntry, fallback: str, catalog: Mapping[str, ModelEntry]) -> ModelEntry:
    """Returns `model` falling back to `fallback` ("" clears it); no cycles allowed."""
    if fallback:
        check_name(fallback)
        if fallback == model.name:
            raise _violation("fallback_model", "a model cannot fall back to itself")
        if fallback not in catalog:
            raise NotFound(f"model {fallback!r} is not in the catalogue", reason="MODEL_NOT_FOUND")
        if catalog[fallback].fallback:
            # One level only: a fallback chain would hide an outage behind another outage.
            raise _violation(
                "fallback_model", f"{fallback!r} has a fallback of its own; chains are not allowed"
            )
        _check_fallback_placed(model, catalog[fallback], "fallback_model")
        # ... checked from the other end too: B -> C after A -> B made A -> B -> C.
        falling_back = sorted(m.name for m in catalog.values() if m.fallback == model.name)
        if falling_back:
            raise _violation(
                "fallback_model",
                f"{', '.join(map(repr, falling_back))} fall(s) back to {model.name!r};"
                " chains are not allowed",
            )
    return replace(model, fallback=fallback)


def set_worker_pools(
    model: ModelEntry, pools: Sequence[str], catalog: Mapping[str, ModelEntry]
) -> ModelEntry:
    """Returns `model` placed on `pools` (empty: any worker identity serves it).

    A fallback serves a model's requests when its own workers cannot: a placed
    model's fallback must be placed within its pools (see `_check_fallback_placed`).
    """
    if len(set(pools)) > contract.MAX_WORKER_POOLS:
        raise _violation("worker_pools", f"at most {contract.MAX_WORKER_POOLS} pools")
    for pool in pools:
        if not contract.is_worker_pool(pool):
            raise _violation("worker_pools", f"{pool[:40]!r} must be {contract.WORKER_POOL_RULE}")
    placed = replace(model, worker_pools=frozenset(pools))
    if placed.fallback in catalog:
        _check_fallback_placed(placed, catalog[placed.fallback], "worker_pools")
    for other in catalog.values():
        if other.fallback == model.name and other.name != model.name:
            _check_fallback_placed(other, placed, "worker_pools")
    return placed


def _check_fallback_placed(model: ModelEntry, fallback: ModelEntry, field_name: str) -> None:
    """Raises InvalidArgument unless `fallback` serves `model`'s requests only on pools
    `model` is placed on (its prompts went to any worker while its pools were down)."""
    if model.worker_pools and not (
        fallback.worker_pools and fallback.worker_pools <= model.worker_pools
    ):
        raise _violation(
            field_name,
            f"{model.name!r} is placed on worker pools and falls back to {fallback.name!r}: "
            f"the fallback must be placed on some of {model.name!r}'s pools "
            f"({', '.join(sorted(model.worker_pools))}) too",
        )


def set_shadow(model: ModelEntry, version: str, percent: int, now: float) -> ModelEntry:
    """Returns `model` mirroring `percent`% of its live requests to `version`.

    Percent 0 or no version stops the shadow. The version must be registered
    and serving, and must not already take all of the model's traffic (its
    copies would shadow itself).
    """
    if not version or percent == 0:
        return replace(model, shadow_version="", shadow_percent=0)
    if not 0 < percent <= 100:
        raise _violation("percent", "must be between 0 and 100")
    found = model.version(version)
    if found is None:
        raise _unknown_version(model, version, "version")
    if found.sunset(now):
        raise _violation("version", f"version {version!r} of {model.name!r} was sunset")
    if model.effective_weights(now) == {version: 100}:
        raise _violation(
            "version", f"version {version!r} already serves all of {model.name!r}'s traffic"
        )
    return replace(model, shadow_version=version, shadow_percent=percent)


def _unknown_version(model: ModelEntry, version: str, field_name: str) -> InvalidArgument:
    known = ", ".join(v.version for v in model.versions) or "none"
    return _violation(
        field_name, f"version {version!r} of {model.name!r} is not registered (known: {known})"
    )


def _version_key(entry: VersionEntry) -> tuple[int, int | str]:
    # Numeric versions sort numerically, before any non-numeric label.
    return (0, int(entry.version)) if entry.version.isdigit() else (1, entry.version)


class Catalog:
    """Catalog reads and changes the catalogue in Redis."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def all(self) -> dict[str, ModelEntry]:
        """Returns every model, by name."""
        return await read_catalog(self.redis)

    async def get(self, name: str) -> ModelEntry:
        """Returns one model; raises NotFound."""
        check_name(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(CATALOG_KEY, name)
            pipe.hget(PLACEMENTS_KEY, name)
            raw, pools = await pipe.execute()
        if raw is None:
            raise NotFound(f"model {name!r} is not in the catalogue", reason="MODEL_NOT_FOUND")
        return ModelEntry.from_json(name, raw, pools)

    async def change(
        self,
        name: str,
        apply: Callable[[ModelEntry | None, dict[str, ModelEntry]], ModelEntry],
    ) -> ModelEntry:
        """Applies `apply(current, catalog)` to one model atomically; returns the result."""
        updated = await self.change_if(name, apply, None)
        assert updated is not None  # no guard: the change always lands
        return updated

    async def change_if(
        self,
        name: str,
        apply: Callable[[ModelEntry | None, dict[str, ModelEntry]], ModelEntry],
        guard: Guard | None,
    ) -> ModelEntry | None:
        """Applies `apply(current, catalog)` to one model atomically, only while `guard`
        holds (read in the same transaction), and writes the guard's own fields with
        it; returns the result, or None when the guard did not hold."""
        check_name(name)
        watched = [CATALOG_KEY, PLACEMENTS_KEY]
        if guard is not None:
            watched += sorted({key for key, _ in guard.reads} - set(watched))
        for attempt in range(CHANGE_ATTEMPTS):
            if attempt:  # jittered: writers that collided do not collide again in step
                await asyncio.sleep(random.uniform(0, min(CHANGE_BACKOFF_MAX_S, 0.002 * attempt)))
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watched)
                    placements = await pipe.hgetall(PLACEMENTS_KEY)
                    catalog = _parse_catalog(await pipe.hgetall(CATALOG_KEY), placements)
                    if guard is not None:
                        values = [await pipe.hget(key, field) for key, field in guard.reads]
                        if not guard.holds(values, catalog.get(name)):
                            return None
                    updated = apply(catalog.get(name), catalog)
                    writes = guard.writes if guard is not None else ()
                    if updated == catalog.get(name) and not writes:
                        return updated
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if updated != catalog.get(name):
                        pipe.hset(CATALOG_KEY, name, updated.to_json())
                        _write_placement(pipe, updated, _stored_pools(placements, name))
                    for key, field_name, value in writes:
                        pipe.hset(key, field_name, value)
                    await pipe.execute()
                    return updated
                except WatchError:
                    continue  # someone else changed the catalogue (or the guard): read again
        logger.warning("catalogue change of %s gave up after %d conflicts", name, CHANGE_ATTEMPTS)
        raise Unavailable(
            f"the model catalogue changed {CHANGE_ATTEMPTS} times while changing {name!r}; retry",
            retry_after_s=1.0,
        )

    async def update(
        self, name: str, apply: Callable[[ModelEntry, dict[str, ModelEntry]], ModelEntry]
    ) -> ModelEntry:
        """Changes an existing model (`apply(model, catalog)`); NotFound when it is missing."""
        return await self.change(name, _on_existing(name, apply))

    async def update_if(
        self,
        name: str,
        apply: Callable[[ModelEntry, dict[str, ModelEntry]], ModelEntry],
        guard: Guard,
    ) -> ModelEntry | None:
        """`update`, only while `guard` holds (Catalog.change_if); None when it did not."""
        return await self.change_if(name, _on_existing(name, apply), guard)

    async def register(self, refs: Sequence[tuple[str, str]], pool: str | None = None) -> bool:
        """Adds model versions that workers serve but the catalogue does not know yet;
        returns whether it added any.

        pool: the worker pool of the worker that serves them (None: any). A placed
        model gains no version from another pool's worker: a version it made up
        became what `latest` names, and the model's requests went to a cluster no
        placed worker serves.
        """
        added = False
        known = await self.all()
        # Counted again in each transaction (_adder); this count only spares a full
        # catalogue one transaction, and one read of the whole catalogue, per version.
        versions = sum(len(model.versions) for model in known.values())
        # Oldest version first: it is the one a new model's traffic goes to.
        ordered = sorted(refs, key=lambda ref: (ref[0], _version_key(VersionEntry(ref[1]))))
        for name, version in ordered:
            model = known.get(name)
            if model is not None and pool is not None and not model.admits(pool):
                continue
            if model is not None and version in model.aliases:
                # add_version refuses it; a worker's registration must not fail for it
                # (its other versions would go unregistered): it serves it unrouted.
                logger.warning("%s version %r is named like an alias: not routed", name, version)
                continue
            if model is None or model.version(version) is None:
                try:
                    if versions >= MAX_REGISTERED_VERSIONS:
                        raise _CatalogFull(versions)
                    known[name] = await self.change(name, _adder(name, version, pool))
                except _CatalogFull as full:
                    # It serves it unrouted; an operator's RegisterModelVersion still adds.
                    logger.warning(
                        "the catalogue holds %d versions: %s version %r, which a worker "
                        "serves, is not added (MAX_REGISTERED_VERSIONS)",
                        full.versions,
                        name,
                        version,
                    )
                    versions = max(versions, full.versions)
                    continue
                versions += 1
                added = True
        return added


class _CatalogFull(Exception):
    """A registration's version found the catalogue at MAX_REGISTERED_VERSIONS, counted in
    the transaction that would add it: counted before it, registrations at the same time
    each passed the count and went past the bound together."""

    def __init__(self, versions: int) -> None:
        super().__init__(versions)
        self.versions = versions


@dataclass(frozen=True)
class Guard:
    """A condition on hash fields, and on the model as it stands, that a catalogue change
    lands under (Catalog.change_if), and the fields written with it, in the same
    transaction.

    Attributes:
        reads: the (key, field)s the condition reads (their hashes watched: a change
            to one meanwhile reads them all again).
        holds: whether the change may land, given the fields' values in the order of
            `reads` (None: absent) and the model as stored (None: not in the catalogue).
        writes: (key, field, value) set with the change.
    """

    reads: tuple[tuple[str, str], ...]
    holds: Callable[[Sequence[bytes | str | None], ModelEntry | None], bool]
    writes: tuple[tuple[str, str, str], ...] = ()


def _on_existing(
    name: str, apply: Callable[[ModelEntry, dict[str, ModelEntry]], ModelEntry]
) -> Callable[[ModelEntry | None, dict[str, ModelEntry]], ModelEntry]:
    """Returns `apply` for a model that must exist (NotFound when it does not)."""

    def existing(current: ModelEntry | None, catalog: dict[str, ModelEntry]) -> ModelEntry:
        if current is None:
            raise NotFound(f"model {name!r} is not in the catalogue", reason="MODEL_NOT_FOUND")
        return apply(current, catalog)

    return existing


def _adder(
    name: str, version: str, pool: str | None
) -> Callable[[ModelEntry | None, dict[str, ModelEntry]], ModelEntry]:
    def add(current: ModelEntry | None, catalog: dict[str, ModelEntry]) -> ModelEntry:
        if current is not None and pool is not None and not current.admits(pool):
            return current  # placed on other pools meanwhile (see Catalog.register)
        if current is None or current.version(version) is None:
            versions = sum(len(model.versions) for model in catalog.values())
            if versions >= MAX_REGISTERED_VERSIONS:
                raise _CatalogFull(versions)
        return add_version(current, name, version, 0)

    return add


async def read_catalog(client: aioredis.Redis) -> dict[str, ModelEntry]:
    """Returns every model of the catalogue in `client`, with its placement (one
    transaction: both as they stood at one moment)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(CATALOG_KEY)
        pipe.hgetall(PLACEMENTS_KEY)
        documents, placements = await pipe.execute()
    return _parse_catalog(documents, placements)


def _parse_catalog(
    raw: Mapping[bytes | str, bytes | str], placements: Mapping[bytes | str, bytes | str]
) -> dict[str, ModelEntry]:
    pools = {text(k): v for k, v in placements.items()}
    return {text(k): ModelEntry.from_json(text(k), v, pools.get(text(k))) for k, v in raw.items()}


def _stored_pools(placements: Mapping[bytes | str, bytes | str], name: str) -> frozenset[str]:
    """Returns a model's placement as the hash holds it (empty: no field)."""
    raw = placements.get(name.encode(), placements.get(name))
    return parse_pools(raw)


def _write_placement(pipe: Any, updated: ModelEntry, stored: frozenset[str]) -> None:
    """Queues the placement's change from what the hash holds, if any (PLACEMENTS_KEY):
    a placement read from the model's document (the build before the hash) is moved
    into it as the document is rewritten without it."""
    if updated.worker_pools == stored:
        return
    if updated.worker_pools:
        pipe.hset(PLACEMENTS_KEY, updated.name, pools_text(updated.worker_pools))
    else:
        pipe.hdel(PLACEMENTS_KEY, updated.name)


# Redis's clock minus this process's, as the router last read it (sync_clock).
_redis_clock_offset_s = 0.0


def now() -> float:
    """Returns the wall-clock time on Redis's clock, as this replica last learned it.

    Router replicas write times others read: a worker's lease end (written by
    the replica its heartbeat reached, checked by every replica's builds),
    rollout step starts, heads' last sightings. On each replica's own clock, one
    2 s off made workers flap out of its edges' endpoints (3 s leases, 1 s
    heartbeats) and one a minute off forgot live workers. The limits moved to
    Redis's TIME for the same reason (services.usage.ratelimit).
    """
    return time.time() + _redis_clock_offset_s


async def sync_clock(client: aioredis.Redis) -> None:
    """Learns the offset to Redis's clock (every build), read against the round trip's
    midpoint."""
    global _redis_clock_offset_s
    sent = time.time()
    seconds, microseconds = await client.time()
    midway = (sent + time.time()) / 2  # a queued Redis must not push now() ahead
    _redis_clock_offset_s = seconds + microseconds / 1e6 - midway


def version_sunset_text(model: str, label: str, sunset_at: float) -> str:
    """The NOT_FOUND text for a request naming a sunset version (or an alias of one):
    the edge's own reply and a job item's result say the same (one owner)."""
    when = email.utils.formatdate(sunset_at, usegmt=True)
    return f"version {label!r} of {model!r} was sunset on {when}"


def retired_model_text(model: str, last_sunset_at: float) -> str:
    """The NOT_FOUND text for a request naming no version of a model whose versions
    were all sunset (the last on `last_sunset_at`)."""
    when = email.utils.formatdate(last_sunset_at, usegmt=True)
    return f"every version of {model!r} was sunset, the last on {when}"
