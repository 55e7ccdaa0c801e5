"""A REST error answer of a unary RPC carries its headers over HTTP/1.1 and HTTP/2.

A worker sends a unary answer's headers (draft-03 x-ratelimit-*, request
id, ...) in its trailers for the edge to lift back (gateway/response_headers.py).
HTTP/1.1 cannot carry trailers on an answer with a content-length, so a REST
client over it sees only what became headers: the limits' headers of a
success and of a refusal, and a refusal's Retry-After, must be among them,
over HTTP/1.1 (curl's and http.client's default) as over HTTP/2. An error
whose handler sent its headers first is covered by
tests/integration/test_edge_error_trailers.py.
"""

from __future__ import annotations

import http.client
import json
import subprocess
from dataclasses import dataclass
from typing import Any

from services.launcher.mesh import Mesh
from tests.e2e.test_auth import create_key

PATH = "/v1/models/deterministic-test:complete"
LIMITS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def _http11(mesh: Mesh, key: str, body: dict[str, Any]) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", mesh.edge_port, timeout=30)
    try:
        headers = {"content-type": "application/json", "x-api-key": key}
        connection.request("POST", PATH, json.dumps(body), headers)
        reply = connection.getresponse()
        assert reply.version == 11
        received = {name.lower(): value for name, value in reply.getheaders()}
        return Answer(reply.status, received, json.loads(reply.read()))
    finally:
        connection.close()


def _http2(mesh: Mesh, key: str, body: dict[str, Any]) -> Answer:
    """REST over HTTP/2 (h2c) with curl: its headers, not its trailers."""
    result = subprocess.run(
        [
            "curl", "-sS", "--http2-prior-knowledge", "-D", "-",
            "-H", "content-type: application/json", "-H", f"x-api-key: {key}",
            "--data", json.dumps(body), f"{mesh.edge_url}{PATH}",
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    head, _, text = result.stdout.partition("\n\n")  # text mode: "\r\n" read as "\n"
    status_line, *lines = head.split("\n")
    assert status_line.startswith("HTTP/2 "), status_line
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return Answer(int(status_line.split()[1]), headers, json.loads(text))


def test_a_rate_limited_rest_call_has_its_limits_and_retry_after_over_both_protocols(mesh):
    key = create_key(mesh, "--rpm", "1")["secret"]
    answered = _http11(mesh, key, {"prompt": "a b", "max_tokens": 1})
    assert answered.status == 200, answered.body
    assert answered.headers["x-ratelimit-remaining"] == "0"
    assert set(LIMITS) <= answered.headers.keys()
    for send in (_http11, _http2):
        refused = send(mesh, key, {"prompt": "a b", "max_tokens": 1})
        assert refused.status == 429, refused.body
        assert refused.body["code"] == 8  # RESOURCE_EXHAUSTED
        assert 1 <= int(refused.headers["retry-after"]) <= 60, send
        assert refused.headers["x-ratelimit-remaining"] == "0", send
        assert refused.headers["x-ratelimit-limit"].startswith("1"), send


def test_an_invalid_rest_call_has_its_limits_over_both_protocols(mesh):
    key = create_key(mesh, "--rpm", "10")["secret"]
    remaining = []
    for send in (_http11, _http2):
        refused = send(mesh, key, {"prompt": "a b", "max_tokens": -1})
        assert refused.status == 400, refused.body
        assert refused.body["code"] == 3  # INVALID_ARGUMENT
        assert set(LIMITS) <= refused.headers.keys(), send
        remaining.append(refused.headers["x-ratelimit-remaining"])
    assert remaining == ["9", "8"]
