"""The worker's prompt-template cache: no Redis read on a request's path once warm.

`TemplateCache.get(name, selector)` returns a `PromptTemplate`, compiled
(in a thread) when it was fetched, so rendering it is all a request does. A
version number names an immutable version, cached for as long as it stays
among the `max_versions` most recently used. An alias (or
"latest", or no selector) goes through the template's head, which a
supervised background task re-reads every `refresh_s` (0.5 s) for every
template used in the last `idle_s`, in one HMGET, and whose versions it
fetches ahead of requests: an alias moved by an operator is served within
`refresh_s` plus a Redis round trip. Without the background task (`start`
not called) a head older than `ttl_s` (1 s) is re-read on the request path,
one fetch at a time per template.

Only a template's first use, an unknown version, or a template that does not
exist (remembered as missing for `ttl_s`) reaches Redis on a request's path;
concurrent requests for the same thing share one fetch.

NOTE(templates): the worker reads the router's Redis keys directly (through
`services.router.prompts.PromptCatalog`, the one module that owns their
layout) rather than calling the router's GetPromptTemplate over mTLS:

- Redis already is the catalogue's source of truth and a dependency of every
  worker (budgets, usage); the router is not on any request's path today, and
  this keeps it so: a router restart or outage does not stop templates from
  resolving, and there is no extra hop (TLS, the router's event loop) on a
  cache miss;
- the refresh of many templates is one HMGET, where the RPC would be one call
  per template (the API has no batch get);
- no new caller rule: RouterService stays callable only by the edge and the
  operator (workers would otherwise need read access to the admin catalogue).

The price is that workers depend on the key layout, which is why it lives in
one module both sides import. During a Redis outage the cache keeps serving
what it has (stale aliases included) and logs that it cannot refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.errors import NotFound, Unavailable
from services.core.tasks import SupervisedTask, Supervisor
from services.router.prompts import (
    LATEST,
    PromptCatalog,
    PromptHead,
    PromptTemplate,
    check_selector,
    version_number,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


@dataclass
class CacheStats:
    """CacheStats counts what reached Redis (for metrics and tests)."""

    version_fetches: int = 0
    head_fetches: int = 0  # request-path head reads (first use, TTL mode)
    refreshes: int = 0  # background HMGETs


@dataclass
class _Head:
    head: PromptHead | None  # None: the template does not exist
    fetched_at: float
    used_at: float
    selectors: set[str]


class TemplateCache:
    """TemplateCache resolves template references on a worker (see the module docstring).

    Args:
        catalog: the catalogue's reader (the worker's Redis).
        refresh_s: how often the background task re-reads used heads.
        ttl_s: how old a head may be before a request re-reads it, without the task.
        idle_s: templates unused this long are no longer refreshed.
        max_versions: versions kept in memory (least recently used go first).
        max_heads: templates whose heads are kept (least recently used go first).
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        catalog: PromptCatalog,
        *,
        refresh_s: float = 0.5,
        ttl_s: float = 1.0,
        idle_s: float = 600.0,
        max_versions: int = 256,
        max_heads: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.refresh_s = refresh_s
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self.max_versions = max_versions
        self.max_heads = max_heads
        self.clock = clock
        self.stats = CacheStats()
        self._versions: OrderedDict[tuple[str, int], PromptTemplate] = OrderedDict()
        self._missing: dict[tuple[str, int], float] = {}  # unknown versions, when seen
        self._heads: dict[str, _Head] = {}
        self._inflight: dict[Any, asyncio.Future[Any]] = {}
        self._task: SupervisedTask | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Starts refreshing used heads in the background, under `supervisor`."""
        self._task = supervisor.spawn("template-cache-refresh", self._refresh_loop)

    async def stop(self) -> None:
        """Stops the background refresh."""
        if self._task is not None:
            await self._task.stop(timeout_s=2)
            self._task = None

    async def get(self, name: str, selector: str = "") -> PromptTemplate:
        """Returns the version `selector` names: a number, an alias, "latest" or "" (newest).

        Raises:
            InvalidArgument: a malformed name or selector.
            NotFound: no such template, version or alias.
            Unavailable: Redis is unreachable and the cache does not have the answer.
        """
        check_selector(selector)
        number = version_number(selector)
        if number is not None:
            return await self._version(name, number)
        head = await self._head(name)
        if head.head is None:
            raise NotFound(
                f"prompt template {name!r} does not exist", reason="PROMPT_TEMPLATE_NOT_FOUND"
            )
        version = head.head.resolve(selector)
        # Kept for prefetching only once it resolved: selectors come from clients,
        # and unknown ones would pile up (and be scanned every refresh) forever.
        head.selectors.add(selector)
        return await self._version(name, version)

    def prefetched(self, name: str) -> frozenset[str]:
        """Returns the selectors of `name` the background refresh fetches ahead: those
        requests used and that resolved (for tests and debugging)."""
        entry = self._heads.get(name)
        return frozenset(entry.selectors) if entry is not None else frozenset()

    async def _version(self, name: str, version: int) -> PromptTemplate:
        key = (name, version)
        cached = self._versions.get(key)
        if cached is not None:
            self._versions.move_to_end(key)
            return cached
        seen_missing = self._missing.get(key)
        if seen_missing is not None and self.clock() - seen_missing < self.ttl_s:
            raise NotFound(
                f"prompt template {name!r} has no version {version}",
                reason="PROMPT_TEMPLATE_VERSION_NOT_FOUND",
            )
        return await self._once(("version", key), lambda: self._fetch_version(name, version))

    async def _fetch_version(self, name: str, version: int) -> PromptTemplate:
        self.stats.version_fetches += 1
        key = (name, version)
        try:
            template = await self.catalog.version(name, version)
        except NotFound:
            if len(self._missing) >= self.max_versions:
                self._missing.clear()  # bounded: forgetting only costs a Redis read
            self._missing[key] = self.clock()
            raise
        except _REDIS_DOWN:
            raise Unavailable("prompt templates are unavailable; retry shortly") from None
        # Compiling takes up to ~1 s for a 64 KiB template: once per version, off the loop.
        await asyncio.to_thread(lambda: template.prompt)
        self._missing.pop(key, None)
        self._versions[key] = template
        while len(self._versions) > self.max_versions:
            self._versions.popitem(last=False)
        return template

    async def _head(self, name: str) -> _Head:
        now = self.clock()
        entry = self._heads.get(name)
        if entry is not None:
            entry.used_at = now
            if self._task is not None or now - entry.fetched_at < self.ttl_s:
                return entry
        try:
            return await self._once(("head", name), lambda: self._fetch_head(name))
        except Unavailable:
            if entry is None:
                raise
            logger.warning("prompt template %r: Redis unreachable, serving the last head", name)
            return entry

    async def _fetch_head(self, name: str) -> _Head:
        self.stats.head_fetches += 1
        try:
            head = (await self.catalog.heads_of([name]))[name]
        except _REDIS_DOWN:
            raise Unavailable("prompt templates are unavailable; retry shortly") from None
        now = self.clock()
        entry = self._heads.get(name)
        selectors = entry.selectors if entry is not None else set()
        if entry is None and len(self._heads) >= self.max_heads:
            oldest = min(self._heads, key=lambda n: self._heads[n].used_at)
            del self._heads[oldest]  # e.g. requests naming templates that do not exist
        self._heads[name] = _Head(head, now, now, selectors)
        return self._heads[name]

    async def _once(self, key: Any, fetch: Callable[[], Awaitable[T]]) -> T:
        """Runs `fetch` once for all concurrent callers asking for `key`."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(fetch())
            self._inflight[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        # A caller that gives up (a cancelled request) leaves the fetch to the others.
        result: T = await asyncio.shield(pending)
        return result

    def _settled(self, key: Any, done: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone

    async def refresh(self) -> None:
        """Re-reads every head used in the last `idle_s` (one HMGET), then fetches
        the versions their used aliases point at, so requests find them in memory."""
        now = self.clock()
        for name in [n for n, e in self._heads.items() if now - e.used_at > self.idle_s]:
            del self._heads[name]
        names = sorted(self._heads)
        if not names:
            return
        self.stats.refreshes += 1
        heads = await self.catalog.heads_of(names)
        fetched_at = self.clock()
        for name, head in heads.items():
            entry = self._heads.get(name)
            if entry is not None:
                entry.head, entry.fetched_at = head, fetched_at
        for name in names:
            await self._prefetch(name)

    async def _prefetch(self, name: str) -> None:
        entry = self._heads.get(name)
        if entry is None:
            return
        head = entry.head
        if head is None:
            entry.selectors.clear()
            return
        # An alias an operator removed is dropped too: the set stays within the
        # template's aliases (plus "" and "latest").
        entry.selectors &= {"", LATEST, *head.aliases}
        for selector in list(entry.selectors):
            try:
                await self._version(name, head.resolve(selector))
            except NotFound:
                continue  # written after the head was read: the next pass finds it

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except _REDIS_DOWN as error:
                logger.warning("prompt templates: cannot refresh aliases (%s)", error)
            except Unavailable:
                logger.warning("prompt templates: cannot prefetch versions (Redis unreachable)")
            await asyncio.sleep(self.refresh_s)
