"""The fault suite's CI subset: under a mixed load through the edge, kill -9 (and
SIGTERM) parts of a supervised mesh one at a time; no usage event is lost or
counted twice, no stream is cut but by a -9 of its worker or edge, requests
succeed again, each key's budget is charged what was metered (a killed worker's
reservations given back), and no process is left behind. `make chaos` runs every fault."""

from __future__ import annotations

from bench.chaos import run, select, supervised_mesh
from bench.chaos.report import table

CI_FAULTS = ("worker-0-kill", "worker-term", "auth-kill", "usage-kill", "redis-kill", "envoy-kill")


def test_faults_lose_and_duplicate_no_usage_and_leave_nothing_behind(tmp_path):
    with supervised_mesh(tmp_path / "mesh") as mesh:  # raises if a process outlives it
        rows = run(mesh, select(CI_FAULTS))
    print(table(rows))
    for row in rows:
        assert row.usage.lost == 0, row
        assert row.usage.duplicated == 0, row
        assert row.usage.client_requests > 0, row
        assert row.left_behind == [], row
        assert row.cut == 0, row
        assert row.recovery_s is not None, row
        # Every request's budget reservation was reconciled to its use, or given back
        # when its worker died (services/inference/reservation_reaper.py).
        assert row.budget_gap == 0, row
    sigterm = next(row for row in rows if row.fault.id == "worker-term")
    assert sigterm.cut == sigterm.cut_accepted == 0
