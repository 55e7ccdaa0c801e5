"""gRPC health at the edge mirrors `GET /healthz` (gateway/edge_health.py).

With its own mesh: a dependency is frozen (SIGSTOP: alive, so nothing
restarts it, but failing its health checks) while the workers stay healthy.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from gateway import edge_health
from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV

WORKER_SERVICE = "tokenmesh.inference.v1.InferenceService"
WAIT_S = 30.0


@pytest.fixture(scope="module")
def health_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("edge-health")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=TEST_SERVICE_ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


def _wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _healthz(mesh: Mesh) -> int:
    return httpx.get(f"{mesh.edge_url}/healthz", timeout=5).status_code


def _health(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    # NOTE: the method by hand: the grpc_health stubs do not type HealthStub's methods.
    return channel.unary_unary(
        edge_health.HEALTH_CHECK_PATH,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def _check(channel: grpc.Channel, service: str = "") -> str:
    """Returns the edge's health answer: SERVING, NOT_SERVING, ... or the error code."""
    try:
        answer = _health(channel)(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as error:
        return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def _channels(mesh: Mesh) -> list[grpc.Channel]:
    """The plaintext edge and the TLS one (each has the filter)."""
    credentials = grpc.ssl_channel_credentials(mesh.ca_path.read_bytes())
    return [
        grpc.insecure_channel(mesh.edge_address),
        grpc.secure_channel(f"127.0.0.1:{mesh.edge_tls_port}", credentials),
    ]


def test_grpc_health_is_serving_while_healthz_is_200(health_mesh):
    assert _wait_until(lambda: _healthz(health_mesh) == 200)
    for channel in _channels(health_mesh):
        with channel:
            assert _check(channel) == "SERVING"


def test_grpc_health_is_unavailable_while_a_dependency_is_down_and_the_workers_serve(
    health_mesh,
):
    assert _wait_until(lambda: _healthz(health_mesh) == 200)
    channels = _channels(health_mesh)
    health_mesh.send_signal("usage", signal.SIGSTOP)
    try:
        assert _wait_until(lambda: _healthz(health_mesh) == 503)
        for channel in channels:
            assert _check(channel) == "UNAVAILABLE"
            # The workers still serve: a named service is still theirs to answer.
            assert _check(channel, WORKER_SERVICE) == "SERVING"
        with pytest.raises(grpc.RpcError) as failed:
            _health(channels[0])(health_pb2.HealthCheckRequest(), timeout=5)
        assert failed.value.details() == edge_health.NOT_READY_MESSAGE
    finally:
        health_mesh.send_signal("usage", signal.SIGCONT)
    assert _wait_until(lambda: _healthz(health_mesh) == 200)
    assert all(_check(channel) == "SERVING" for channel in channels)
    for channel in channels:
        channel.close()
