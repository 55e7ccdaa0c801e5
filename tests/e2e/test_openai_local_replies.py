"""Envoy's own error replies on /openai/ paths reach OpenAI's SDKs in OpenAI's shape.

Through the real edge over HTTP/1.1 (what the SDKs speak). Two kinds came
out in the REST API's google.rpc shape (`{"code", "message", "details"}`,
which the SDKs read as an error without `type` or a usable `code`):

- a status no /openai/ mapper had: 408 when the request did not arrive
  within the edge's `request_timeout`;
- replies Envoy sends before it read the request's headers (431 for headers
  too large, 400 for a header name with "_", 408 for headers too slow):
  no request header exists then, so no mapper could tell an /openai/ path.
  They answer one body both kinds of client read.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from gateway.envoy_config import EdgeLimits
from services.launcher.mesh import Mesh

SHORT_EDGE = "edge-short-timeouts"
# Longer than the short edge's limits, far shorter than the default edge's.
PATIENCE_S = 30


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


def _exchange(address: str, sent: bytes) -> Reply:
    """Sends raw HTTP/1.1 bytes (a request cut short, on purpose) and reads the reply
    up to the connection's close (Envoy closes after these replies)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=PATIENCE_S) as connection:
        connection.sendall(sent)
        received = b""
        deadline = time.monotonic() + PATIENCE_S
        while chunk := connection.recv(65536):
            received += chunk
            assert time.monotonic() < deadline, received
    head, _, body = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), status_line
    return Reply(int(status_line.split()[1]), json.loads(body))


def _sdk(mesh: Mesh, key: str, headers: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key,
        base_url=f"{mesh.edge_url}/openai/v1",
        max_retries=0,
        timeout=PATIENCE_S,
        default_headers=headers,
    )


def _openai_error(raised: pytest.ExceptionInfo[openai.APIStatusError]) -> tuple[str | None, str]:
    error = raised.value
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    assert error.body["message"]
    return error.type, str(error.code)


@pytest.fixture(scope="module")
def short_edge(mesh: Mesh) -> Iterator[str]:
    """An edge of the mesh whose requests (and their headers) must arrive within 1 s."""
    limits = EdgeLimits(request_timeout_s=1.0, request_headers_timeout_s=1.0)
    address = mesh.start_extra_edge(SHORT_EDGE, limits=limits)
    yield address
    mesh.terminate(SHORT_EDGE)
    mesh.wait_exit(SHORT_EDGE)


def test_headers_over_the_edges_limit_are_openais_431(mesh, admin_key):
    padding = {"x-padding": "a" * (EdgeLimits().max_request_headers_kb * 1024)}
    with (
        pytest.raises(openai.APIStatusError) as refused,
        _sdk(mesh, admin_key, padding) as client,
    ):
        client.models.list()
    assert refused.value.status_code == 431
    assert _openai_error(refused) == ("invalid_request_error", "request_headers_too_large")


def test_a_header_name_with_an_underscore_is_openais_400(mesh, admin_key):
    with (
        pytest.raises(openai.BadRequestError) as refused,
        _sdk(mesh, admin_key, {"x_smuggled": "1"}) as client,
    ):
        client.models.list()
    assert _openai_error(refused) == ("invalid_request_error", "invalid_request")


def test_a_request_slower_than_the_edge_waits_is_openais_408(short_edge, admin_key):
    def cut_short(path: str) -> Reply:
        return _exchange(
            short_edge,
            f"POST {path} HTTP/1.1\r\nhost: edge\r\nx-api-key: {admin_key}\r\n"
            "content-type: application/json\r\ncontent-length: 100\r\n\r\n{".encode(),
        )

    openai_reply = cut_short("/openai/v1/chat/completions")
    assert openai_reply.status == 408
    assert set(openai_reply.body) == {"error"}
    error = openai_reply.body["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "request_timeout",
        None,
    )
    rest = cut_short("/v1/models/deterministic-test:complete")  # our own API: as before
    assert rest.status == 408 and rest.body["code"] == 4 and "error" not in rest.body


def test_headers_slower_than_the_edge_waits_are_a_408_both_clients_read(short_edge):
    # No request header exists yet: /openai/ or not, one body for both shapes.
    reply = _exchange(short_edge, b"GET /openai/v1/models HTTP/1.1\r\nhost: edge\r\n")
    assert reply.status == 408
    assert reply.body["code"] == 4 and reply.body["details"] == []  # google.rpc, for REST
    error = reply.body["error"]  # what OpenAI's SDKs read
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert error["message"] == reply.body["message"]


@pytest.mark.parametrize(
    "headers",
    [
        ["x-padding: " + "a" * (EdgeLimits().max_request_headers_kb * 1024)],
        [f"x-header-{n}: 1" for n in range(EdgeLimits().max_headers + 1)],
        ["x_smuggled: 1"],
    ],
    ids=["too large", "too many", "underscore"],
)
def test_over_http2_such_a_request_gets_no_reply_to_shape(mesh, admin_key, headers):
    # What docs/openai.md says Envoy cannot reshape: it resets the HTTP/2 stream
    # (REFUSED_STREAM or INTERNAL_ERROR) and sends no status at all.
    result = subprocess.run(
        [
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge",
            "-H", f"x-api-key: {admin_key}",
            *(arg for header in headers for arg in ("-H", header)),
            f"{mesh.edge_url}/openai/v1/models",
        ],
        capture_output=True, text=True, timeout=PATIENCE_S,
    )  # fmt: skip
    assert result.stdout == "000", result
    assert result.returncode != 0, result  # curl: the stream was reset, no answer
