"""`make run`'s launcher: starts everything, /healthz tracks workers, stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from services.launcher.processes import pid_alive, reserve_port


def _launch(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    env = {
        **os.environ,
        "TOKENMESH_STATE_DIR": str(tmp_path / "state"),
        "TOKENMESH_EDGE_PORT": str(reserve_port()),
        "TOKENMESH_WORKERS": "1",
        "TOKENMESH_GRACE_SECONDS": "2",
    }
    env.pop("REDIS_URL", None)  # the launcher starts its own bundled Redis
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.launcher"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    manifest_path = tmp_path / "state" / "run" / "mesh.json"
    deadline = time.monotonic() + 120
    while not manifest_path.exists():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    return process, json.loads(manifest_path.read_text()), log_path


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_ctrl_c_stops_every_process(tmp_path):
    process, manifest, log_path = _launch(tmp_path)
    try:
        assert set(manifest["pids"]) == {
            *("redis", "redis-limits", "auth", "router", "usage", "jobs", "inference-0", "envoy")
        }  # every one of them, jobs included, must be gone after Ctrl-C (below)
        assert _status(manifest["edge_url"] + "/healthz") == 200
        assert "curl -N" in log_path.read_text()  # the banner with copy-paste examples
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert _wait_until(lambda: not any(pid_alive(p) for p in manifest["pids"].values()), 10)
    finally:
        process.kill()
        process.wait()


def test_healthz_fails_without_a_ready_worker_and_kill_9_of_the_launcher_leaves_nothing(tmp_path):
    process, manifest, _ = _launch(tmp_path)
    try:
        # A frozen worker: alive (the launcher's supervisor would restart a dead
        # one at once), but failing its health checks.
        worker = manifest["pids"]["inference-0"]
        os.kill(worker, signal.SIGSTOP)
        assert _wait_until(lambda: _status(manifest["edge_url"] + "/healthz") == 503, 10)
        process.kill()  # SIGKILL: the children must still go away by themselves
        process.wait()
        os.kill(worker, signal.SIGCONT)  # so it can act on the SIGTERM it was sent
        assert _wait_until(lambda: not any(pid_alive(p) for p in manifest["pids"].values()), 15)
    finally:
        process.kill()
        process.wait()
