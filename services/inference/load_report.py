"""What a worker tells the router about its load in every heartbeat.

- Load now: requests waiting for a slot, running sequences, slots, KV use
  (from each version's scheduler), and the median and 99th percentile time to
  first token (TTFT) of the requests that got a first token in the last
  `RECENT_WINDOW_S` seconds. The router turns it into the worker's endpoint
  weight at the edge (services.router.load_weights).
- Outcomes per model version since it loaded: finished requests, server
  errors and a TTFT histogram. The router compares a canary's against the
  stable version's over each rollout step (services.router.rollouts).
- Hot prompt heads per model version: how often each of the edge's prefix
  keys (`x-tokenmesh-prefix`) reached this worker lately, decayed. The router
  pins the busiest heads to one worker each, balanced (services.router.prefix_pins).

Requests are observed when they finish (`Admission.record`), on the event
loop; nothing here locks.
"""

from __future__ import annotations

import bisect
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from services.core import contract
from tokenmesh.router.v1 import router_pb2
from tokenmesh.type.v1 import types_pb2

if TYPE_CHECKING:
    from services.inference.models import LoadedModel

RECENT_WINDOW_S = 30.0
RECENT_MAX_SAMPLES = 4096  # per version: the window's memory is bounded
#: TTFT bucket bounds, ms: 1 ms to ~110 s, each 25% above the one before (a
#: percentile read from them is within ~12% of the true one).
TTFT_BOUNDS_MS: tuple[float, ...] = tuple(float(f"{1.25**i:.3g}") for i in range(53))
ERROR_REASON = "error"
#: A prompt head's request count halves every this many seconds.
PREFIX_HALF_LIFE_S = 5.0
#: Heads tracked per version (past it the colder half is forgotten), and reported.
PREFIX_MAX_TRACKED = 512
HOT_PREFIXES = 32
#: A head is reported once its decayed count reaches this (one request is not reuse)
#: while requests keep coming: none for PREFIX_IDLE_S and it is not (a head that went
#: cold would otherwise count towards its worker's load for ~20 s more, and the
#: router would place the heads that replaced it unevenly).
HOT_MIN_REQUESTS = 2.0
PREFIX_IDLE_S = 3.0
#: A worker's prefix cache holds a head once per tenant that sent it (its scope:
#: services.inference.engines.prefix_cache), unless the model's cache is shared: the
#: tenants that sent a head within this long count as its copies, at most
#: PREFIX_MAX_SCOPES of them (the router fits pinned heads into caches by the total).
PREFIX_SCOPE_WINDOW_S = 30.0
PREFIX_MAX_SCOPES = 64


class HotHead(NamedTuple):
    """HotHead is one busy prompt head as a heartbeat reports it."""

    prefix: str
    requests: float  # decayed
    idle_s: float  # since the latest of them
    # About what the head holds in the worker's prefix cache: the latest request's prompt
    # length, once per tenant that sent it lately (once where the cache is shared).
    cached_tokens: int


class PrefixHeat:
    """PrefixHeat counts requests per prompt head, each count halving every PREFIX_HALF_LIFE_S."""

    def __init__(self) -> None:
        # head -> (count, as of when, the latest request's prompt tokens)
        self._heat: dict[str, tuple[float, float, int]] = {}
        # head -> {cache scope: when it last sent the head}, the latest last
        self._scopes: dict[str, dict[str, float]] = {}

    def observe(
        self, prefix: str, prompt_tokens: int = 0, now: float | None = None, scope: str = ""
    ) -> None:
        """Counts one request that carried `prefix` (empty or not the edge's key: not
        counted), whose prompt was `prompt_tokens` long (0: unknown, the head keeps the
        length it had), cached in `scope` (its tenant; "" where the cache is shared)."""
        if not contract.is_prefix_key(prefix):
            return
        at = time.monotonic() if now is None else now
        count, then, known = self._heat.get(prefix, (0.0, at, 0))
        self._heat[prefix] = (_decayed(count, at - then) + 1.0, at, prompt_tokens or known)
        scopes = self._scopes.setdefault(prefix, {})
        scopes.pop(scope, None)
        scopes[scope] = at
        if len(scopes) > PREFIX_MAX_SCOPES:
            del scopes[next(iter(scopes))]  # the least recent
        if len(self._heat) > PREFIX_MAX_TRACKED:
            kept = self._ranked(at)[: PREFIX_MAX_TRACKED // 2]
            self._heat = {head: (count, at, self._heat[head][2]) for head, count in kept}
            self._scopes = {head: self._scopes[head] for head in self._heat}

    def hottest(self, now: float | None = None) -> list[HotHead]:
        """Returns up to HOT_PREFIXES heads, busiest first: those at or above
        HOT_MIN_REQUESTS last seen within PREFIX_IDLE_S."""
        at = time.monotonic() if now is None else now
        busy = [
            HotHead(head, count, at - self._heat[head][1], self._cached_tokens(head, at))
            for head, count in self._ranked(at)
            if count >= HOT_MIN_REQUESTS and at - self._heat[head][1] <= PREFIX_IDLE_S
        ]
        return busy[:HOT_PREFIXES]

    def _cached_tokens(self, head: str, at: float) -> int:
        """Returns the head's prompt length times the scopes that sent it lately: a shared
        system prompt sent by 8 tenants takes 8 copies of the cache, not one."""
        recent = sum(
            1 for seen in self._scopes[head].values() if at - seen <= PREFIX_SCOPE_WINDOW_S
        )
        return self._heat[head][2] * max(1, recent)

    def _ranked(self, at: float) -> list[tuple[str, float]]:
        decayed = (
            (head, _decayed(count, at - then)) for head, (count, then, _) in self._heat.items()
        )
        return sorted(decayed, key=lambda item: (-item[1], item[0]))


def _decayed(count: float, elapsed_s: float) -> float:
    return count * math.pow(0.5, max(elapsed_s, 0.0) / PREFIX_HALF_LIFE_S)


class VersionOutcomes:
    """VersionOutcomes counts how one model version's requests ended, and how fast they began."""

    def __init__(self) -> None:
        # This run of the counters (router_pb2.VersionOutcomes.counters_id): a new
        # one each time the version loads, so a rollout tells a restart from growth.
        self.counters_id = uuid.uuid4().hex[:16]
        self.requests = 0
        self.errors = 0
        # Of those, the ones at batch priority (job items, v2 PRIORITY_BATCH): their
        # first token waits behind every interactive request, so their TTFTs are
        # queue time, kept out of the histogram and the load report's samples.
        self.batch_requests = 0
        self.batch_errors = 0
        self.ttft_counts = [0] * (len(TTFT_BOUNDS_MS) + 1)
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_MAX_SAMPLES)
        self.prefixes = PrefixHeat()

    def observe(
        self, finish_reason: str, ttft_ms: float, now: float | None = None, *, batch: bool = False
    ) -> None:
        """Counts a finished request (ttft_ms 0: it never produced a first token; `batch`:
        it ran at batch priority, its TTFT left out).

        A job item's TTFT in the samples priced the worker that ran a job's backlog as
        slow (a second of queueing behind live traffic against 40 ms), and its weight
        fell: live traffic pushed off a worker whose live requests started as fast.
        """
        self.requests += 1
        error = finish_reason == ERROR_REASON
        self.errors += error
        if batch:
            self.batch_requests += 1
            self.batch_errors += error
            return
        if ttft_ms > 0:
            self.ttft_counts[bisect.bisect_left(TTFT_BOUNDS_MS, ttft_ms)] += 1
            self.recent.append((time.monotonic() if now is None else now, ttft_ms))

    def recent_ttfts(self, now: float) -> list[float]:
        """Returns the TTFTs (ms) observed within the recent window (and forgets older ones)."""
        while self.recent and self.recent[0][0] < now - RECENT_WINDOW_S:
            self.recent.popleft()
        return [ttft for _, ttft in self.recent]


def percentile(values: Sequence[float], share: float) -> float:
    """Returns the nearest-rank percentile (`share` in 0-1) of `values` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def worker_load(models: Iterable[LoadedModel], now: float | None = None) -> router_pb2.WorkerLoad:
    """Returns this worker's load report: the generative versions' load, and every
    version's outcomes (an embedding version's too: without them its rollout never
    saw a request, and waited for good)."""
    at = time.monotonic() if now is None else now
    load = router_pb2.WorkerLoad()
    ttfts: list[float] = []
    for model in models:
        if model.scheduler is None:
            if model.embedder is not None:
                load.versions.append(version_outcomes_pb(model))
            continue
        stats = model.scheduler.stats()
        # Interactive only: a backlog of copies or job items (they wait behind every
        # interactive request) priced a worker as loaded, and its weight fell from
        # 100 to 20, live traffic pushed to the others.
        load.queue_depth += stats["waiting_interactive"]
        load.running_sequences += stats["running"]
        load.max_sequences += model.scheduler.limits.max_sequences
        capacity = max(stats["kv_tokens_capacity"], 1)
        load.kv_utilization = max(load.kv_utilization, stats["kv_tokens_reserved"] / capacity)
        ttfts += model.outcomes.recent_ttfts(at)
        load.versions.append(version_outcomes_pb(model))
    load.ttft_samples = len(ttfts)
    load.ttft_p50_ms = percentile(ttfts, 0.5)
    load.ttft_p99_ms = percentile(ttfts, 0.99)
    return load


def version_outcomes_pb(model: LoadedModel) -> router_pb2.VersionOutcomes:
    """Returns one version's outcome counters as sent in heartbeats."""
    outcomes = model.outcomes
    return router_pb2.VersionOutcomes(
        model=types_pb2.ModelRef(name=model.name, version=model.version),
        requests=outcomes.requests,
        errors=outcomes.errors,
        ttft_bucket_counts=outcomes.ttft_counts,
        ttft_bucket_bounds_ms=TTFT_BOUNDS_MS,
        counters_id=outcomes.counters_id,
        batch_requests=outcomes.batch_requests,
        batch_errors=outcomes.batch_errors,
        hot_prefixes=[
            router_pb2.PrefixHeat(
                prefix=head.prefix,
                requests=head.requests,
                idle_seconds=head.idle_s,
                prompt_tokens=head.cached_tokens,
            )
            for head in outcomes.prefixes.hottest()
        ],
        prefix_cache_tokens=prefix_cache_tokens(model),
    )


def prefix_cache_tokens(model: LoadedModel) -> int:
    """The capacity of the version's prefix cache, in tokens (0: it has none)."""
    engine = model.scheduler.engine if model.scheduler is not None else None
    cache = engine.prefix_cache if engine is not None else None
    return cache.capacity_tokens if cache is not None and cache.enabled else 0
