"""`tokenmesh models compare`'s table (services/cli/shadow.py) and the CLI's local-mesh lookup."""

from __future__ import annotations

import os
import subprocess
import sys

from services.cli.shadow import describe
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb


def _row(table: str, name: str) -> list[str]:
    [line] = [line for line in table.splitlines() if line.strip().startswith(name)]
    return line.split()[len(name.split()) :]


def test_quality_figures_nothing_measured_print_a_dash_not_zero():
    # Only v1 Completes (no log-probabilities) served version 1: the router's means are 0.0.
    reply = router_pb.CompareModelVersionsResponse(
        model="m",
        baseline=router_pb2.VersionComparison(version="1", requests=10),
        candidate=router_pb2.VersionComparison(
            version="2", requests=6, mean_logprob=-1.691, mean_confidence=0.184
        ),
        pairs=10,
    )
    table = describe(reply, "1h")
    assert _row(table, "mean token logprob") == ["-", "-1.691"]
    assert _row(table, "mean confidence") == ["-", "0.184"]
    assert _row(table, "requests") == ["10", "6"]


def test_the_cli_says_which_variable_finds_a_mesh_elsewhere(tmp_path):
    # The banner's CLI lines failed under another state directory, naming no remedy.
    env = {**os.environ, "TOKENMESH_STATE_DIR": str(tmp_path), "TOKENMESH_API_KEY": "tm_x"}
    env.pop("TOKENMESH_AUTH_ADDR", None)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "token"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"no local mesh at {tmp_path}" in done.stderr
    assert "TOKENMESH_STATE_DIR" in done.stderr


def test_a_few_pairs_are_not_shown_as_a_verdict():
    # One seeded pair printed "1/1 (100.0%)"; no successful request printed 0.0 ms
    # latencies, read as "instant"; pairs the other way round vanished.
    reply = router_pb.CompareModelVersionsResponse(
        model="m",
        baseline=router_pb2.VersionComparison(
            version="1",
            requests=1,
            time_to_first_token=router_pb2.LatencySummary(p50_ms=2, p99_ms=2, mean_ms=2, samples=1),
        ),
        candidate=router_pb2.VersionComparison(version="2", requests=1, error_rate=1.0),
        pairs=1,
        seeded_pairs=1,
        agreeing_pairs=1,
        agreement_rate=1.0,
        reversed_pairs=7,
    )
    table = describe(reply, "1h")
    assert _row(table, "ttft p50/p99 ms") == ["2.0", "/", "2.0", "-"]
    # One-token answers have no inter-token latency: no sample, not "instant".
    assert _row(table, "itl p50/p99 ms") == ["-", "-"]
    assert "1/1 (100.0%; 95% interval 20.7%-100.0%)" in table
    assert "fewer than 30 pairs: too few to judge the versions by" in table
    assert "7 pairs the other way round (v2 served, v1 shadow)" in table
    assert "tokenmesh models compare m 2 1" in table


def test_the_agreement_interval_narrows_with_the_pairs():
    from services.cli.shadow import wilson_interval

    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(940, 1000)
    assert 0.92 < low < 0.94 < high < 0.96
