"""Load-aware endpoint weights: from workers' load reports to EDS host weights.

Each heartbeat carries the worker's load (`LoadReport`): queue depth, running
sequences, KV use and the time to first token (TTFT) of its recent requests.
The router turns it into the worker's endpoint weight at the edge (EDS
`load_balancing_weight`, which Maglev, ring hash and round robin all honour),
so a slow or saturated worker receives a smaller share of new requests while
prefix affinity keeps hashing similar prompts together among the rest.

How a weight moves, per heartbeat of the worker (all pure functions here):

1. cost: the worker's median TTFT, times its queue pressure
   (1 + waiting / slots) and a KV penalty above 80% use.
2. smoothing: the cost is an EWMA (`EWMA_ALPHA`) over heartbeats, so one
   slow request moves nothing much.
3. target, per cluster (model version) the worker is in: `NEUTRAL_WEIGHT` x
   (best smoothed cost among that cluster's routable workers / this worker's),
   between `MIN_WEIGHT` and `NEUTRAL_WEIGHT` (within `DEADBAND` % or
   `DEADBAND_MS` of the best counts as the best). A worker without a cost (no
   report, or an idle one) targets the neutral weight.
4. hysteresis: a target within `DEADBAND` of the current weight changes
   nothing (no flapping on noise), and a weight moves at most `MAX_STEP`
   per heartbeat toward its target (no cliff when one report is odd).

A report without a TTFT sample (none of the worker's requests finished within
the report's window) is evidence only from an idle worker: nothing queued,
nothing running; then it has no cost (neutral). A busy one (`LoadReport.busy`)
is a worker whose engine stalls, or whose long generations all outlast the
window: it keeps its smoothed cost (the history is not dropped), and its
target is set from that cost times the report's pressure (`pending_cost`;
without a history, the cluster's best cost times it). Counted as idle, a worker
held at the floor for being slow climbed back to 100 within four heartbeats
while its queue grew, and took half of its version's new requests. Only the
held cost is stored, not the raise: stored, the raise compounded at every
heartbeat of a stall (x9 per heartbeat at a pressure of 17) and took as long to
decay once requests finished again.

A worker serving several versions has one weight per version's cluster
(`ClusterWeight`): one weight for all of them, set against the fastest worker
sharing any of them, put a worker of m1 and m2 at the floor next to a fast
worker of m2 only, in m1's cluster too, where its equally fast peer kept 100.
Its own weight (`overall`: what ListWorkers shows and the `inference` cluster
uses) is the lowest of them.

The outcome carries a one-line reason that `tokenmesh workers list` shows.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

NEUTRAL_WEIGHT = 100
MIN_WEIGHT = 5  # never 0: a slowed worker keeps a trickle, so its reports stay fresh
MAX_STEP = 30
DEADBAND = 10
# Costs this close to the best are noise, whatever their ratio: fast workers'
# TTFTs of 11 and 12 ms (or 5 and 9) moved a weight at every heartbeat, and
# every move remaps part of the hash table that prefix affinity relies on.
DEADBAND_MS = 10.0
EWMA_ALPHA = 0.5
KV_PRESSURE_FROM = 0.8  # KV use above this share adds to the cost
KV_PRESSURE_FACTOR = 5.0  # ... at this rate: 100% use costs 2x


@dataclass(frozen=True)
class LoadReport:
    """LoadReport is the part of a worker's heartbeat the weight depends on."""

    queue_depth: int = 0
    running: int = 0
    slots: int = 0
    kv_utilization: float = 0.0
    ttft_samples: int = 0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0

    def pressure(self) -> float:
        """Returns how much waiting and KV use multiply the TTFT (1: none)."""
        queued = self.queue_depth / max(self.slots, 1)
        kv = max(0.0, self.kv_utilization - KV_PRESSURE_FROM) * KV_PRESSURE_FACTOR
        return (1.0 + queued) * (1.0 + kv)

    def cost(self) -> float | None:
        """Returns the report's cost (higher: slower to start a new request), None if unknown
        (no sample, or a TTFT that is not a number: no evidence either way)."""
        if self.ttft_samples <= 0 or not math.isfinite(self.ttft_p50_ms):
            return None
        cost = max(self.ttft_p50_ms, 0.1) * self.pressure()
        return cost if math.isfinite(cost) else None

    def busy(self) -> bool:
        """Whether the worker has work in hand (requests waiting or running, KV reserved
        past the pressure threshold): no TTFT sample from it is no evidence of idleness."""
        return self.queue_depth > 0 or self.running > 0 or self.kv_utilization > KV_PRESSURE_FROM

    def untimed(self) -> bool:
        """Whether the report carries no usable TTFT while the worker is busy."""
        return self.cost() is None and self.busy()


@dataclass(frozen=True)
class WeightState:
    """WeightState is what the router keeps per worker between heartbeats."""

    cost: float | None = None  # smoothed
    weight: int = NEUTRAL_WEIGHT
    reason: str = "no load report yet: neutral weight"


@dataclass(frozen=True)
class ClusterWeight:
    """ClusterWeight is a worker's weight state in one model version's cluster."""

    model: str
    version: str
    state: WeightState


def smoothed_cost(previous: float | None, report: LoadReport | None) -> float | None:
    """Returns the EWMA of the costs. A report with no cost forgets the past (no report,
    or an idle worker's), unless the worker is busy: then the past is all there is,
    kept as it was (`pending_cost` raises it by the report's pressure)."""
    if previous is not None and not math.isfinite(previous):  # inf: stored by an earlier router
        previous = None
    if report is not None and report.untimed():
        return previous
    current = report.cost() if report is not None else None
    if current is None:
        return None
    if previous is None:
        return current
    return EWMA_ALPHA * current + (1.0 - EWMA_ALPHA) * previous


def pending_cost(
    report: LoadReport | None, cost: float | None, others: Sequence[float | None]
) -> float | None:
    """Returns the cost a weight's target is set from: the smoothed `cost`, or for a busy
    worker without a TTFT sample, a lower bound of its next TTFT: its held cost (else the
    cluster's best, `others`: it is no faster than that) times the report's pressure.

    Not stored (`smoothed_cost` keeps the held cost): the held cost already carries the
    pressure of its own reports, so stored, the raise compounded at every heartbeat.
    """
    if report is None or not report.untimed():
        return cost
    base = cost if cost is not None else best(others)
    if base is None:
        return None  # nobody's speed is known: nothing to compare with
    raised = base * report.pressure()
    # Past any float a worker is slower than every other: the floor, not "no evidence".
    return raised if math.isfinite(raised) else sys.float_info.max


def target_weight(cost: float | None, best_cost: float | None) -> int:
    """Returns the weight a worker of `cost` should have next to the best worker's."""
    if cost is None or best_cost is None or cost <= 0 or cost - best_cost < DEADBAND_MS:
        return NEUTRAL_WEIGHT
    if not math.isfinite(cost) or not math.isfinite(best_cost):
        # No evidence (load_from_pb refuses such reports): inf - inf made NaN, and
        # round(NaN) raised in every heartbeat of the worker.
        return NEUTRAL_WEIGHT
    weight = round(NEUTRAL_WEIGHT * min(best_cost, cost) / cost)
    if weight > NEUTRAL_WEIGHT - DEADBAND:
        return NEUTRAL_WEIGHT  # within noise of the best: as good as the best
    return max(MIN_WEIGHT, weight)


def stepped(current: int, target: int) -> int:
    """Returns the next weight: unchanged within the deadband, else at most MAX_STEP closer.

    A target at a bound (neutral, minimum) is reached exactly: a recovered
    worker gets its full weight back rather than stopping just short of it.
    """
    if abs(target - current) < DEADBAND and target not in (NEUTRAL_WEIGHT, MIN_WEIGHT):
        return current
    step = max(-MAX_STEP, min(MAX_STEP, target - current))
    return max(MIN_WEIGHT, min(NEUTRAL_WEIGHT, current + step))


def best(costs: Iterable[float | None]) -> float | None:
    """Returns the lowest known cost (the reference every weight is relative to)."""
    known = [c for c in costs if c is not None]
    return min(known) if known else None


def update(
    previous: WeightState, report: LoadReport | None, others: Iterable[float | None]
) -> WeightState:
    """Returns a worker's weight state after one heartbeat.

    Args:
        previous: the worker's state after its previous heartbeat.
        report: the load it reported now (None: none).
        others: the smoothed costs of the other routable workers.
    """
    return settle(previous, report, smoothed_cost(previous.cost, report), others)


def settle(
    previous: WeightState,
    report: LoadReport | None,
    cost: float | None,
    others: Iterable[float | None],
) -> WeightState:
    """Returns a weight state after one heartbeat whose smoothed cost is `cost`
    (`update`; a worker in several clusters settles once per cluster, on one cost)."""
    known = list(others)
    pending = pending_cost(report, cost, known)
    reference = best([pending, *known])
    target = target_weight(pending, reference)
    weight = stepped(previous.weight, target)
    return WeightState(cost, weight, explain(report, pending, reference, target, weight, cost))


def overall(cost: float | None, clusters: Sequence[ClusterWeight]) -> WeightState:
    """Returns a worker's own weight: its lowest in any of its clusters (the one an
    operator should look at), its reason naming that cluster when there are several."""
    if not clusters:
        return WeightState(cost)
    lowest = min(clusters, key=lambda c: c.state.weight)
    if len(clusters) == 1:
        return lowest.state
    where = f"lowest in {lowest.model}:{lowest.version}: "
    return replace(lowest.state, reason=where + lowest.state.reason)


def explain(
    report: LoadReport | None,
    cost: float | None,
    reference: float | None,
    target: int,
    weight: int,
    held: float | None = None,
) -> str:
    """Returns the one-line reason for a weight (`cost`: the one its target is set from,
    `pending_cost`; `held`: the smoothed cost it raised, if any)."""
    if report is None:
        why = "no load report: neutral"
    elif report.untimed():
        why = _untimed(report, cost, reference, held)
    elif cost is None:
        why = "no recent requests: neutral"
    else:
        why = f"cost {cost:.0f}ms vs best {reference or cost:.0f}ms"
        if report.pressure() > 1.0:
            why += f" (ttft p50 {report.ttft_p50_ms:.0f}ms x pressure {report.pressure():.2f})"
    if weight == target:
        return why
    if abs(target - weight) < DEADBAND:
        return f"{why}; target {target} within the deadband"
    return f"{why}; moving to {target} by at most {MAX_STEP} per heartbeat"


def _untimed(
    report: LoadReport, cost: float | None, reference: float | None, held: float | None
) -> str:
    """The reason for a busy worker none of whose requests finished within the window."""
    why = f"no request finished lately, {report.queue_depth} queued, {report.running} running"
    if cost is None:
        return f"{why}: no cost known, neutral"
    base = f"last cost {held:.0f}ms" if held is not None else "best cost"
    return (
        f"{why}: cost {cost:.0f}ms ({base} x pressure {report.pressure():.2f})"
        f" vs best {reference or cost:.0f}ms"
    )
