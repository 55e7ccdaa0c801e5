"""What a worker tells the router about its load in every heartbeat.

- Load now: requests waiting for a slot, running sequences, slots, KV use
  (from each version's scheduler), and the median and 99th percentile time to
  first token (TTFT) of the requests that got a first token in the last
  `RECENT_WINDOW_S` seconds. The router turns it into the worker's endpoint
  weight at the edge (services.router.load_weights).
- Outcomes per model version since it loaded: finished requests, server
  errors and a TTFT histogram. The router compares a canary's against the
  stable version's over each rollout step (services.router.rollouts).

Requests are observed when they finish (`Admission.record`), on the event
loop; nothing here locks.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

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


class VersionOutcomes:
    """VersionOutcomes counts how one model version's requests ended, and how fast they began."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.ttft_counts = [0] * (len(TTFT_BOUNDS_MS) + 1)
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_MAX_SAMPLES)

    def observe(self, finish_reason: str, ttft_ms: float, now: float | None = None) -> None:
        """Counts a finished request (ttft_ms 0: it never produced a first token)."""
        self.requests += 1
        if finish_reason == ERROR_REASON:
            self.errors += 1
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
    """Returns this worker's load report over its loaded generative versions."""
    at = time.monotonic() if now is None else now
    load = router_pb2.WorkerLoad()
    ttfts: list[float] = []
    for model in models:
        if model.scheduler is None:
            continue
        stats = model.scheduler.stats()
        load.queue_depth += stats["waiting"]
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
    )
