"""`make run`'s launcher: starts everything, /healthz tracks workers, stops cleanly."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.launcher.processes import pid_alive, reserve_port


def _two_free_ports() -> tuple[int, int]:
    """Returns two distinct ports that were free a moment ago (outside the kernel's
    ephemeral range: an outgoing connection took a released :0 port now and then
    before the edge bound it)."""
    return reserve_port(), reserve_port()


def _spawn_launcher(tmp_path: Path, **overrides: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Starts `python -m services.launcher` on tmp_path/state; returns it and its log."""
    edge_port, tls_port = _two_free_ports()
    env = {
        **os.environ,
        "TOKENMESH_STATE_DIR": str(tmp_path / "state"),
        # Not the default 8080/8443: the ports are the mesh's alone, and another
        # launcher (a parallel test, a developer's `make run`) may hold those.
        "TOKENMESH_EDGE_PORT": str(edge_port),
        "TOKENMESH_EDGE_TLS_PORT": str(tls_port),
        "TOKENMESH_WORKERS": "1",
        "TOKENMESH_GRACE_SECONDS": "2",
    }
    env.pop("REDIS_URL", None)  # the launcher starts its own bundled Redis
    env.update(overrides)
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.launcher"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's foreground group: Ctrl-C signals it whole
        )
    return process, log_path


def _launch(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    process, log_path = _spawn_launcher(tmp_path)
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
        # Its tokenmesh lines read this state dir, not the default one.
        assert f"export TOKENMESH_STATE_DIR={tmp_path / 'state'}" in log_path.read_text()
        # Private: Redis' AOF (prompts of jobs, samples) and the logs (Envoy's debug
        # level prints credentials) were readable by any local user (0755, 0644).
        state = tmp_path / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "redis").stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "logs" / "envoy.log").stat().st_mode) == 0o600
        # Ctrl-C in a terminal signals the foreground process group: the launcher
        # and, before, every child with it. Redis exited at once (a SIGINT is its
        # shutdown), the supervisor started restarting it while the workers were
        # still draining, their last usage unshipped. The children have a process
        # group of their own: the launcher stops them, in order.
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert _wait_until(lambda: not any(pid_alive(p) for p in manifest["pids"].values()), 10)
        assert "restarting" not in log_path.read_text()
        redis_log = (tmp_path / "state" / "logs" / "redis.log").read_text()
        assert "Received SIGTERM" in redis_log and "SIGINT" not in redis_log
        # Nothing listens any more: the CLI says "no local mesh", not a connection
        # refused at the stopped one's addresses.
        run_dir = tmp_path / "state" / "run"
        assert not (run_dir / "mesh.json").exists() and not (run_dir / "envoy-admin.sock").exists()
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


def _started_pids(log: str) -> dict[str, int]:
    """Returns the children the launcher's log says it started: name -> pid."""
    return {m[1]: int(m[2]) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", log)}


def _refused(process: subprocess.Popen[bytes], log_path: Path) -> tuple[int, str]:
    """Waits for a launcher that should refuse to start; returns (exit code, log)."""
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        raise AssertionError(f"the launcher started:\n{log_path.read_text()}") from None
    return code, log_path.read_text()


def test_ctrl_c_while_starting_stops_at_once_without_the_banner(tmp_path):
    """Ctrl-C during start was ignored until every child had come up or timed out
    (90 s each), then the banner was printed and only then did the mesh stop."""
    nobody = reserve_port()  # no Redis there: every service waits for it at start
    process, log_path = _spawn_launcher(tmp_path, REDIS_URL=f"redis://127.0.0.1:{nobody}/0")
    try:
        assert _wait_until(lambda: "started router" in log_path.read_text(), 60)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0, log_path.read_text()
        log = log_path.read_text()
        assert "tokenmesh is up" not in log and "Traceback" not in log, log
        pids = _started_pids(log)
        assert {"auth", "router"} <= set(pids)
        assert _wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 10)
    finally:
        process.kill()
        process.wait()


def test_a_child_that_cannot_start_ends_the_launcher_in_one_line(tmp_path):
    """A start failure ended in a Python traceback (TimeoutError/RuntimeError from
    the launcher's start), not in a line saying which child failed and where its log is."""
    process, log_path = _spawn_launcher(tmp_path, TOKENMESH_GRACE_SECONDS="-1")
    code, log = _refused(process, log_path)
    assert code == 1, log
    assert "Traceback" not in log, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("tokenmesh: could not start: ") and "exited with 2" in last, log
    assert str(tmp_path / "state" / "logs") in last  # where to read why
    assert "TOKENMESH_GRACE_SECONDS" in log  # the child's own log tail, logged before


def test_a_second_launcher_on_a_state_dir_in_use_is_refused(tmp_path):
    """It started a second Redis on the same AOF and workers on the same usage spool."""
    run_dir = tmp_path / "state" / "run"
    run_dir.mkdir(parents=True)
    with open(run_dir / "launcher.lock", "w") as held:  # as a running launcher holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        process, log_path = _spawn_launcher(tmp_path)
        code, log = _refused(process, log_path)
    assert code == 2, log
    assert f"another tokenmesh is running on {tmp_path / 'state'} (pid 4242)" in log, log
    assert "Traceback" not in log and "started" not in log, log
    assert not (tmp_path / "state" / "redis").exists()  # no second Redis on its data


def test_a_state_dir_too_long_for_its_sockets_is_refused_before_anything_starts(tmp_path):
    """Envoy's admin socket path holds at most 107 bytes: a deep checkout's state dir
    failed only when Envoy started, last, with a traceback."""
    state = tmp_path / ("deep" * 25)
    process, log_path = _spawn_launcher(tmp_path, TOKENMESH_STATE_DIR=str(state))
    code, log = _refused(process, log_path)
    assert code == 2, log
    assert "the admin socket path" in log and "use a shorter state directory" in log, log
    assert "Traceback" not in log and "started" not in log, log
    assert not (state / "redis").exists()


@pytest.mark.parametrize("variable", ["TOKENMESH_EDGE_PORT", "TOKENMESH_EDGE_TLS_PORT"])
def test_an_edge_port_in_use_is_refused_before_anything_starts(tmp_path, variable):
    """The second mesh's Envoy shared 8080 with the first (SO_REUSEPORT), or, with
    the port held by anything else, failed only after every other child had started."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, log_path = _spawn_launcher(tmp_path, **{variable: str(port)})
        code, log = _refused(process, log_path)
    assert code == 2, log
    assert f"port {port} on 127.0.0.1 is in use" in log and f"(set {variable})" in log, log
    assert "Traceback" not in log and "started" not in log, log
