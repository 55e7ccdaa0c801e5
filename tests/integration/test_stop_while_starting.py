"""Service processes stopped before they started, and settings a service loads itself.

A signal while a service waits in its start (Redis out of reach, content policies
not read yet) was ignored: the process kept its gRPC port until SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import mtls

GRACE_S = 1.0


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(module: str, tmp_path: Path, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{module}"],
            env={
                **os.environ,
                "TOKENMESH_GRPC_PORT": "0",
                "TOKENMESH_METRICS_PORT": "-1",
                "TOKENMESH_GRACE_SECONDS": str(GRACE_S),
                "TOKENMESH_PKI_DIR": str(mtls.pki_dir()),
                "TOKENMESH_MODELS": "",
                "TOKENMESH_TEST_MODELS": "deterministic-test:1",
                "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
                "TOKENMESH_LEASE_TOKEN_DIR": str(tmp_path / "lease-tokens"),
                "REDIS_URL": f"redis://127.0.0.1:{_unused_port()}/0",  # nothing listens
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for_line(process: subprocess.Popen[bytes], log_path: Path, line: str) -> None:
    deadline = time.monotonic() + 30
    while line not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def _assert_stops_on(
    sig: signal.Signals, process: subprocess.Popen[bytes], log_path: Path, name: str
) -> None:
    try:
        process.send_signal(sig)
        # Nothing in flight: the grace period is an upper bound, and stop has 5 s more.
        assert process.wait(timeout=GRACE_S + 5) == 0, log_path.read_text()
        log = log_path.read_text()
        assert f"{name} stopped" in log
        assert "Traceback" not in log
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("module", ["router", "usage", "jobs"])
def test_sigterm_while_waiting_for_redis_stops_the_service(tmp_path, module):
    log_path = tmp_path / f"{module}.log"
    process = _spawn(module, tmp_path, log_path)
    _wait_for_line(process, log_path, "waiting for Redis")
    _assert_stops_on(signal.SIGTERM, process, log_path, module)


def test_ctrl_c_while_waiting_for_redis_stops_the_service(tmp_path):
    log_path = tmp_path / "router.log"
    process = _spawn("router", tmp_path, log_path)
    _wait_for_line(process, log_path, "waiting for Redis")
    _assert_stops_on(signal.SIGINT, process, log_path, "router")


def test_sigterm_while_a_worker_waits_for_its_content_policies_stops_it(tmp_path):
    log_path = tmp_path / "inference.log"
    process = _spawn("inference", tmp_path, log_path)
    # Its model is ready; start waits for the policies, which need Redis.
    _wait_for_line(process, log_path, "content policies: cannot refresh")
    _assert_stops_on(signal.SIGTERM, process, log_path, "inference")


@pytest.mark.parametrize("setting", ["TOKENMESH_CACHE=maybe", "TOKENMESH_CACHE_BILLING=free"])
def test_an_invalid_cache_setting_fails_fast_naming_the_variable(tmp_path, setting):
    """The worker loads its response-cache settings itself (while it is built): the
    same one line and exit 2 as its other settings, not a traceback and exit 1."""
    variable, value = setting.split("=")
    result = subprocess.run(
        [sys.executable, "-m", "services.inference"],
        env={
            **os.environ,
            "TOKENMESH_LOG_LEVEL": "WARNING",  # stderr holds only what ends it
            "TOKENMESH_METRICS_PORT": "-1",
            "TOKENMESH_MODELS": "",
            "TOKENMESH_TEST_MODELS": "deterministic-test:1",
            "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "REDIS_URL": f"redis://127.0.0.1:{_unused_port()}/0",
            variable: value,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"tokenmesh-inference: invalid configuration: {variable}")


def test_a_setting_only_start_can_check_still_ends_the_worker_on_one_line(tmp_path):
    """Start runs apart from the signal wait now: its SystemExit (an advertised address
    the router would refuse) still ends the worker with the message and exit 2 alone."""
    result = subprocess.run(
        [sys.executable, "-m", "services.inference"],
        env={
            **os.environ,
            "TOKENMESH_LOG_LEVEL": "ERROR",
            "TOKENMESH_PKI_DIR": str(mtls.pki_dir()),
            "TOKENMESH_METRICS_PORT": "-1",
            "TOKENMESH_MODELS": "",
            "TOKENMESH_TEST_MODELS": "deterministic-test:1",
            "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "TOKENMESH_LEASE_TOKEN_DIR": str(tmp_path / "lease-tokens"),
            "REDIS_URL": f"redis://127.0.0.1:{_unused_port()}/0",
            "TOKENMESH_ADVERTISE_HOST": "auto",
            "TOKENMESH_ROUTER_ADDR": "[::1]:50051",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("tokenmesh-inference: invalid configuration: TOKENMESH_ADVERTISE_HOST")
