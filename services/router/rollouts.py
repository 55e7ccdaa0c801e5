"""SLO-gated canary rollouts, driven by the router itself.

A rollout moves a model's traffic from its stable version to a new one in
steps (5%, 25%, 50%, 100% by default). Over each step it compares the new
version's figures with the stable version's, from the per-version outcome
counters every worker reports in its heartbeats (services.inference.load_report):

- error rate: rolled back at once, mid-step, when the new version's errors
  show with 99.9% confidence a rate above `max_error_rate` over
  `max(requests, min_requests)` (as if every request still needed to reach
  min_requests succeeded: `error_breach`) and its rate is above the stable
  version's (a mesh-wide outage is not the canary's fault);
- TTFT: at the end of the step, rolled back when the new version's p99 is more
  than `max_ttft_p99_ratio` times the stable version's, or its p90 is (the
  quantile a step's few requests can show: a canary slower across the board
  breaks it at 50 requests), with 99.9% confidence (`ttft_checks`): more of
  its requests were slower than that bound than the 1% (10%) a p99 (p90)
  within it allows, by a margin chance explains at most 0.1% of the time.
  Comparing the two p99s read from the histograms compared the canary's
  slowest request with the stable version's real p99 (the 99th percentile of
  50 requests is the 50th): one cold start rolled back a canary whose
  latencies matched the stable version's.
  Requests that ended without a first token (cancelled, or past their
  deadline, before it) have no TTFT; the canary's, beyond what the stable
  version's share of them explains (`untimed_allowed`), count as slower than
  the bound: left out, a canary slower than every client's deadline read as a
  p99 of 0 and was promoted.

A worker whose counters start again during a step (it restarted: a new
`counters_id`) keeps what its old run counted in the step (`carry_restarts`),
and a run that ended without draining counts one failed request more (it
died, cutting what it ran): a canary that keeps crashing rolls back instead of
waiting for traffic at its share for good.

At the end of a step with at least `min_requests` requests and both bounds
held, it advances; with fewer it waits for traffic. A generative model's step
also waits (`ttft_wait`) for the stable version's requests and first tokens to
compare with, and for `min_requests` canary requests the TTFT gate can read.
Reaching 100% ends it (succeeded); a first step of 100 is refused (nothing
left to compare with). Rolled back or aborted, the new version has 0%.

State lives in Redis (`ROLLOUTS_KEY`, one JSON document per model), so a
rollout survives a router restart. Only one router replica drives rollouts:
the holder of a lease (`LEASE_KEY`) that expires unless renewed, with a
fencing token; every write the driver makes is a compare-and-set that also
checks the lease still names it, so a replica that stalled past its lease
writes nothing. Operators' pause/resume/abort are compare-and-sets too.
Every decision goes to the rollout's history and to the audit log (tenant
`AUDIT_TENANT`: `ListAuditEntries`, `GET /v1/usage/audit?tenant=tokenmesh.system`
with an admin key, or with the operator certificate over mTLS).

A rollout moves traffic only from the split it last set (`APPLIED_KEY`), checked
in the transaction that moves it: an operator's split or pin (`change_by_hand`,
the on-call's emergency lever) aborts an active rollout in the transaction that
changes the split, and a split changed any other way (an older replica, a hand
edit) aborts it at its next move, leaving the split as it is. The driver's next
step put a canary the operator had pulled back to its share. A rollback or an
abort is the exception: its point is the canary's 0%, so it takes the canary's
share to the stable version from whatever split it finds, the rest of that split
kept (`_withdraw`); refused like a step, a rolled-back canary kept the outside
split's share while the rollback alert fired. A rollout starts only while its
stable version takes all of the other versions' traffic (the effective split: a
sunset version's stored weight serves nothing), and its first move checks the
same (`_other_versions`): it sets the split to the two versions it compares, and
a third version's share was lost.

Every replica exports every stored rollout's metrics from Redis each tick
(`RolloutStore.export_metrics`): the step gauge from the catalogue's split, and
the rolled-back counter's series at 0 from the start. Set only where a decision
was applied, a replica that served an abort, or lost the lease, went on
exporting its last step, and the counter's series was born at 1 (which
Prometheus' increase() reads as no increase).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import statistics
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from services.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.core.redis_service import LUA_REDIS_NOW_MS, known_fields, text
from services.core.tasks import SupervisedTask, Supervisor
from services.router import catalog as cat
from services.router.catalog import Catalog, ModelEntry
from services.router.registry import DRAINING, VersionCounts, WorkerEntry, WorkerRegistry
from services.usage.meter import AUDIT_FNS, audit_member, audit_prelude
from services.usage.meter import PREFIX as USAGE_PREFIX
from tokenmesh.usage.v1 import usage_pb2

logger = logging.getLogger(__name__)
ROLLOUTS_KEY = "tokenmesh:router:rollouts"
LEASE_KEY = "tokenmesh:router:rollouts:lease"
# A step whose new version no worker serves rolls back after this long (and its time).
NO_WORKER_GRACE_S = 60.0
# model -> the traffic split its rollout last applied (traffic_of; see the driver's tick).
APPLIED_KEY = "tokenmesh:router:rollouts:applied"
FENCE_KEY = "tokenmesh:router:rollouts:fence"
#: The audit log's tenant for what the mesh does by itself (rollout decisions).
AUDIT_TENANT = "tokenmesh.system"
AUDIT_RETENTION_MS = 90 * 86400 * 1000
AUDIT_MAX_ENTRIES = 100_000  # rollout decisions: a few a minute at most
# KEYS: the audit log; ARGV: the decision's stamp (ms), its entry, the retention (ms).
_RECORD_AUDIT = (
    audit_prelude(AUDIT_MAX_ENTRIES)
    + LUA_REDIS_NOW_MS
    + AUDIT_FNS
    + """
audit_add(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]))
audit_trim(KEYS[1], tonumber(ARGV[3]))
return 1
"""
)
MAX_DECISIONS = 50
MAX_STEPS = 20
DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_STEP_S = 60.0
DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_MAX_TTFT_P99_RATIO = 1.5
DEFAULT_MIN_REQUESTS = 50
# The TTFT gate's quantiles (p99: the policy's; p90: what a step's few requests show).
TTFT_GATE_QUANTILES = (0.99, 0.9)
# The TTFT gate's false alarm rate per quantile: the chance that a canary whose
# quantile is within the bound has as many requests above it as the gate needs to
# roll back (ttft_checks).
TTFT_GATE_ALPHA = 0.001
# Above this many requests the gate's binomial tail is read from its normal approximation.
TTFT_GATE_EXACT_UP_TO = 1_000_000
# The error gate's false alarm rate at each look: the chance that a canary whose
# error rate is within the policy's has as many errors as the gate needs to roll
# back. It looks every tick of a step: over a step's looks the chance stays small
# (the errors only grow, so a look that passes makes the next one likely to).
ERROR_GATE_ALPHA = 0.001

RUNNING, PAUSED, SUCCEEDED, ROLLED_BACK, ABORTED = (
    "running",
    "paused",
    "succeeded",
    "rolled_back",
    "aborted",
)
ACTIVE = frozenset({RUNNING, PAUSED})

STEP_PERCENT = Gauge(
    "tokenmesh_rollout_step_percent",
    "The rolled-out version's share of its model's traffic (percent), per model's last "
    "rollout; every router replica exports it from Redis.",
    ["model", "version"],
)
# A step that outlasts its duration holds the canary at its share: waiting for traffic
# a quiet model does not send (min_requests too high for its share), or a gate that
# keeps holding. Nothing else said so (alert TokenmeshRolloutStepStuck).
STEP_HELD_RATIO = Gauge(
    "tokenmesh_rollout_step_held_ratio",
    "How long a running rollout's current step has lasted, in step durations (above 1: "
    "held, waiting for traffic or by a gate; 0 when paused or ended); every router "
    "replica exports it from Redis.",
    ["model", "version"],
)
ROLLED_BACK_TOTAL = Counter(
    "tokenmesh_rollouts_rolled_back_total",
    "Rollouts rolled back by the router because a bound broke (every replica exports "
    "each stored rollout's series, from 0).",
    ["model", "version"],
)

# KEYS: lease; fencing counter. ARGV: holder id, lifetime ms, current token ("" = none).
# Renews the lease if `holder:token` holds it, takes it if free (a new, larger
# token); returns the token held, or 0 when another holder has it.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held and held == ARGV[1] .. ':' .. ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return tonumber(ARGV[3])
end
if held then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', tonumber(ARGV[2]))
return token
"""

# KEYS: rollouts hash; lease. ARGV: model, expected document, new document,
# lease value the writer must still hold ("" = no lease needed: an operator).
_COMPARE_AND_SET = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return 0 end
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
-- A new rollout: its applied mark is empty (never a split) until its first split
-- moves. No mark at all means a rollout from before the marks (RolloutDriver._reconcile).
if ARGV[5] == '1' then redis.call('HSET', KEYS[3], ARGV[1], '') end
return 1
"""


@dataclass(frozen=True)
class Policy:
    """Policy is what a rollout was asked to do."""

    steps: tuple[int, ...] = DEFAULT_STEPS
    step_s: float = DEFAULT_STEP_S
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    max_ttft_p99_ratio: float = DEFAULT_MAX_TTFT_P99_RATIO
    min_requests: int = DEFAULT_MIN_REQUESTS

    def check(self) -> None:
        """Raises InvalidArgument unless the policy is sound."""
        violations = []
        steps = self.steps
        if not 1 <= len(steps) <= MAX_STEPS or any(not 1 <= s <= 100 for s in steps):
            violations.append(FieldViolation("steps", f"1-{MAX_STEPS} shares of 1-100 (percent)"))
        elif any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or steps[-1] != 100:
            violations.append(FieldViolation("steps", "must increase strictly and end at 100"))
        elif steps[0] == 100:
            # A first step of 100 leaves the stable version no traffic to compare with:
            # the gates compared the canary with nothing and it succeeded unchecked.
            violations.append(
                FieldViolation(
                    "steps",
                    "the first step must be below 100: the stable version keeps traffic "
                    "in every observed step, for the gates to compare with (e.g. 5,25,50,100)",
                )
            )
        if not 1 <= self.step_s <= 86400:
            violations.append(FieldViolation("step_duration", "must be 1 s to 24 h"))
        if not 0 < self.max_error_rate <= 1:
            violations.append(FieldViolation("max_error_rate", "must be above 0 and at most 1"))
        if not 1 <= self.max_ttft_p99_ratio <= 100:
            violations.append(FieldViolation("max_ttft_p99_ratio", "must be 1-100"))
        if not 1 <= self.min_requests <= 1_000_000:
            violations.append(FieldViolation("min_requests", "must be 1-1000000"))
        if violations:
            raise InvalidArgument(violations)


@dataclass(frozen=True)
class Window:
    """Window is one version's figures over a step (summed over workers)."""

    requests: int = 0
    errors: int = 0
    ttft_bounds_ms: tuple[float, ...] = ()
    ttft_counts: tuple[int, ...] = ()
    # Of requests and errors, those at batch priority (job items): the histogram
    # leaves them out (their first token waits behind every interactive request).
    batch_requests: int = 0
    batch_errors: int = 0

    @property
    def error_rate(self) -> float:
        """Returns errors / requests (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    def added(self, other: Window) -> Window:
        """Returns both windows' figures summed (a histogram of other bounds is left out)."""
        bounds, counts = self.ttft_bounds_ms, self.ttft_counts
        if not bounds:
            bounds, counts = other.ttft_bounds_ms, other.ttft_counts
        elif other.ttft_bounds_ms == bounds and len(other.ttft_counts) == len(counts):
            counts = tuple(a + b for a, b in zip(counts, other.ttft_counts, strict=True))
        return Window(
            self.requests + other.requests,
            self.errors + other.errors,
            bounds,
            counts,
            self.batch_requests + other.batch_requests,
            self.batch_errors + other.batch_errors,
        )

    @property
    def ttft_samples(self) -> int:
        """Returns how many requests the TTFT histogram holds."""
        return sum(self.ttft_counts)

    @property
    def completed(self) -> int:
        """Returns the interactive requests (the ones the TTFT histogram times) that
        ended without a server error."""
        interactive = self.requests - self.batch_requests
        return max(interactive - (self.errors - self.batch_errors), 0)

    @property
    def batch_only(self) -> bool:
        """Whether every request it has ran at batch priority (at least one did)."""
        return self.batch_requests > 0 and self.batch_requests == self.requests

    @property
    def untimed(self) -> int:
        """Returns the requests that ended without an error and without a first token
        (cancelled, or past their deadline, before it: a worker records them with TTFT 0
        and the histogram leaves them out). At least this many: an error after the
        first token counts in both `errors` and the histogram."""
        return max(self.completed - self.ttft_samples, 0)

    def ttft_p99_ms(self) -> float:
        """Returns the TTFT p99 read from the histogram (the bucket's upper bound; 0: none).

        Under 100 requests it is their slowest's: the gate (ttft_checks) does not
        compare it as it stands."""
        return self.ttft_quantile_ms(0.99)

    def ttft_quantile_ms(self, q: float) -> float:
        """Returns the TTFT `q`-quantile read from the histogram (the bucket's upper
        bound; 0: none)."""
        total = self.ttft_samples
        if not total or not self.ttft_bounds_ms:  # no bounds: a worker's bad report
            return 0.0
        rank = math.ceil(q * total)
        seen = 0
        for index, count in enumerate(self.ttft_counts):
            seen += count
            if seen >= rank:
                return self._edges(index)[1]
        return self.ttft_bounds_ms[-1]

    def _edges(self, index: int) -> tuple[float, float]:
        """Returns a bucket's lower and upper TTFT (the last: its bound x 1.25)."""
        bounds = self.ttft_bounds_ms
        lower = bounds[index - 1] if index else 0.0
        upper = bounds[index] if index < len(bounds) else bounds[-1] * 1.25
        return lower, upper

    def ttft_estimate_ms(self, q: float) -> float:
        """Returns the TTFT `q`-quantile interpolated within its bucket (requests spread
        evenly in it; 0: none). The gate's: a bucket's upper bound is up to 25% above
        what its requests took, which let a canary 1.9x slower than the stable version
        pass a 1.5x bound whatever its size."""
        total = self.ttft_samples
        if not total or not self.ttft_bounds_ms:
            return 0.0
        rank = q * total
        seen = 0
        for index, count in enumerate(self.ttft_counts):
            if count and seen + count >= rank:
                lower, upper = self._edges(index)
                return lower + (upper - lower) * max(0.0, rank - seen) / count
            seen += count
        return self.ttft_bounds_ms[-1]

    def ttft_slower_than(self, bound_ms: float) -> float:
        """Returns how many requests were slower than `bound_ms`: every request of a
        bucket above it, and the share above it of the bucket that holds it (its
        requests spread evenly; 0: no bounds)."""
        if not self.ttft_bounds_ms:
            return 0.0
        slower = 0.0
        for index, count in enumerate(self.ttft_counts):
            lower, upper = self._edges(index)
            if count and upper > bound_ms:
                slower += count * min(1.0, (upper - bound_ms) / (upper - lower))
        return slower

    def plus(self, counts: VersionCounts, base: VersionCounts | None) -> Window:
        """Adds one worker's counts since `base` (all of them when it restarted since)."""
        if base is not None and _counters_restarted(counts, base):
            base = None  # the version was reloaded: its counters started again
        requests = counts.requests - (base.requests if base else 0)
        errors = counts.errors - (base.errors if base else 0)
        batch_requests = counts.batch_requests - (base.batch_requests if base else 0)
        batch_errors = counts.batch_errors - (base.batch_errors if base else 0)
        ttft = [c - (base.ttft_counts[i] if base else 0) for i, c in enumerate(counts.ttft_counts)]
        summed = list(self.ttft_counts) or [0] * len(ttft)
        bounds = self.ttft_bounds_ms or counts.ttft_bounds_ms
        if len(summed) != len(ttft) or not bounds or counts.ttft_bounds_ms != bounds:
            # Other bucket bounds (or none: a bad report) are not comparable: left out.
            # A report without bounds, added first, set the shape: every other
            # worker was left out and the version's p99 read 0 (the gate passed it).
            return self
        return Window(
            self.requests + requests,
            self.errors + errors,
            bounds,
            tuple(a + max(b, 0) for a, b in zip(summed, ttft, strict=True)),
            self.batch_requests + batch_requests,
            self.batch_errors + batch_errors,
        )


@dataclass(frozen=True)
class Decision:
    """Decision is one rollout decision."""

    at: float
    action: str
    weight: int
    reason: str


@dataclass(frozen=True)
class Rollout:
    """Rollout is one model's rollout, as stored in Redis."""

    model: str
    version: str
    stable: str
    policy: Policy
    state: str
    step_index: int
    step_started_at: float
    created_at: float
    # Counters at the start of the step: {worker id: [counts of version, of stable]}
    # (a worker's that restarted during the step: its new run's zero, see carried).
    baseline: Mapping[str, tuple[VersionCounts, ...]] = field(default_factory=dict)
    reason: str = ""
    decisions: tuple[Decision, ...] = ()
    # {version: what runs of its workers that ended during the step had counted in it,
    # and a failed request for each run that died} (carry_restarts).
    carried: Mapping[str, Window] = field(default_factory=dict)

    @property
    def weight(self) -> int:
        """Returns the new version's share now."""
        if self.state in (ROLLED_BACK, ABORTED):
            return 0
        return self.policy.steps[self.step_index]

    def to_json(self) -> str:
        """Serialises the rollout for Redis."""
        data = asdict(self)
        data["baseline"] = {w: [asdict(c) for c in cs] for w, cs in self.baseline.items()}
        data["carried"] = {v: asdict(w) for v, w in self.carried.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Rollout:
        """Parses a rollout stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        policy = data["policy"]
        return cls(
            model=data["model"],
            version=data["version"],
            stable=data["stable"],
            policy=Policy(**{**known_fields(Policy, policy), "steps": tuple(policy["steps"])}),
            state=data["state"],
            step_index=int(data["step_index"]),
            step_started_at=float(data["step_started_at"]),
            created_at=float(data["created_at"]),
            baseline={
                w: tuple(VersionCounts.from_json(c) for c in cs)
                for w, cs in data["baseline"].items()
            },
            reason=data.get("reason", ""),
            decisions=tuple(
                Decision(**known_fields(Decision, d)) for d in data.get("decisions", ())
            ),
            carried={v: _window_of(w) for v, w in data.get("carried", {}).items()},
        )

    def decided(self, decision: Decision) -> Rollout:
        """Returns the rollout with `decision` recorded (the history is bounded)."""
        history = (*self.decisions, decision)[-MAX_DECISIONS:]
        return replace(self, reason=decision.reason, decisions=history)


# Errors of a stored rollout this replica cannot read (a hand edit, a field of a newer
# release it cannot take: an unknown state, a step index past the steps).
_UNREADABLE = (ValueError, KeyError, TypeError, IndexError, AttributeError)
# The unreadable documents already logged, by model: a tick reads them twice a second.
_reported_unreadable: dict[str, str | bytes] = {}


def readable_rollouts(stored: Mapping[Any, str | bytes]) -> list[Rollout]:
    """Returns the rollouts of `stored` (model -> document) that read, by model name.

    One that does not is left out and logged once (per document): it raised out of
    every tick, so no other model's rollout was driven, and every replica's task
    failed until each reported NOT_SERVING.
    """
    return [rollout for _, _, rollout in _readable(stored)]


def _readable(stored: Mapping[Any, str | bytes]) -> list[tuple[Any, str | bytes, Rollout]]:
    """Returns (hash field, document, rollout) of each readable rollout of `stored`."""
    found = []
    for model, raw in sorted(stored.items(), key=lambda kv: text(kv[0])):
        try:
            rollout = Rollout.from_json(raw)
            rollout.weight  # noqa: B018 - a step index past the steps raises here, not later
        except _UNREADABLE as exc:
            name = text(model)
            if _reported_unreadable.get(name) != raw:
                _reported_unreadable[name] = raw
                logger.error("rollout of %s is unreadable, left out: %r", name, exc)
            continue
        found.append((model, raw, rollout))
    return found


def counts_of(worker: WorkerEntry, model: str, version: str) -> VersionCounts | None:
    """Returns a worker's counters of one version (None: it reports none)."""
    return next((c for c in worker.outcomes if (c.model, c.version) == (model, version)), None)


def baseline_of(
    workers: Sequence[WorkerEntry], model: str, versions: Sequence[str]
) -> dict[str, tuple[VersionCounts, ...]]:
    """Returns every worker's counters of `versions` now (a step's starting point)."""
    found: dict[str, tuple[VersionCounts, ...]] = {}
    for worker in workers:
        counts = [counts_of(worker, model, v) for v in versions]
        found[worker.worker_id] = tuple(c for c in counts if c is not None)
    return found


def _counters_restarted(counts: VersionCounts, base: VersionCounts) -> bool:
    """Whether a worker's counters started again since `base`: any of them is lower.

    Requests alone missed a worker that restarted under its id and served past
    its old count: (100 requests, 10 errors) then (150, 2) read as 50 requests
    and -8 errors, which hid other workers' errors from the error gate. Counts
    alone miss one that served past every old count: (1000, 8) then (1005, 9)
    read as 5 requests and 1 error, and a healthy canary rolled back. A worker
    that names its counters' run (`counters_id`) tells it at once.
    """
    return (
        counts.counters_id != base.counters_id
        or counts.requests < base.requests
        or counts.errors < base.errors
        or counts.batch_requests < base.batch_requests
        or counts.batch_errors < base.batch_errors
        or len(base.ttft_counts) != len(counts.ttft_counts)
        or any(c < b for c, b in zip(counts.ttft_counts, base.ttft_counts, strict=False))
    )


def window(rollout: Rollout, workers: Sequence[WorkerEntry], version: str) -> Window:
    """Returns one version's figures since the step started, over every worker."""
    total = Window()
    for worker in workers:
        counts = counts_of(worker, rollout.model, version)
        if counts is None:
            continue
        base = next(
            (c for c in rollout.baseline.get(worker.worker_id, ()) if c.version == version), None
        )
        total = total.plus(counts, base)
    return total.added(rollout.carried.get(version, Window()))


def _window_of(data: Mapping[str, Any]) -> Window:
    """Returns a Window stored as `asdict` wrote it."""
    fields = known_fields(Window, data)
    for name in ("ttft_bounds_ms", "ttft_counts"):
        fields[name] = tuple(fields.get(name, ()))
    return Window(**fields)


# A worker's counters of a version as last read, and whether it was leaving then
# (draining: a graceful stop, which cuts nothing): (model, worker id, version) -> that.
LastSeen = dict[tuple[str, str, str], tuple[VersionCounts, bool]]
# The most kept; past it the driver starts again (a run it did not read is carried as
# nothing, as after a takeover).
MAX_LAST_SEEN = 10_000


def carry_restarts(
    rollout: Rollout, workers: Sequence[WorkerEntry], last_seen: LastSeen
) -> Rollout:
    """Returns the rollout with its workers' ended counter runs carried (the same rollout
    when none ended since the last look), and updates `last_seen`.

    A worker that restarts reports counters from 0 (a new `counters_id`): the step
    counted its new run alone, so what the old run had counted this step, errors
    included, was lost, and a canary that crashed every 29 requests waited for its
    50 "for traffic" at its share for good (one crashing every 60 advanced). Now
    that run's figures as last read stay in `carried`, with one failed request for
    a run that ended without draining (it died, cutting what it ran: requests no
    worker counts); its baseline becomes its new run's zero. A run this replica did
    not read (the driver just took over) is carried as nothing.
    """
    baseline = {w: tuple(cs) for w, cs in rollout.baseline.items()}
    carried = dict(rollout.carried)
    changed = False
    for worker in workers:
        leaving = worker.state == DRAINING or worker.self_drained
        for version in (rollout.version, rollout.stable):
            counts = counts_of(worker, rollout.model, version)
            if counts is None:
                continue
            key = (rollout.model, worker.worker_id, version)
            previous = last_seen.get(key)
            last_seen[key] = (counts, leaving)
            bases = baseline.get(worker.worker_id, ())
            base = next((c for c in bases if c.version == version), None)
            if base is not None and not _counters_restarted(counts, base):
                continue
            if base is not None and previous is not None:
                old, was_leaving = previous
                if not _counters_restarted(old, base):
                    ended = Window().plus(old, base)
                    if not was_leaving:
                        ended = ended.added(Window(requests=1, errors=1))
                    carried[version] = carried.get(version, Window()).added(ended)
            zero = replace(
                counts,
                requests=0,
                errors=0,
                ttft_counts=tuple(0 for _ in counts.ttft_counts),
                batch_requests=0,
                batch_errors=0,
            )
            # (A worker that joined during the step gets its run's zero too: its run
            # counted from 0 as before, and a restart of it now shows.)
            baseline[worker.worker_id] = (*(c for c in bases if c.version != version), zero)
            changed = True
    if not changed:
        return rollout
    return replace(rollout, baseline=baseline, carried=carried)


def error_breach(policy: Policy, canary: Window, stable: Window) -> str:
    """Returns why the canary's errors break the policy ("" when they do not).

    Its errors must show, with 99.9% confidence, a rate above `max_error_rate`, as
    if every request still needed to reach `min_requests` had succeeded: more of
    them than a version at that rate makes over max(requests, min_requests) but
    0.1% of the time (`breach_count`). An observed rate alone rolled back healthy
    canaries: one error among the first 50 (budget 0.5) did, for a version whose
    true rate was half the policy's 22% of the time a step. A canary failing
    every request still rolls back at its fifth (policy 1%, 50 requests).
    """
    if policy.max_error_rate >= 1:
        return ""  # no rate is above 100%
    looked_at = max(canary.requests, policy.min_requests)
    needed = breach_count(looked_at, 1.0 - policy.max_error_rate, ERROR_GATE_ALPHA)
    if canary.errors >= needed and canary.error_rate > stable.error_rate:
        return (
            f"error rate {canary.error_rate:.3f} > {policy.max_error_rate:g} with 99.9% "
            f"confidence ({canary.errors} of {canary.requests} requests, {needed} show it; "
            f"stable {stable.error_rate:.3f})"
        )
    return ""


# Pure, and up to ~30 ms for a step of 300,000 requests: a tick reads it a few times per
# rollout (the TTFT checks, the untimed allowance), with the same figures tick after tick.
@functools.lru_cache(maxsize=1024)
def breach_count(requests: int, q: float = 0.99, alpha: float = TTFT_GATE_ALPHA) -> int:
    """Returns how many of `requests` must be slower than a bound to show, with
    confidence 1 - `alpha`, that their `q`-quantile is above it: the fewest c with
    P(Binomial(requests, 1 - q) >= c) <= alpha (requests + 1: no count shows it)."""
    p = 1.0 - q
    if requests > TTFT_GATE_EXACT_UP_TO:
        z = statistics.NormalDist().inv_cdf(1 - alpha)
        return math.floor(requests * p + z * math.sqrt(requests * p * (1 - p))) + 1
    log_odds = math.log(p / (1 - p))
    log_pmf = requests * math.log1p(-p)  # P(X = 0)
    cdf = 0.0
    for k in range(requests + 1):
        cdf += math.exp(log_pmf)
        if 1.0 - cdf <= alpha:
            return k + 1
        if k < requests:
            log_pmf += math.log((requests - k) / (k + 1)) + log_odds
    return requests + 1


@dataclass(frozen=True)
class TtftCheck:
    """TtftCheck is the TTFT gate's reading of one quantile over a step (`ttft_checks`).

    Attributes:
        name: "p99" or "p90".
        canary_ms: the canary's quantile, interpolated within its histogram
            bucket (Window.ttft_estimate_ms); inf when it falls among the requests
            that never got a first token.
        stable_ms: the stable version's.
        bound_ms: max_ttft_p99_ratio x stable_ms (0: no bound, the gate passes).
        slow: the canary's requests slower than the bound (Window.ttft_slower_than),
            with those counted for never getting a first token (`untimed`).
        needed: how many would show its quantile above the bound (breach_count).
        samples: the canary's requests the check reads: those with a first token,
            and `untimed`.
        untimed: the canary's requests without a first token beyond what the stable
            version's share of them explains (untimed_allowed): slower than any bound.
    """

    name: str
    canary_ms: float
    stable_ms: float
    bound_ms: float = 0.0
    slow: float = 0.0
    needed: int = 0
    samples: int = 0
    untimed: int = 0

    @property
    def broken(self) -> bool:
        """Whether the canary's quantile is above the bound (with the gate's confidence)."""
        return self.bound_ms > 0 and self.slow >= self.needed


def untimed_share_bound(stable: Window) -> float:
    """Returns the most the stable version's true share of requests without a first
    token can be, with the gate's confidence (TTFT_GATE_ALPHA): the Wilson score
    interval's upper end. A step's stable requests only estimate it (a stable step of
    60 requests that happened to show none made every cancelled canary request count
    as slow)."""
    z = statistics.NormalDist().inv_cdf(1 - TTFT_GATE_ALPHA)
    return wilson_interval(stable.untimed, stable.completed, z)[1]


def wilson_interval(hits: int, total: int, z: float) -> tuple[float, float]:
    """Returns the Wilson score interval of a share `hits / total` at normal quantile
    `z` ((0, 1) without any)."""
    if total <= 0:
        return 0.0, 1.0
    share, z2 = hits / total, z * z
    centre = share + z2 / (2 * total)
    spread = z * math.sqrt(share * (1 - share) / total + z2 / (4 * total * total))
    return max(0.0, (centre - spread) / (1 + z2 / total)), min(
        1.0, (centre + spread) / (1 + z2 / total)
    )


def untimed_allowed(canary: Window, stable: Window) -> int:
    """Returns how many of the canary's requests without a first token the stable
    version's share of them explains: the most that share (at its upper bound) leaves
    among the canary's completed requests by chance (TTFT_GATE_ALPHA). Clients'
    cancels and deadlines hit both versions alike; a canary that hangs, or is slower
    than the deadlines, has more."""
    share = untimed_share_bound(stable)
    if share >= 1.0:
        return canary.completed
    return min(canary.completed, breach_count(canary.completed, 1.0 - share) - 1)


def _untimed_counted(canary: Window, stable: Window) -> int:
    """Returns the canary's requests without a first token that the gate counts as
    slower than any bound (none when the stable version has no TTFT to compare with)."""
    if not stable.ttft_samples:
        return 0
    return max(canary.untimed - untimed_allowed(canary, stable), 0)


def _canary_quantile_ms(canary: Window, untimed: int, q: float) -> float:
    """Returns the canary's TTFT `q`-quantile with `untimed` requests above every bucket
    (inf when it falls among them)."""
    if not untimed:
        return canary.ttft_estimate_ms(q)
    rank = q * (canary.ttft_samples + untimed)
    if rank > canary.ttft_samples:
        return math.inf
    return canary.ttft_estimate_ms(rank / canary.ttft_samples)


def ttft_checks(policy: Policy, canary: Window, stable: Window) -> tuple[TtftCheck, ...]:
    """Reads the TTFT gate: the canary's p99, then p90, against `max_ttft_p99_ratio`
    times the stable version's.

    A quantile within the bound leaves at most 1 - q of the canary's requests above
    it; each check breaks only when more are, by more than chance explains
    (TTFT_GATE_ALPHA). With the same latencies on both versions neither breaks
    whatever the step's size (98.5% at 100 ms, 1% at 300 ms, 0.5% at 600 ms rolled
    back one 50-request step in five when the gate compared the canary's slowest
    request). A canary slower across the board breaks the p90 check from 14 of 50
    requests above the bound and the p99 one from 5; one slower in its tail only
    breaks the p99 check once the step has the requests to show it.

    The canary's requests that never got a first token, beyond what the stable
    version's share of them explains (untimed_allowed), count as slower than the
    bound: left out, a canary slower than its clients' deadlines (each request
    cancelled before its first token) read as a p99 of 0 and was promoted.
    """
    untimed = _untimed_counted(canary, stable)
    samples = canary.ttft_samples + untimed
    checks = []
    for q in TTFT_GATE_QUANTILES:
        name = f"p{round(q * 100)}"
        canary_ms = _canary_quantile_ms(canary, untimed, q)
        stable_ms = stable.ttft_estimate_ms(q)
        if not samples or not stable.ttft_samples or stable_ms <= 0:
            checks.append(TtftCheck(name, canary_ms, stable_ms))
            continue
        bound = policy.max_ttft_p99_ratio * stable_ms
        slow = canary.ttft_slower_than(bound) + untimed
        needed = breach_count(samples, q)
        checks.append(TtftCheck(name, canary_ms, stable_ms, bound, slow, needed, samples, untimed))
    return tuple(checks)


def _ms(value: float) -> str:
    return f"{value:.0f}ms" if math.isfinite(value) else "never (no first token)"


def ttft_breach(policy: Policy, canary: Window, stable: Window) -> str:
    """Returns why the canary's TTFT breaks the policy ("" when it does not or cannot)."""
    for check in ttft_checks(policy, canary, stable):
        if check.broken:
            untimed = (
                f", {check.untimed} of them without a first token beyond what the stable "
                f"version's {stable.untimed} of {stable.completed} explain"
                if check.untimed
                else ""
            )
            return (
                f"ttft {check.name} {_ms(check.canary_ms)} > {policy.max_ttft_p99_ratio:g} x "
                f"stable {check.stable_ms:.0f}ms ({check.slow:.0f} of {check.samples} "
                f"requests above {check.bound_ms:.0f}ms{untimed}; a {check.name} within it "
                f"leaves up to {check.needed - 1} by chance)"
            )
    return ""


def ttft_wait(policy: Policy, canary: Window, stable: Window) -> str:
    """Returns what the TTFT gate waits for before the step may pass ("" when nothing).

    The stable version is the yardstick: without its requests this step (an empty
    stable window) or its first tokens while the canary has some (a generative
    model), the gate passed a canary it had compared with nothing. Without first
    tokens on either version (an embedding model; every request cancelled) there is
    no TTFT to compare. A generative canary must also show `min_requests` requests
    the gate can read: a step whose requests were mostly cancelled before their
    first token proved nothing about the ones that were not.
    """
    if not stable.completed:
        if stable.batch_only and (canary.batch_only or not canary.requests):
            return ""  # job items only: their TTFTs are queue time, no gate reads them
        return (
            f"waiting for the stable version's traffic: none of its {stable.requests} "
            "requests this step completed, to compare with"
        )
    if not stable.ttft_samples:
        if not canary.ttft_samples:
            return ""
        return (
            f"waiting for the stable version's first tokens: none of its {stable.completed} "
            f"requests this step got one ({canary.ttft_samples} of the canary's did)"
        )
    samples = canary.ttft_samples + _untimed_counted(canary, stable)
    if samples >= policy.min_requests:
        return ""
    return (
        f"waiting for timed requests: {samples}/{policy.min_requests} ({canary.untimed} of "
        f"{canary.completed} completed without a first token, "
        f"{untimed_allowed(canary, stable)} explained by the stable version's "
        f"{stable.untimed} of {stable.completed})"
    )


def _ttft_held(checks: Sequence[TtftCheck]) -> str:
    """Describes TTFT checks that held, e.g. "ttft p99 646ms (stable 331ms; 1 above
    496ms, within chance), p90 108ms (stable 108ms)"."""
    parts = []
    for check in checks:
        slow = (
            f"; {check.slow:.0f} above {check.bound_ms:.0f}ms, within chance"
            if check.slow and check.bound_ms
            else ""
        )
        parts.append(f"{check.name} {_ms(check.canary_ms)} (stable {check.stable_ms:.0f}ms{slow})")
    return "ttft " + ", ".join(parts)


def _untimed_held(canary: Window, stable: Window) -> str:
    """Describes the canary's requests without a first token, if any, for a step that held."""
    if not canary.untimed:
        return ""
    return (
        f", {canary.untimed} without a first token (stable {stable.untimed} of {stable.completed})"
    )


def decide(
    rollout: Rollout,
    canary: Window,
    stable: Window,
    now: float,
    canary_workers: int = 1,
    canary_routable: int = 1,
) -> tuple[str, str]:
    """Returns (action, reason) for a running rollout: hold, advance, succeed or rollback.

    canary_workers: the workers serving the new version now. With none, its share
    of the traffic fails at the edge (503, no upstream), where no worker counts
    it: the step waited for traffic for good. A step without one for its whole
    time, and at least NO_WORKER_GRACE_S, rolls back.
    canary_routable: the new version's workers the edge may send to now. With none
    (its only worker draining, or dead within the grace), the step holds: it
    advanced, or succeeded to 100%, onto a version with no endpoint, and every
    request of the model failed 503 under a rollout that read SUCCEEDED.
    """
    policy = rollout.policy
    broken = error_breach(policy, canary, stable)
    if broken:
        return "rollback", broken
    elapsed = now - rollout.step_started_at
    if not canary_workers and elapsed >= max(policy.step_s, NO_WORKER_GRACE_S):
        return "rollback", f"no worker served {rollout.version} for {elapsed:.0f}s"
    if elapsed < policy.step_s:
        return "hold", f"observing step {rollout.weight}% ({elapsed:.0f}/{policy.step_s:g}s)"
    if canary.requests < policy.min_requests:
        return "hold", f"waiting for traffic: {canary.requests}/{policy.min_requests} requests"
    broken = ttft_breach(policy, canary, stable)
    if broken:
        return "rollback", broken
    waiting = ttft_wait(policy, canary, stable)
    if waiting:
        return "hold", waiting
    if not canary_routable:
        return "hold", f"waiting for a routable worker of {rollout.version} to move traffic"
    held = (
        f"error rate {canary.error_rate:.3f} (stable {stable.error_rate:.3f}), "
        f"{_ttft_held(ttft_checks(policy, canary, stable))} over {canary.requests} requests"
        f"{_untimed_held(canary, stable)}"
    )
    if rollout.step_index + 1 >= len(policy.steps) - 1:
        return "succeed", held
    return "advance", held


def split_for(model: ModelEntry, rollout: Rollout, weight: int) -> ModelEntry:
    """Returns the model with `weight`% on the new version and the rest on the stable one."""
    return cat.set_split(model, _target_split(rollout, weight))


def audit_entry(rollout: Rollout, decision: Decision) -> usage_pb2.AuditEntry:
    """Returns the audit log's record of a rollout decision."""
    entry = usage_pb2.AuditEntry(
        tenant=AUDIT_TENANT,
        rpc="tokenmesh.router.v1.RouterService/rollout",
        model=rollout.model,
        version=rollout.version,
        status="OK" if decision.action != "rollback" else "ROLLED_BACK",
        action=f"rollout.{decision.action}",
        detail=f"{rollout.version} at {decision.weight}%: {decision.reason}",
        request_id=f"rollout-{rollout.model}-{int(rollout.created_at * 1000)}",
    )
    entry.time.FromMilliseconds(int(decision.at * 1000))
    return entry


class RolloutStore:
    """RolloutStore keeps rollouts in Redis and applies their decisions to the catalogue."""

    def __init__(
        self,
        redis: aioredis.Redis,
        catalog: Catalog,
        registry: WorkerRegistry,
        refresh: Callable[[], Awaitable[None]],
    ) -> None:
        self.redis = redis
        self.catalog = catalog
        self.registry = registry
        self.refresh = refresh
        self._compare_and_set = redis.register_script(_COMPARE_AND_SET)
        self._record_audit = redis.register_script(_RECORD_AUDIT)
        # The rollouts' workers' counters as last read (carry_restarts): the driver's.
        self._last_seen: LastSeen = {}
        # The step gauge's (model, version)s this store set: those of rollouts no longer
        # stored (replaced by a newer one) are removed by export_metrics.
        self._shown: set[tuple[str, str]] = set()

    async def get(self, model: str) -> Rollout:
        """Returns a model's rollout; raises NotFound."""
        cat.check_name(model)
        raw = await self.redis.hget(ROLLOUTS_KEY, model)
        if raw is None:
            raise NotFound(f"model {model!r} has no rollout", reason="ROLLOUT_NOT_FOUND")
        return Rollout.from_json(raw)

    async def all(self) -> list[Rollout]:
        """Returns every stored rollout."""
        return readable_rollouts(await self.redis.hgetall(ROLLOUTS_KEY))

    async def start(self, model: str, version: str, policy: Policy, now: float) -> Rollout:
        """Starts a rollout: the new version gets the first step's share now."""
        policy.check()
        cat.check_version(version)
        entry = await self.catalog.get(model)
        stable = _stable_version(entry, version, now)
        raw = await self.redis.hget(ROLLOUTS_KEY, model)
        if raw is not None and Rollout.from_json(raw).state in ACTIVE:
            raise AlreadyExists(
                f"model {model!r} already has a rollout; abort it first",
                reason="ROLLOUT_IN_PROGRESS",
            )
        _check_no_other_versions(entry, stable, version, now)
        workers = placed(await self.registry.all(now), entry)
        rollout = Rollout(
            model=model,
            version=version,
            stable=stable,
            policy=policy,
            state=RUNNING,
            step_index=0,
            step_started_at=now,
            created_at=now,
            baseline=baseline_of(workers, model, (version, stable)),
        )
        decision = Decision(now, "start", policy.steps[0], f"from {stable}, steps {policy.steps}")
        rollout = rollout.decided(decision)
        if not await self._swap(raw, rollout, lease="", started=True):
            raise FailedPrecondition(
                f"the rollout of {model!r} changed meanwhile; try again", reason="ROLLOUT_CHANGED"
            )
        ROLLED_BACK_TOTAL.labels(model, version)  # its series at 0 (every replica: export_metrics)
        await self._apply(rollout, decision)
        return rollout

    async def change_by_hand(
        self,
        model: str,
        change: Callable[[ModelEntry], ModelEntry],
        what: str,
        now: float,
    ) -> ModelEntry:
        """Applies an operator's change of a model's traffic (`what`: a split, a pin) and,
        in the same transaction, aborts its active rollout: the operator's split stands.

        The on-call's emergency lever is `models split`: made while a rollout ran,
        the driver's next step put the canary back to its share. Refused, it would
        block pulling a bad version. The rollout's applied mark is written with it,
        so a decision whose split is still pending never lands over it either.
        """
        cat.check_name(model)
        while True:
            raw, mark = await asyncio.gather(
                self.redis.hget(ROLLOUTS_KEY, model), self.redis.hget(APPLIED_KEY, model)
            )
            stored = None if raw is None else Rollout.from_json(raw)
            reason = (
                f"aborted at {stored.weight if stored else 0}%: the traffic split was set by "
                f"hand ({what}) and stands; start a new rollout to try again"
            )
            # A decision whose split has not landed yet never will: this split stands (a
            # success stored before its 100% move is aborted, not left SUCCEEDED).
            pending = stored is not None and not _same(mark, traffic_of(stored))
            ended, decision, writes = _yielded(stored, reason, now, refused=pending)
            guard = cat.Guard(
                ((ROLLOUTS_KEY, model), (APPLIED_KEY, model)), _unchanged(raw, mark), writes
            )
            updated = await self.catalog.update_if(model, lambda m, _: change(m), guard)
            if updated is None:
                continue  # the rollout changed meanwhile (a tick, an operator): read it again
            if ended is not None and decision is not None:
                self._show_step(ended, updated, now)
                await self._record(ended, decision)
                logger.warning("rollout %s %s: %s", model, ended.version, decision.reason)
            return updated

    async def placed_workers(self, model: str, now: float) -> list[WorkerEntry]:
        """Returns the registered workers whose pool the model's placement admits
        (every one when it is not in the catalogue): see `placed`."""
        try:
            entry: ModelEntry | None = await self.catalog.get(model)
        except NotFound:  # removed from the catalogue: its rollout can still end
            entry = None
        return placed(await self.registry.all(now), entry)

    async def operate(self, model: str, action: str, now: float) -> Rollout:
        """Applies an operator's pause, resume or abort."""
        while True:
            raw = await self.redis.hget(ROLLOUTS_KEY, model)
            if raw is None:
                raise NotFound(f"model {model!r} has no rollout", reason="ROLLOUT_NOT_FOUND")
            rollout = Rollout.from_json(raw)
            changed = _operated(rollout, action, now, await self.placed_workers(model, now))
            decision = Decision(now, action, changed.weight, f"by an operator ({action})")
            changed = changed.decided(decision)
            if await self._swap(raw, changed, lease=""):
                await self._apply(changed, decision)
                return changed

    async def step(self, rollout: Rollout, raw: str | bytes, lease: str, now: float) -> None:
        """Evaluates one running rollout and applies its decision (the lease holder only)."""
        try:
            model = await self.catalog.get(rollout.model)
        except NotFound:  # removed from the catalogue: the split is gone with it
            return
        retired = sunset_during(rollout, model, now)
        if retired:
            ended = replace(rollout, state=ABORTED)
            decision = Decision(now, "abort", 0, retired)
            if await self._swap(raw, ended.decided(decision), lease):
                await self._apply(ended.decided(decision), decision)
            return
        workers = placed(await self.registry.all(now), model)
        # What this look read is kept once what it carried is stored: a refused store
        # reads the ended runs again at the next tick.
        seen = {} if len(self._last_seen) > MAX_LAST_SEEN else dict(self._last_seen)
        carried = carry_restarts(rollout, workers, seen)
        if carried is not rollout:
            if not await self._swap(raw, carried, lease):
                return  # changed meanwhile (an operator, another replica): the next tick
            rollout, raw = carried, carried.to_json()
        self._last_seen = seen
        canary = window(rollout, workers, rollout.version)
        stable = window(rollout, workers, rollout.stable)
        action, reason = decide(
            rollout,
            canary,
            stable,
            now,
            _canary_seen(rollout, workers, now),
            _canary_routable(rollout, workers, now),
        )
        if action == "hold":
            if reason != rollout.reason:
                await self._swap(raw, replace(rollout, reason=reason), lease)
            return
        changed = _after(rollout, action, now, workers)
        decision = Decision(now, action, changed.weight, reason)
        changed = changed.decided(decision)
        if await self._swap(raw, changed, lease):
            await self._apply(changed, decision)

    async def move_traffic(self, rollout: Rollout) -> bool:
        """Sets the model's split to the rollout's share and marks the rollout applied, in
        one transaction, while the stored rollout still asks for that split.

        A decision stored after this one owns the split: a stalled driver's late
        "advance to 50%" landing after an operator's abort (0%) left the canary at
        50% while the abort's mark, written last, read as applied.
        """
        weight = rollout.weight
        if not weight:
            return await self._withdraw(rollout)
        traffic = traffic_of(rollout)
        now = cat.now()

        def may_move(values: Sequence[bytes | str | None], model: ModelEntry | None) -> bool:
            raw, mark = values
            if raw is None or traffic_of(Rollout.from_json(raw)) != traffic:
                return False
            return model is None or split_is_the_rollouts(model, mark, rollout, now)

        guard = cat.Guard(
            ((ROLLOUTS_KEY, rollout.model), (APPLIED_KEY, rollout.model)),
            may_move,
            ((APPLIED_KEY, rollout.model, traffic),),
        )
        try:
            moved = await self.catalog.update_if(
                rollout.model, lambda m, _: split_for(m, rollout, weight), guard
            )
        except Unavailable as exc:
            # The catalogue kept changing under this write (Catalog.change_if gave
            # up). The decision is stored and not marked applied: the next tick moves
            # its split (raised, it ended the tick for every model, and five in a row
            # made the router report NOT_SERVING).
            logger.warning("rollout %s: %d%% not applied yet: %s", rollout.model, weight, exc)
            return False
        if moved is None:
            if not await self._yield_to_hand_split(rollout, now):
                logger.info(
                    "rollout %s: a later decision owns the split; %d%% not applied",
                    rollout.model,
                    weight,
                )
            return False
        await self.refresh()
        # The gauge follows the split: a refused or deferred move leaves it to the
        # decision whose split lands (that decision's, or the tick's that moves it).
        self._show_step(rollout, moved, cat.now())
        return True

    async def _withdraw(self, rollout: Rollout) -> bool:
        """Takes a rolled-back or aborted rollout's new version to 0% (without_canary) and
        marks it applied, in one transaction, while the stored rollout still asks for
        that and its mark does not already record it.

        Unlike a step's, this move lands on a split changed outside the rollout (an
        older replica's, a hand edit) too: only the canary's share moves, to the stable
        version, and the rest of that split stands. Refused like a step, a rollback
        left a bad canary its share while TokenmeshRolloutRolledBack fired, and an
        operator's `rollout abort` left it too. A split by hand made after the decision
        (change_by_hand marks the decision applied with it) stands.
        """
        traffic = traffic_of(rollout)
        now = cat.now()
        # The split the landing transaction found, when the rollout had not set it (the
        # log names it: the operator's outside split was changed, if only in part).
        outside: list[ModelEntry] = []

        def pending(values: Sequence[bytes | str | None], model: ModelEntry | None) -> bool:
            raw, mark = values
            if raw is None or traffic_of(Rollout.from_json(raw)) != traffic:
                return False  # a later decision owns the split
            if mark is not None and text(mark) == traffic:
                return False  # applied: moved already, or a split by hand since stands
            theirs = model is not None and not split_is_the_rollouts(model, mark, rollout, now)
            outside[:] = [model] if theirs and model is not None else []
            return True

        guard = cat.Guard(
            ((ROLLOUTS_KEY, rollout.model), (APPLIED_KEY, rollout.model)),
            pending,
            ((APPLIED_KEY, rollout.model, traffic),),
        )
        try:
            moved = await self.catalog.update_if(
                rollout.model, lambda m, _: without_canary(m, rollout), guard
            )
        except Unavailable as exc:  # as in move_traffic: the next tick moves it
            logger.warning("rollout %s: 0%% not applied yet: %s", rollout.model, exc)
            return False
        if moved is None:
            logger.info(
                "rollout %s: a later decision or a split by hand owns the split; 0%% not applied",
                rollout.model,
            )
            return False
        if outside:
            logger.warning(
                "rollout %s %s: %s: the traffic split had been changed outside the rollout "
                "(%s); the new version's share went to %s and the rest of it stands (now %s)",
                rollout.model,
                rollout.version,
                rollout.state,
                _split_text(outside[0]),
                rollout.stable,
                _split_text(moved),
            )
        await self.refresh()
        self._show_step(rollout, moved, now)
        return True

    async def _yield_to_hand_split(self, rollout: Rollout, now: float) -> bool:
        """When the live split is not one `rollout` set (changed outside it: an older
        replica's split, a hand edit), aborts the rollout if it is still active and
        marks the split applied, in one transaction that checks both again: the
        split is left as it is. Returns False when that is not why `rollout`'s move
        was refused (a later decision owns the split)."""
        raw, live = await asyncio.gather(
            self.redis.hget(ROLLOUTS_KEY, rollout.model), self.catalog.get(rollout.model)
        )
        if raw is None or traffic_of(stored := Rollout.from_json(raw)) != traffic_of(rollout):
            return False
        outside = (
            f"the traffic split was changed outside the rollout (now {_split_text(live)}); "
            f"its {rollout.weight}% was not applied and the split is left as it is"
        )
        ended, decision, writes = _yielded(stored, f"aborted: {outside}", now, refused=True)

        def changed_outside(values: Sequence[bytes | str | None], model: ModelEntry | None) -> bool:
            current, mark = values
            return (
                _same(current, raw)
                and model is not None
                and not split_is_the_rollouts(model, mark, rollout, now)
            )

        guard = cat.Guard(
            ((ROLLOUTS_KEY, rollout.model), (APPLIED_KEY, rollout.model)), changed_outside, writes
        )
        try:
            kept = await self.catalog.update_if(rollout.model, lambda m, _: m, guard)
        except Unavailable:
            return True  # the next tick sees the same split and tries again
        if kept is None:
            return False
        # A rollout still active, or the success whose move this was, is aborted.
        said = decision.reason if decision is not None else f"{stored.state}: {outside}"
        logger.warning("rollout %s %s: %s", rollout.model, rollout.version, said)
        if ended is not None and decision is not None:
            self._show_step(ended, kept, now)
            await self._record(ended, decision)
        return True

    def _show_step(self, rollout: Rollout, model: ModelEntry, now: float) -> None:
        """Sets the step gauges: the rolled-out version's share of the model's split, and
        how long its step has lasted (in step durations) while it runs."""
        labels = (rollout.model, rollout.version)
        STEP_PERCENT.labels(*labels).set(model.effective_weights(now).get(rollout.version, 0))
        held = (now - rollout.step_started_at) / rollout.policy.step_s
        STEP_HELD_RATIO.labels(*labels).set(max(held, 0.0) if rollout.state == RUNNING else 0.0)
        self._shown.add(labels)

    async def export_metrics(self, now: float) -> None:
        """Exports every stored rollout's metrics from Redis (every replica, every tick):
        its version's share of the catalogue's split, and its rolled-back counter's
        series (0 until a rollback).

        Set only by the replica that applied a decision, the step gauge of a
        replica that lost the lease, or of the driver after another replica served
        an abort, went on showing the canary's old share (dashboards read the
        largest); a counter series born at its first rollback read as no increase,
        and the alert never fired.
        """
        stored = readable_rollouts(await self.redis.hgetall(ROLLOUTS_KEY))
        models = await self.catalog.all() if stored else {}
        shown = self._shown
        self._shown = set()
        for rollout in stored:
            ROLLED_BACK_TOTAL.labels(rollout.model, rollout.version)
            model = models.get(rollout.model)
            if model is not None:
                self._show_step(rollout, model, now)
        for labels in shown - self._shown:  # a newer rollout of the model replaced it
            for gauge in (STEP_PERCENT, STEP_HELD_RATIO):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    async def _swap(
        self, raw: str | bytes | None, rollout: Rollout, lease: str, started: bool = False
    ) -> bool:
        """Stores `rollout` if the stored one is still `raw` (and `lease` still holds);
        `started`: a new rollout, whose applied mark is empty until its split
        moves. Without one, a start whose split update failed read as a rollout from
        before the marks, and its canary stayed at 0% for good."""
        expected = b"" if raw is None else raw
        args: list[str | bytes] = [
            rollout.model,
            expected,
            rollout.to_json(),
            lease,
            "1" if started else "0",
        ]
        keys = [ROLLOUTS_KEY, LEASE_KEY, APPLIED_KEY]
        return bool(await self._compare_and_set(keys=keys, args=args))

    async def _apply(self, rollout: Rollout, decision: Decision) -> None:
        """Moves the traffic, records the decision in the audit log and the metrics."""
        weight = rollout.weight
        if decision.action in ("pause", "resume"):  # they move no traffic
            STEP_PERCENT.labels(rollout.model, rollout.version).set(weight)
            self._shown.add((rollout.model, rollout.version))
            moved = True
        else:
            moved = await self.move_traffic(rollout)  # it sets the gauge when it lands
        if decision.action == "rollback":
            ROLLED_BACK_TOTAL.labels(rollout.model, rollout.version).inc()
        await self._record(rollout, decision)
        logger.info(
            "rollout %s %s: %s -> %d%%%s (%s)",
            rollout.model,
            rollout.version,
            decision.action,
            weight,
            "" if moved else " (the split is left to a later decision or the next tick)",
            decision.reason,
        )

    async def _record(self, rollout: Rollout, decision: Decision) -> None:
        """Writes a decision to the audit log."""
        entry = audit_entry(rollout, decision)
        key = f"{USAGE_PREFIX}audit:{AUDIT_TENANT}"
        stamp = int(decision.at * 1000)
        # Trimmed by Redis's clock, as the meter trims the tenants' logs: trimmed from
        # the decision's stamp (a driver clock far ahead) it erased the log.
        member = audit_member(entry)
        await self._record_audit(keys=[key], args=[stamp, member, AUDIT_RETENTION_MS])


def placed(workers: Sequence[WorkerEntry], model: ModelEntry | None) -> list[WorkerEntry]:
    """Returns the workers whose pool the model's placement admits (every one for None):
    only their counters and leases judge, and show, its rollout (another pool's worker
    claiming the version, unrouted for it, passed or failed a canary with made-up
    counts)."""
    return [w for w in workers if model is None or model.admits(w.pool)]


def _canary_seen(rollout: Rollout, workers: Sequence[WorkerEntry], now: float) -> int:
    """Returns 1 unless no worker has served the new version for NO_WORKER_GRACE_S.

    A worker's lease ending within the grace counts (a restart, a drain, a late
    heartbeat: a moment without one must not roll a healthy canary back), and so
    does a registry where no worker is routable at all (Redis just came back:
    every lease lapsed meanwhile, the canary's as much as the stable's).
    """
    if not any(w.routable(now) for w in workers):
        return 1
    key = (rollout.model, rollout.version)
    seen = max((w.lease_expires_at for w in workers if key in w.models), default=0.0)
    return int(seen > now - NO_WORKER_GRACE_S)


def sunset_during(rollout: Rollout, model: ModelEntry, now: float) -> str:
    """Returns why a running rollout ends because one of its versions passed its sunset
    ("" when neither did). The stable one's: the catalogue gave the new version all
    of the traffic (the newest serving takes over) while the rollout read its step's
    share, and a rollback could not take any of it back. The new one's: it serves
    nothing more, so there is nothing left to roll out."""
    for label, version in (("stable", rollout.stable), ("new", rollout.version)):
        entry = model.version(version)
        if entry is not None and entry.sunset(now):
            return (
                f"the {label} version {version} passed its sunset during the rollout; "
                "the traffic follows the catalogue's split"
            )
    return ""


def _canary_routable(rollout: Rollout, workers: Sequence[WorkerEntry], now: float) -> int:
    """Returns how many workers of the new version the edge may send to now (`decide`)."""
    key = (rollout.model, rollout.version)
    return sum(1 for w in workers if key in w.models and w.routable(now))


def traffic_of(rollout: Rollout) -> str:
    """Returns the split a rollout asks for, as APPLIED_KEY records it (the rest of
    the record, a hold's reason say, changes no traffic)."""
    return f"{rollout.version}:{rollout.weight}|{rollout.stable}:{100 - rollout.weight}"


def _target_split(rollout: Rollout, weight: int) -> dict[str, int]:
    """Returns the split with `weight`% on the new version and the rest on the stable one."""
    weights = {rollout.stable: 100 - weight, rollout.version: weight}
    return {v: w for v, w in weights.items() if w}


def _stored_split(model: ModelEntry) -> dict[str, int]:
    """Returns the model's split as stored (the versions with a weight)."""
    return {v.version: v.weight for v in model.versions if v.weight}


def _marked_split(mark: str) -> dict[str, int]:
    """Returns the split an applied mark records ("2:25|1:75": traffic_of)."""
    split: dict[str, int] = {}
    for part in mark.split("|"):
        version, _, weight = part.rpartition(":")
        if int(weight):
            split[version] = int(weight)
    return split


def split_is_the_rollouts(
    model: ModelEntry, mark: bytes | str | None, rollout: Rollout, now: float
) -> bool:
    """Whether the model's live split is one `rollout` set: the one its applied mark
    records (or the one it asks for now, already in place); before its first split
    (an empty mark), one whose traffic goes to its two versions only, as its start
    checked (`_other_versions`). A pin is never one. No mark: a rollout from before
    the marks, unchecked."""
    if mark is None:
        return True
    if model.pinned:
        return False
    live = _stored_split(model)
    if live == _target_split(rollout, rollout.weight):
        return True
    recorded = text(mark)
    if not recorded:
        return not _other_versions(model, rollout.stable, rollout.version, now)
    return live == _marked_split(recorded)


def without_canary(model: ModelEntry, rollout: Rollout) -> ModelEntry:
    """Returns the model with `rollout`'s new version at 0%: its stored weight added to
    the stable version's, every other weight kept, and a pin to it lifted (a pin to
    another version stays: the new version already has none of its traffic).

    Weights are set as they are, not through set_split: a hand-edited split need not
    sum to 100 (effective_weights scales it), and a rollback must not fail on it."""
    weights = _stored_split(model)
    share = weights.pop(rollout.version, 0)
    if share:
        weights[rollout.stable] = weights.get(rollout.stable, 0) + share
    versions = tuple(replace(v, weight=weights.get(v.version, 0)) for v in model.versions)
    pinned = "" if model.pinned == rollout.version else model.pinned
    return replace(model, versions=versions, pinned=pinned)


def _split_text(model: ModelEntry) -> str:
    """Describes a model's split as an operator sets it ("1=80 3=20", "pinned to 1")."""
    if model.pinned:
        return f"pinned to {model.pinned}"
    return " ".join(f"{v}={w}" for v, w in _stored_split(model).items()) or "no weights"


def _unchanged(
    *read: bytes | str | None,
) -> Callable[[Sequence[bytes | str | None], ModelEntry | None], bool]:
    """Returns a Guard's condition: its fields are still what was `read`."""
    return lambda values, _: all(_same(v, r) for v, r in zip(values, read, strict=True))


def _same(value: bytes | str | None, expected: bytes | str | None) -> bool:
    """Whether a hash field read in a transaction is still what was read before it."""
    if value is None or expected is None:
        return value is expected
    return text(value) == text(expected)


def _yielded(
    stored: Rollout | None, reason: str, now: float, refused: bool = False
) -> tuple[Rollout | None, Decision | None, tuple[tuple[str, str, str], ...]]:
    """Returns what a split the rollout did not set does to it: the rollout aborted for
    `reason` (None: none active), that decision, and the writes that land with the
    split (the aborted rollout, and the applied mark: a decision's pending split,
    moved by a later tick, would land over the split).

    `refused`: the stored decision's own move never lands (this split refused it, or
    stands over it while it is pending). A success is then aborted too: stored
    before its 100% move, it stayed SUCCEEDED while the new version took none of
    the traffic. (A rollback's or abort's 0% always lands: `_withdraw`.)"""
    if stored is None:
        return None, None, ()
    if stored.state not in ACTIVE and not (refused and stored.state == SUCCEEDED):
        return None, None, ((APPLIED_KEY, stored.model, traffic_of(stored)),)
    decision = Decision(now, "abort", 0, reason)
    ended = replace(stored, state=ABORTED).decided(decision)
    return (
        ended,
        decision,
        (
            (ROLLOUTS_KEY, stored.model, ended.to_json()),
            (APPLIED_KEY, stored.model, traffic_of(ended)),
        ),
    )


def _other_versions(entry: ModelEntry, stable: str, version: str, now: float) -> dict[str, int]:
    """Returns the versions besides `stable` and `version` that take traffic, and their
    shares: what a rollout's split would take from them. Read from the effective
    split, by the start's check and by the first move's guard alike: a sunset
    version's stored weight serves nothing (its share already goes to the others).
    The guard read the stored split: a start the check let through was aborted at
    its first move ("the traffic split was changed outside the rollout")."""
    weights = entry.effective_weights(now)
    return {v: w for v, w in weights.items() if v not in (stable, version) and w}


def _check_no_other_versions(entry: ModelEntry, stable: str, version: str, now: float) -> None:
    """Raises FailedPrecondition when a version other than `stable` and `version` takes
    traffic: a rollout sets the split to the two versions it compares, and that
    version's share was silently moved to them (and not given back on abort)."""
    others = _other_versions(entry, stable, version, now)
    if others:
        shares = ", ".join(f"version {v} has {w}%" for v, w in sorted(others.items()))
        raise FailedPrecondition(
            f"model {entry.name!r} sends traffic to versions besides its stable version "
            f"{stable!r} ({shares}): a rollout moves traffic between {stable!r} and "
            f"{version!r} only and would take that share; move it first (e.g. "
            f"`tokenmesh models split {entry.name} {stable}=100`)",
            reason="ROLLOUT_OTHER_VERSIONS",
        )


def _stable_version(entry: ModelEntry, version: str, now: float) -> str:
    found = entry.version(version)
    if found is None or found.sunset(now):
        known = ", ".join(v.version for v in entry.versions)
        raise InvalidArgument(
            [FieldViolation("version", f"{version!r} is not a serving version (known: {known})")]
        )
    if entry.pinned:
        raise FailedPrecondition(
            f"{entry.name!r} is pinned to {entry.pinned!r}; unpin it to roll out",
            reason="MODEL_PINNED",
        )
    stable = entry.primary_version(now)
    if not stable or stable == version:
        raise FailedPrecondition(
            f"{version!r} already takes most of {entry.name!r}'s traffic",
            reason="ROLLOUT_NOTHING_TO_DO",
        )
    return stable


def _restarted(rollout: Rollout, index: int, now: float, workers: Sequence[WorkerEntry]) -> Rollout:
    """Returns the rollout at step `index`, observing from now on."""
    versions = (rollout.version, rollout.stable)
    return replace(
        rollout,
        step_index=index,
        step_started_at=now,
        baseline=baseline_of(workers, rollout.model, versions),
        carried={},
    )


def _after(rollout: Rollout, action: str, now: float, workers: Sequence[WorkerEntry]) -> Rollout:
    if action == "rollback":
        return replace(rollout, state=ROLLED_BACK)
    if action == "succeed":
        return replace(rollout, state=SUCCEEDED, step_index=len(rollout.policy.steps) - 1)
    return _restarted(rollout, rollout.step_index + 1, now, workers)


def _operated(rollout: Rollout, action: str, now: float, workers: Sequence[WorkerEntry]) -> Rollout:
    allowed = {"pause": {RUNNING}, "resume": {PAUSED}, "abort": ACTIVE}[action]
    if rollout.state not in allowed:
        raise FailedPrecondition(
            f"the rollout of {rollout.model!r} is {rollout.state}; cannot {action} it",
            reason="ROLLOUT_STATE",
        )
    if action == "pause":
        return replace(rollout, state=PAUSED)
    if action == "resume":
        return replace(_restarted(rollout, rollout.step_index, now, workers), state=RUNNING)
    return replace(rollout, state=ABORTED)


class RolloutDriver:
    """RolloutDriver advances running rollouts from one router replica at a time.

    Args:
        store: the rollouts.
        now: the wall clock.
        tick_s: how often running rollouts are evaluated.
        lease_s: the driver lease's lifetime (renewed every tick).
    """

    def __init__(
        self,
        store: RolloutStore,
        now: Callable[[], float],
        tick_s: float = 0.5,
        lease_s: float = 5.0,
    ) -> None:
        self.store = store
        self.now = now
        self.tick_s = tick_s
        self.lease_ms = int(lease_s * 1000)
        self.holder = uuid.uuid4().hex
        self.token = 0
        self._acquire = store.redis.register_script(_ACQUIRE)
        self._task: SupervisedTask | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Runs the driver as a supervised background task."""
        self._task = supervisor.spawn("rollouts", self._run)

    async def stop(self) -> None:
        """Stops the driver (another replica takes over when its lease ends)."""
        if self._task is not None:
            await self._task.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except (RedisError, Unavailable) as exc:  # absorbed: the next tick retries
                logger.warning("rollouts: the store was unavailable (%s)", exc)
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        """Evaluates every running rollout once, if this replica holds the lease; then
        exports every stored rollout's metrics (every replica)."""
        await self._drive()
        await self.store.export_metrics(self.now())

    async def _drive(self) -> None:
        """Evaluates every running rollout once, if this replica holds the lease."""
        keys = [LEASE_KEY, FENCE_KEY]
        args: list[str | int] = [self.holder, self.lease_ms, str(self.token or "")]
        self.token = int(await self._acquire(keys=keys, args=args))
        if not self.token:
            return
        lease = f"{self.holder}:{self.token}"
        raw_all = await self.store.redis.hgetall(ROLLOUTS_KEY)
        applied = await self.store.redis.hgetall(APPLIED_KEY)
        for model, raw, rollout in _readable(raw_all):
            await self._reconcile(rollout, applied.get(model))
            if rollout.state == RUNNING:
                await self.store.step(rollout, raw, lease, self.now())

    async def _reconcile(self, rollout: Rollout, applied: str | bytes | None) -> None:
        """Applies a decision whose traffic never moved: written to the rollout, then the
        split's update failed (a Redis error), or a stalled driver's late update of an
        earlier decision landed after an operator's abort. The rolled-back or aborted
        canary kept its share while the rollout read as ended. (A rollout from before
        the marks existed has none: its split is left as it is.)"""
        if applied is None:
            # No mark: a rollout from before the marks existed. An active one is marked
            # as it stands (its split may be an operator's, made while it was paused).
            if rollout.state in ACTIVE:
                await self.store.redis.hset(APPLIED_KEY, rollout.model, traffic_of(rollout))
            return
        if text(applied) == traffic_of(rollout):
            return
        logger.warning(
            "rollout %s %s: its traffic did not match its last decision; moving it to %d%%",
            rollout.model,
            rollout.version,
            rollout.weight,
        )
        await self.store.move_traffic(rollout)
