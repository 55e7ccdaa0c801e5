"""A REST or OpenAI body over the edge's limit is 413 on every route, for every caller.

Nothing bounded a REST body before (gateway/request_body.py): a 9 MiB
`POST /v1/auth/token` reached the auth service and answered its 401, and an
over-large body from a caller without credentials was 401 on every route.
Now the edge answers 413 in the shape of the route's surface, from the
headers alone when the body declares its length, and once the body passes
the limit when it does not (chunked).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import grpc
import httpx
import pytest

from gateway import openai_edge, request_body
from tests.e2e.conftest import authed_channel
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

OVER = request_body.MAX_BODY_BYTES + (1 << 20)  # 9 MiB
REST_TOO_LARGE = {
    "code": grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    "message": request_body.TOO_LARGE_MESSAGE,
    "http_status": 413,
    "details": [],
}
OPENAI_TYPE, OPENAI_CODE = openai_edge.LOCAL_ERRORS[413]
OPENAI_TOO_LARGE = {
    "error": {
        "message": request_body.TOO_LARGE_MESSAGE,
        "type": OPENAI_TYPE,
        "param": None,
        "code": OPENAI_CODE,
    }
}
# A public RPC (nothing but the transcoder read its body), an admin one, a worker's
# (model routing buffers its body), and OpenAI's surface.
ROUTES = {
    "/v1/auth/token": REST_TOO_LARGE,
    "/v1/auth/keys": REST_TOO_LARGE,
    "/v1/models/deterministic-test:complete": REST_TOO_LARGE,
    "/openai/v1/chat/completions": OPENAI_TOO_LARGE,
}


def _body(size: int) -> bytes:
    """A JSON object of exactly `size` bytes: one long string field."""
    head, tail = b'{"prompt": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _chunks(body: bytes) -> Iterator[bytes]:
    """The body in 64 KiB pieces: httpx sends an iterator chunked, with no length."""
    for start in range(0, len(body), 1 << 16):
        yield body[start : start + (1 << 16)]


@pytest.fixture(scope="module")
def over() -> bytes:
    return _body(OVER)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("credentials", ["none", "admin key"])
@pytest.mark.parametrize("path", ROUTES)
def test_a_body_over_the_limit_is_413_in_the_routes_shape(
    mesh, admin_key, over, path, credentials, framing
):
    headers = {"content-type": "application/json"}
    if credentials != "none":
        headers["x-api-key"] = admin_key
    content = over if framing == "content-length" else _chunks(over)
    reply = httpx.post(f"{mesh.edge_url}{path}", content=content, headers=headers, timeout=30)
    assert (reply.status_code, reply.json()) == (413, ROUTES[path]), reply.text
    assert reply.headers["content-type"] == "application/json"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("content_type", ["application/grpc-web", "application/grpcx"])
def test_a_type_envoy_does_not_serve_as_grpc_is_a_rest_body(mesh, over, content_type, framing):
    # The checks skipped any type starting "application/grpc": a gRPC-Web (or made-up)
    # type carried 9 MiB to the auth service (401) and 40 MiB to its 16 MiB limit.
    content = over if framing == "content-length" else _chunks(over)
    reply = httpx.post(
        f"{mesh.edge_url}/v1/auth/token",
        content=content,
        headers={"content-type": content_type},
        timeout=30,
    )
    assert reply.status_code == 413, reply.text


def test_a_chunked_body_just_over_the_limit_is_refused_off_the_upload_paths(mesh):
    # One buffer filter at the uploads' limit (8 MiB and its multipart framing) let a
    # chunked JSON body up to 64 KiB over the 8 MiB limit reach its service.
    just_over = _body(request_body.MAX_BODY_BYTES + (16 << 10))
    assert len(just_over) < request_body.MAX_UPLOAD_BYTES
    reply = httpx.post(
        f"{mesh.edge_url}/v1/auth/token",
        content=_chunks(just_over),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert (reply.status_code, reply.json()) == (413, REST_TOO_LARGE), reply.text


def test_a_declared_length_over_the_limit_is_refused_before_any_body_byte(mesh):
    """The edge answers from the headers alone: it reads (and buffers) nothing of the
    body, whoever sends it, and spends no credential check on it."""
    edge = urlsplit(mesh.edge_url)
    request = (
        "POST /v1/models/deterministic-test:complete HTTP/1.1\r\n"
        f"host: {edge.netloc}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {OVER}\r\n\r\n"
    )
    with socket.create_connection((edge.hostname, edge.port), timeout=10) as connection:
        connection.sendall(request.encode())
        # The edge closes the connection after its answer (the body it did not read).
        answer = b""
        while received := connection.recv(65536):
            answer += received
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 413 Payload Too Large", head
    assert json.loads(body) == REST_TOO_LARGE


def test_a_body_at_the_limit_still_reaches_its_service(mesh):
    """The public token RPC reads the whole 8 MiB key and refuses it itself."""
    key = b"tm_" + b"x" * (request_body.MAX_BODY_BYTES - len(b'{"api_key": "tm_"}'))
    body = b'{"api_key": "' + key + b'"}'
    assert len(body) == request_body.MAX_BODY_BYTES
    reply = httpx.post(
        f"{mesh.edge_url}/v1/auth/token",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 401, reply.text
    assert reply.json()["details"][0]["reason"] == "INVALID_CREDENTIALS"


def test_a_native_grpc_request_over_the_rest_limit_reaches_the_worker(mesh, admin_key):
    """gRPC keeps its own, larger limit (the model-routing buffer): a 10 MiB prompt is
    the worker's to refuse, not the edge's."""
    prompt = "hello " * ((10 << 20) // 6)
    with authed_channel(mesh.edge_address, [("x-api-key", admin_key)]) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            rpc.InferenceServiceStub(channel).Complete(
                pb.CompleteRequest(model="deterministic-test", prompt=prompt, max_tokens=2),
                timeout=30,
            )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
    assert "prompt" in failed.value.details()
