"""Service processes: readiness file, graceful drain on SIGTERM, bad configuration."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import mtls
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


def _start(
    module: str, tmp_path: Path, redis_url: str, **env: str
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    ready = tmp_path / f"{module}.json"
    log_path = tmp_path / f"{module}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{module}"],
            env={
                **os.environ,
                "TOKENMESH_READY_FILE": str(ready),
                "REDIS_URL": redis_url,
                "TOKENMESH_METRICS_PORT": "0",
                "TOKENMESH_MODELS": "",
                "TOKENMESH_TEST_MODELS": "deterministic-test:1",
                "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
                "TOKENMESH_PKI_DIR": str(mtls.pki_dir()),
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(log_path.read_text())
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


def test_sigterm_finishes_in_flight_streams_then_exits_zero(tmp_path, redis_url):
    process, info = _start(
        "inference",
        tmp_path,
        redis_url,
        TOKENMESH_TEST_ENGINE_STEP_MS="50",
        TOKENMESH_GRACE_SECONDS="10",
    )
    try:
        with mtls.channel(info["grpc_port"], peer="worker") as channel:
            stream = rpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(model="deterministic-test", prompt="p", max_tokens=30),
                timeout=20,
            )
            first = next(stream)
            process.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert first.index == 0
        assert rest[-1].finish_reason == "length"
        assert rest[-1].usage.completion_tokens == 30
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()


def test_sigterm_turns_health_not_serving_before_stopping(tmp_path, redis_url):
    process, info = _start("inference", tmp_path, redis_url, TOKENMESH_GRACE_SECONDS="10")
    try:
        with mtls.channel(info["grpc_port"], peer="worker") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="tokenmesh.inference.v1.InferenceService"),
                timeout=15,
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_worker_is_not_serving_before_it_has_read_the_content_policies(tmp_path):
    # Regression: it turned SERVING (and wrote its ready file) with Redis out of
    # reach, then refused every request: "content policies are unavailable".
    port = _unused_port()
    log_path = tmp_path / "inference.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.inference"],
            env={
                **os.environ,
                "TOKENMESH_GRPC_PORT": str(port),
                "TOKENMESH_READY_FILE": str(tmp_path / "ready.json"),
                "TOKENMESH_METRICS_PORT": "-1",
                "TOKENMESH_MODELS": "",
                "TOKENMESH_TEST_MODELS": "deterministic-test:1",
                "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
                "TOKENMESH_PKI_DIR": str(mtls.pki_dir()),
                "REDIS_URL": f"redis://127.0.0.1:{_unused_port()}/0",  # nothing listens
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        # The model is ready and the policy refresh has failed twice: start is as far as it gets.
        while log_path.read_text().count("content policies: cannot refresh") < 2:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert "model deterministic-test version 1 ready" in log_path.read_text()
        with mtls.channel(port, peer="worker") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tokenmesh.inference.v2.InferenceService"),
                timeout=5,
            )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not (tmp_path / "ready.json").exists()
    finally:
        process.kill()
        process.wait()


def test_invalid_configuration_fails_fast_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.inference"],
        env={**os.environ, "TOKENMESH_GRPC_PORT": "not-a-port"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "TOKENMESH_GRPC_PORT" in result.stderr
    assert "Traceback" not in result.stderr
