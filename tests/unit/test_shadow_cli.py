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
