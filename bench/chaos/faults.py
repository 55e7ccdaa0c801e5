"""The faults, and one fault's run: load, inject, recover, reconcile usage, look for leftovers."""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.chaos.ledger import Reconciliation, budget_gap, reconcile
from bench.chaos.load import Clients, Lane, Outcome
from services.launcher.mesh import Mesh
from services.launcher.processes import pid_alive, wait_for

logger = logging.getLogger(__name__)

WARMUP_OK = 2  # successes per lane before the fault
AFTER_OK = 3  # successes per lane, started after the recovery, before the load stops
LANE_CAP = 2000  # requests per lane and fault at most
RECOVERY_TIMEOUT_S = 90.0
USAGE_TIMEOUT_S = 60.0
# The key's month charge meets the meter once a killed worker's reservations are
# given back (the suite's mesh: a 3 s liveness, looked at every second).
BUDGET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Fault:
    """Fault is one thing that goes wrong, and how the mesh is expected to take it."""

    id: str
    title: str
    target: str  # the child it hits
    how: str  # "kill" (SIGKILL), "term" (SIGTERM) or "drain" (graceful Envoy restart)
    carries_streams: bool = False  # a -9 of it cuts streams: accepted, counted apart


FAULTS = (
    Fault("worker-0-kill", "worker inference-0: kill -9", "inference-0", "kill", True),
    Fault("worker-1-kill", "worker inference-1: kill -9", "inference-1", "kill", True),
    Fault("worker-term", "worker inference-0: SIGTERM (graceful)", "inference-0", "term"),
    Fault("auth-kill", "auth: kill -9", "auth", "kill"),
    Fault("router-kill", "router: kill -9", "router", "kill"),
    Fault("usage-kill", "usage: kill -9", "usage", "kill"),
    Fault("redis-kill", "Redis (durable, AOF): kill -9", "redis", "kill"),
    Fault("redis-limits-kill", "Redis (rate-limit windows): kill -9", "redis-limits", "kill"),
    Fault("envoy-kill", "Envoy: kill -9, restarted", "envoy", "kill", True),
    Fault("envoy-drain", "Envoy: graceful drain, restarted", "envoy", "drain"),
)


@dataclass
class Row:
    """Row is one fault's figures."""

    fault: Fault
    requests: int
    failed: Counter[str]  # by status, cut streams excluded
    cut: int  # streams cut that the fault does not excuse
    cut_accepted: int  # streams cut by a -9 of the process carrying them
    recovery_s: float | None  # None: requests never succeeded again
    usage: Reconciliation
    left_behind: list[int] = field(default_factory=list)  # pids still alive
    budget_gap: int = 0  # the key's month charge minus its metered tokens (ledger.budget_gap)

    @property
    def clean(self) -> bool:
        """Tells whether the fault met the bar: nothing lost, duplicated, left or cut."""
        return (
            self.usage.lost == 0
            and self.usage.duplicated == 0
            and not self.left_behind
            and self.cut == 0
            and self.recovery_s is not None
            and self.budget_gap == 0
        )


def run_fault(
    mesh: Mesh, fault: Fault, clients: Clients, tenant: str, admin_key: str, key_id: str
) -> Row:
    """Runs the load, injects `fault` once the load is steady, and measures what it did."""
    started = time.time()
    lanes = clients.lanes(f"{fault.id}-{int(time.time())}", LANE_CAP)
    for lane in lanes:
        lane.start()
    try:
        _wait_lanes(lanes, 0.0, WARMUP_OK, f"the load before {fault.id}")
        t_fault = time.monotonic()
        old_pid = mesh.pid(fault.target)
        logger.info("%s: injecting (pid %d)", fault.id, old_pid)
        _inject(mesh, fault)
        recovered = time.monotonic()
        logger.info("%s: %s is back after %.1fs", fault.id, fault.target, recovered - t_fault)
        _wait_lanes(lanes, recovered, AFTER_OK, f"requests to succeed after {fault.id}")
    finally:
        for lane in lanes:
            lane.stop()
    outcomes = [o for lane in lanes for o in lane.outcomes]
    secret = clients.metadata[0][1]
    usage = reconcile(mesh.edge_url, secret, admin_key, tenant, outcomes, USAGE_TIMEOUT_S, started)
    gap = budget_gap(mesh.redis_url, key_id, mesh.edge_url, secret, started, BUDGET_TIMEOUT_S)
    return _row(mesh, fault, outcomes, t_fault, usage, old_pid, gap)


def _inject(mesh: Mesh, fault: Fault) -> None:
    if fault.how == "drain":
        mesh.restart_envoy(fault.target, graceful=True)
        return
    before = mesh.restarts(fault.target)
    mesh.send_signal(fault.target, signal.SIGKILL if fault.how == "kill" else signal.SIGTERM)
    assert mesh.supervisor is not None, "the fault suite needs a supervised mesh"
    records = mesh.supervisor.records
    wait_for(
        lambda: mesh.restarts(fault.target) > before and records[fault.target].state == "running",
        RECOVERY_TIMEOUT_S,
        f"the supervisor to restart {fault.target}",
    )


def _wait_lanes(lanes: list[Lane], since: float, count: int, what: str) -> None:
    ready: Callable[[], bool] = lambda: all(lane.ok_since(since) >= count for lane in lanes)  # noqa: E731
    wait_for(ready, RECOVERY_TIMEOUT_S, what)


def _row(
    mesh: Mesh,
    fault: Fault,
    outcomes: list[Outcome],
    t_fault: float,
    usage: Reconciliation,
    old_pid: int,
    budget_gap: int,
) -> Row:
    cut = sum(1 for o in outcomes if o.cut)
    return Row(
        fault=fault,
        requests=len(outcomes),
        failed=Counter(o.status for o in outcomes if not o.ok and not o.cut),
        cut=0 if fault.carries_streams else cut,
        cut_accepted=cut if fault.carries_streams else 0,
        recovery_s=recovery_time(outcomes, t_fault),
        usage=usage,
        left_behind=left_behind(mesh, old_pid),
        budget_gap=budget_gap,
    )


def recovery_time(outcomes: list[Outcome], t_fault: float) -> float | None:
    """Returns the time from the fault until every request started since succeeded.

    That is the start of the first success after the last request, started at
    or after the fault, that failed; 0 when none failed; None when none
    succeeded after that.
    """
    failed = [o.start for o in outcomes if not o.ok and o.start >= t_fault]
    if not failed:
        return 0.0
    later = [o.start for o in outcomes if o.ok and o.start > max(failed)]
    return min(later) - t_fault if later else None


def left_behind(mesh: Mesh, old_pid: int) -> list[int]:
    """Returns pids that should be gone: the replaced process, or a second copy of a child."""
    stray = [old_pid] if pid_alive(old_pid) and old_pid not in _pids(mesh) else []
    names = Counter(c.name for c in mesh.children if c.alive())
    stray += [c.pid for c in mesh.children if c.alive() and names[c.name] > 1]
    return stray


def _pids(mesh: Mesh) -> set[int]:
    return {c.pid for c in mesh.children if c.alive()}
