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
from gateway.model_routing import model_health_name
from services.core import contract
from services.launcher.mesh import Mesh, MeshConfig
from services.router.snapshot import model_cluster
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel, wait_for_healthy_hosts
from tokenmesh.inference.v1 import inference_service_pb2 as inference_pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as inference_rpc

WORKER_SERVICE = "tokenmesh.inference.v1.InferenceService"
WAIT_S = 30.0
# A stream on a hung worker ends within about the edge's ping interval and timeout
# (10 s + 5 s, the interval jittered by up to 15%).
HANG_BOUND_S = 25.0


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
    channel: grpc.Channel, path: str = edge_health.HEALTH_CHECK_PATH
) -> grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    # NOTE: the method by hand: the grpc_health stubs do not type HealthStub's methods.
    return channel.unary_unary(
        path,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def _check(channel: grpc.Channel, service: str = "") -> str:
    """Returns the edge's health answer: SERVING, NOT_SERVING, ... or the error code."""
    return _answer(channel, service)[0]


def _answer(
    channel: grpc.Channel, service: str, path: str = edge_health.HEALTH_CHECK_PATH
) -> tuple[str, str]:
    """Returns a health answer in full: (status or error code, error details)."""
    try:
        answer = _health(channel, path)(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as error:
        return str(error.code().name), str(error.details() or "")
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)), ""


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


def test_anonymous_named_health_tells_nothing_of_which_model_versions_exist(health_mesh):
    # The workers report each version's readiness under its own health name, for
    # Envoy's active health checks (which ask the workers directly, not through
    # a listener). Through the public route, without a credential, such a name
    # must answer as a made-up one does, whether the version exists or not.
    served = model_health_name("demo-lm", "1")
    wait_for_healthy_hosts(health_mesh, [model_cluster("demo-lm", "1")], 1)
    with health_mesh.channel("inference-0", contract.EDGE) as worker:
        assert _check(worker, served) == "SERVING"  # the worker does report it
    names = [
        served,
        "tokenmesh.inference.v2.InferenceService/demo-lm/1",  # v2's twin
        model_health_name("deterministic-test", "1"),
        model_health_name("demo-lm", "2"),  # a version no worker has
    ]
    made_up = model_health_name("no-such-model", "1")
    for channel in _channels(health_mesh):
        with channel:
            assert _answer(channel, made_up) == ("NOT_FOUND", "")
            for name in names:
                assert _answer(channel, name) == _answer(channel, made_up), name
            # The Lua gate matches the whole :path, the route ignores a query string:
            # a worker finds no method there, for either name.
            odd_path = f"{edge_health.HEALTH_CHECK_PATH}?service=1"
            assert _answer(channel, served, odd_path) == _answer(channel, made_up, odd_path)
            assert _answer(channel, served, odd_path)[0] != "SERVING"
            # "" and the workers' public service names are answered as before.
            assert _check(channel) == "SERVING"
            for service in edge_health.WORKER_SERVICES:
                assert _check(channel, service) == "SERVING", service
    # Envoy's own checks of the version still pass (the host stays healthy).
    wait_for_healthy_hosts(health_mesh, [model_cluster("demo-lm", "1")], 1)


def _raw_answer(
    channel: grpc.Channel, message: bytes, compression: grpc.Compression | None = None
) -> tuple[str, str]:
    """Sends `message` as a Health/Check request's bytes, as written (or compressed)."""
    check = channel.unary_unary(
        edge_health.HEALTH_CHECK_PATH,
        request_serializer=lambda raw: raw,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        answer = check(message, timeout=5, compression=compression)
    except grpc.RpcError as error:
        return str(error.code().name), str(error.details() or "")
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)), ""


def test_a_health_request_the_edge_cannot_read_ends_at_the_edge(health_mesh):
    # A name must not slip past the gate in a shape it does not read: another
    # field before it, a compressed frame. Field 1 given twice counts as its
    # last copy, as a worker (protobuf) reads it.
    served = health_pb2.HealthCheckRequest(service=model_health_name("demo-lm", "1"))
    empty = health_pb2.HealthCheckRequest().SerializeToString()
    twice = empty + b"\x0a\x00" + served.SerializeToString()
    unreadable = ("INVALID_ARGUMENT", edge_health.UNREADABLE_MESSAGE)
    assert _wait_until(lambda: _healthz(health_mesh) == 200)
    for channel in _channels(health_mesh):
        with channel:
            assert _raw_answer(channel, twice) == ("NOT_FOUND", "")
            assert _raw_answer(channel, served.SerializeToString() + b"\x0a\x00")[0] == "SERVING"
            assert _raw_answer(channel, b"\x10\x01" + served.SerializeToString()) == unreadable
            # gRPC sends a message uncompressed unless that makes it smaller.
            long = health_pb2.HealthCheckRequest(service=f"{served.service}/{'x' * 500}")
            gzip = grpc.Compression.Gzip
            assert _raw_answer(channel, long.SerializeToString(), gzip) == unreadable


def test_a_stream_open_on_a_worker_that_hangs_ends_with_an_error(health_mesh):
    # A worker that stops answering without a reset (SIGSTOP here; a lost node, a
    # partition) sends no RST: its health checks take it out in seconds, but a
    # stream already open on it got neither bytes nor an error until the route's
    # idle timeout (600 s). The edge's HTTP/2 PINGs (envoy_config.UPSTREAM_PING:
    # 10 s, 5 s to answer) close that connection, and its streams end.
    wait_for_healthy_hosts(health_mesh, [model_cluster("deterministic-test", "1")], 1)
    key = [("x-api-key", health_mesh.dev_api_key())]
    with authed_channel(health_mesh.edge_address, key) as channel:
        # 500 tokens at the test engine's 20 ms a step: ~10 s, were it not frozen.
        stream = inference_rpc.InferenceServiceStub(channel).Generate(
            inference_pb.GenerateRequest(model="deterministic-test", prompt="a b", max_tokens=500),
            timeout=WAIT_S + HANG_BOUND_S,
        )
        next(stream)
        health_mesh.send_signal("inference-0", signal.SIGSTOP)
        hung_at = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    pass
            waited = time.monotonic() - hung_at
        finally:
            health_mesh.send_signal("inference-0", signal.SIGCONT)
    # Not the call's own deadline, and well before the idle timeout.
    assert ended.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, ended.value
    assert waited < HANG_BOUND_S, waited
    wait_for_healthy_hosts(health_mesh, [model_cluster("deterministic-test", "1")], 1)
    assert _wait_until(lambda: _healthz(health_mesh) == 200)
