"""The edge logs as the services do: TOKENMESH_LOG_FORMAT=json makes Envoy's lines JSON.

The Kubernetes config and the image set TOKENMESH_LOG_FORMAT=json for every
component; the edge's pod still wrote Envoy's own lines in its text format
(`[2026-...][12][warning][config] ...`) and `python -m gateway`'s warnings as
plain text beside them, which a JSON log pipeline cannot parse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.launcher.processes import reserve_port

DEADLINE_S = 30.0


def _lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if line.strip()]


def test_the_edge_logs_json_lines_when_told_to(tmp_path: Path) -> None:
    admin = tmp_path / "admin.sock"
    env = {
        **os.environ,
        "TOKENMESH_LOG_FORMAT": "json",
        "TOKENMESH_EDGE_PORT": str(reserve_port()),
        "TOKENMESH_EDGE_ADMIN_SOCKET": str(admin),
        # Nobody answers there: Envoy logs that its xDS stream failed (a warning).
        "TOKENMESH_ROUTER_ADDR": f"127.0.0.1:{reserve_port()}",
        "TOKENMESH_DESCRIPTOR": str(tmp_path / "descriptor.pb"),
        "TOKENMESH_EDGE_DRAIN_SECONDS": "1",
    }
    env.pop("TOKENMESH_PKI_DIR", None)
    log = tmp_path / "edge.log"
    command = [sys.executable, "-m", "gateway", "run", "--out", str(tmp_path / "edge.yaml")]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while not any('"level":"warning","logger":"envoy.' in x for x in _lines(log)):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(DEADLINE_S)
    entries = [json.loads(line) for line in _lines(log)]  # every line: one JSON object
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    loggers = {entry["logger"] for entry in entries}
    assert "envoy.main" in loggers, loggers  # Envoy's startup lines, before its bootstrap
    # The supervisor's own warning (no PKI directory) is JSON too.
    assert any("TOKENMESH_PKI_DIR is unset" in e["msg"] for e in entries), entries[:5]
