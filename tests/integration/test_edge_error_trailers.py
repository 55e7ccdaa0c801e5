"""A REST error answer whose headers went first keeps its metadata, through the real edge.

A unary handler that sent response headers and then fails ends, by design,
with those headers first and the error's own metadata in its trailers
(services.core.interceptors: a trailers-only UNAVAILABLE would be retried by
Envoy, and run and billed again). The transcoder writes a REST client the
status and JSON body from the trailers but left the rest there: HTTP/1.1
clients (a content-length, no trailers) lost the error's Retry-After and
the REST status a service asked for, and so did HTTP/2 ones. The edge's
response filter makes them headers (gateway/response_headers.py).

A real Envoy runs the whole edge bootstrap (gateway.envoy_config.bootstrap,
without auth) in front of a real grpc.aio server behind the real error
boundary, which stands in for every upstream: the boundary's answer shapes
and the edge's filters are what is under test.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway import envoy_config, protos
from gateway.envoy_config import EdgeConfig, Endpoint
from services.core.api_versions import ApiVersionSunset
from services.core.errors import FieldViolation, InvalidArgument, ResourceExhausted
from services.core.interceptors import BoundaryInterceptor
from services.core.server import SERVER_OPTIONS
from services.launcher.processes import reserve_port
from tests.envoy_process import running_envoy
from tokenmesh.inference.v1 import inference_service_pb2 as pb

SERVICE = "tokenmesh.inference.v1.InferenceService"
PATH = "/v1/models/m:complete"
EARLY = (("x-request-id", "r-1"), ("x-model-version", "1"))
RETRY_AFTER_S = 7
# Trailers no error may turn into headers (framing, cookies, redirects, Envoy's).
HOSTILE_TRAILERS = (
    ("set-cookie", "session=stolen"),
    ("location", "https://elsewhere.example"),
    ("x-envoy-injected", "by-upstream"),
    ("x-tokenmesh-kept", "yes"),
)


async def _complete(request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
    """Answers as the prompt says: the headers first (as a worker's Complete does once
    it started), then an error; or an error before any header (trailers-only)."""
    if request.prompt == "fails before headers":
        raise ResourceExhausted("slow down", retry_after_s=RETRY_AFTER_S, reason="RATE_LIMITED")
    await context.send_initial_metadata(EARLY)
    if request.prompt == "rate limited after headers":
        raise ResourceExhausted("slow down", retry_after_s=RETRY_AFTER_S, reason="RATE_LIMITED")
    if request.prompt == "sunset after headers":
        raise ApiVersionSunset("inference v1 was retired")
    if request.prompt == "invalid after headers":
        raise InvalidArgument([FieldViolation("prompt", "is bad")], reason="BAD")
    if request.prompt == "client-acting trailers after headers":
        context.set_trailing_metadata(HOSTILE_TRAILERS)
        raise InvalidArgument([FieldViolation("prompt", "is bad")], reason="BAD")
    return pb.CompleteResponse(text="ok")


@dataclass(frozen=True)
class Edge:
    port: int


async def _serve() -> tuple[grpc.aio.Server, int]:
    """Starts a real grpc.aio server behind the error boundary, healthy for every cluster."""
    server = grpc.aio.server(interceptors=[BoundaryInterceptor()], options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(
        _complete,
        request_deserializer=pb.CompleteRequest.FromString,
        response_serializer=pb.CompleteResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Complete": handler})]
    )
    health = HealthServicer()
    for name in envoy_config.HEALTH_SERVICE.values():
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
def upstream() -> Iterator[int]:
    """The server's port; it runs on an event loop of its own thread, so that it answers
    Envoy's health checks while the test waits on Envoy and calls it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(_serve(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def edge(upstream: int, tmp_path: Path) -> Iterator[Edge]:
    listen, admin = reserve_port(), tmp_path / "admin.sock"
    config = EdgeConfig(
        listen_port=listen,
        admin_socket=admin,
        descriptor_path=protos.build_descriptor_set(tmp_path / "tokenmesh.pb"),
        upstreams={name: [Endpoint("127.0.0.1", upstream)] for name in envoy_config.HEALTH_SERVICE},
        auth=None,
        access_log_path=str(tmp_path / "access.log"),
    )
    with running_envoy(envoy_config.bootstrap(config), admin, tmp_path):
        yield Edge(listen)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def _http11(edge: Edge, prompt: str) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=10)
    try:
        body = json.dumps({"prompt": prompt})
        connection.request("POST", PATH, body, {"content-type": "application/json"})
        reply = connection.getresponse()
        assert reply.version == 11
        headers = {k.lower(): v for k, v in reply.getheaders()}
        return Answer(reply.status, headers, json.loads(reply.read()))
    finally:
        connection.close()


def _http2(edge: Edge, prompt: str) -> Answer:
    """REST over HTTP/2 (h2c) with curl: its headers, not its trailers."""
    result = subprocess.run(
        [
            "curl", "-sS", "--http2-prior-knowledge", "-D", "-",
            "-H", "content-type: application/json",
            "--data", json.dumps({"prompt": prompt}),
            f"http://127.0.0.1:{edge.port}{PATH}",
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    head, _, body = result.stdout.partition("\n\n")  # text mode: "\r\n" read as "\n"
    status_line, *lines = head.split("\n")
    assert status_line.startswith("HTTP/2 ")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return Answer(int(status_line.split()[1]), headers, json.loads(body))


SEND = {"HTTP/1.1": _http11, "HTTP/2": _http2}


@pytest.mark.parametrize("protocol", SEND)
def test_an_error_after_headers_keeps_its_retry_after(edge: Edge, protocol: str) -> None:
    answer = SEND[protocol](edge, "rate limited after headers")
    assert answer.status == 429
    assert answer.headers.get("retry-after") == str(RETRY_AFTER_S)
    assert answer.headers["x-request-id"] == "r-1"  # sent first: a header already
    assert answer.body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert answer.body["message"] == "slow down"
    # gRPC's own status fields made the status and body; they are no headers.
    assert not {"grpc-status", "grpc-message", "grpc-status-details-bin"} & answer.headers.keys()


@pytest.mark.parametrize("protocol", SEND)
def test_an_error_after_headers_gets_the_rest_status_its_service_asked_for(
    edge: Edge, protocol: str
) -> None:
    # ApiVersionSunset asks REST clients for 410 Gone (the transcoder says 501).
    answer = SEND[protocol](edge, "sunset after headers")
    assert answer.status == 410
    assert answer.body["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


def test_an_error_before_any_header_and_a_success_are_as_before(edge: Edge) -> None:
    refused = _http11(edge, "fails before headers")
    assert refused.status == 429
    assert refused.headers["retry-after"] == str(RETRY_AFTER_S)
    invalid = _http11(edge, "invalid after headers")
    assert invalid.status == 400 and invalid.headers["x-model-version"] == "1"
    answered = _http11(edge, "answer")
    assert answered.status == 200 and answered.body["text"] == "ok"
    assert answered.headers["x-request-id"] == "r-1"  # lifted from the trailers


@pytest.mark.parametrize("protocol", SEND)
def test_an_errors_trailers_that_act_on_the_client_stay_trailers(edge: Edge, protocol: str) -> None:
    answer = SEND[protocol](edge, "client-acting trailers after headers")
    assert answer.status == 400
    assert answer.headers.get("x-tokenmesh-kept") == "yes"  # metadata of ours is lifted
    assert "set-cookie" not in answer.headers and "location" not in answer.headers
    assert "x-envoy-injected" not in answer.headers
