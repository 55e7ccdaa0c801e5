"""The edge's access log (logs/edge-access.log) names the gRPC status the service answered.

The transcoder turns a worker's trailers-only refusal into the HTTP status and
drops its `grpc-status`, and Envoy's %GRPC_STATUS% then derived one from the
HTTP status: every REST and OpenAI 400 was logged `Internal` (a 404
`Unimplemented`), so searching the log for `Internal` found every client's bad
request. The edge keeps the upstream's status for the log
(gateway/envoy_config.py, upstream_status_filter).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest

from services.launcher.mesh import Mesh
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
GRPC_COMPLETE = "/tokenmesh.inference.v2.InferenceService/Complete"


@pytest.fixture(scope="module")
def http(mesh: Mesh, admin_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=mesh.edge_url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30
    ) as client:
        yield client


def _logged(mesh: Mesh, path: str, send: Callable[[], Any]) -> dict[str, Any]:
    """Sends one request; returns its access-log line (the first for `path` after it)."""
    log = mesh.log_dir / "edge-access.log"
    start = log.stat().st_size if log.exists() else 0
    send()
    deadline = time.monotonic() + 15  # Envoy flushes its access log about every second
    while time.monotonic() < deadline:
        if log.exists():
            with log.open("rb") as lines:
                lines.seek(start)
                for raw in lines.read().splitlines():
                    line = json.loads(raw)
                    if line["path"] == path:
                        return dict(line)
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {path} within 15 s")


@pytest.mark.parametrize(
    ("path", "body", "status", "grpc_status"),
    [
        # The OpenAI routes (a chat is a server stream; embeddings unary).
        ("/openai/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, 400, "InvalidArgument"),
        ("/openai/v1/chat/completions", {**CHAT, "n": 9, "stream": True}, 400, "InvalidArgument"),
        ("/openai/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404, "NotFound"),
        ("/openai/v1/chat/completions", CHAT, 200, "OK"),
        ("/openai/v1/chat/completions", {**CHAT, "stream": True}, 200, "OK"),
        (
            "/openai/v1/embeddings",
            {"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "int8"},
            400,
            "InvalidArgument",
        ),
        # Our own REST API.
        (
            f"/v2/models/{MODEL}:complete",
            {"prompt": "a b", "max_output_tokens": 0},
            400,
            "InvalidArgument",
        ),
        ("/v2/models/no-such-model:complete", {"prompt": "a b"}, 404, "NotFound"),
        (f"/v2/models/{MODEL}:complete", {"prompt": "a b", "max_output_tokens": 2}, 200, "OK"),
    ],
)
def test_a_transcoded_answer_logs_the_workers_grpc_status(
    mesh: Mesh, http: httpx.Client, path: str, body: dict[str, Any], status: int, grpc_status: str
) -> None:
    line = _logged(mesh, path, lambda: http.post(path, json=body))
    assert (line["status"], line["grpc_status"]) == (status, grpc_status), line


def test_a_grpc_answer_logs_its_status(mesh: Mesh, channel: grpc.Channel) -> None:
    stub = rpc.InferenceServiceStub(channel)
    bad = pb.CompleteRequest(model=MODEL, prompt="a b", max_output_tokens=10**6)

    def refused() -> None:
        with pytest.raises(grpc.RpcError) as error:
            stub.Complete(bad, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    line = _logged(mesh, GRPC_COMPLETE, refused)
    assert (line["status"], line["grpc_status"]) == (200, "InvalidArgument"), line
    good = pb.CompleteRequest(model=MODEL, prompt="a b", max_output_tokens=2)
    line = _logged(mesh, GRPC_COMPLETE, lambda: stub.Complete(good, timeout=30))
    assert line["grpc_status"] == "OK", line


def test_envoys_own_refusal_of_a_rest_request_logs_no_grpc_status(
    mesh: Mesh, http: httpx.Client
) -> None:
    # No service answered: nothing is derived from the HTTP status (a body that is
    # not JSON, which the transcoder refuses itself, was `Internal` too).
    path = f"/v2/models/{MODEL}:complete"
    line = _logged(mesh, path, lambda: http.post(path, content=b"{"))
    assert (line["status"], line["grpc_status"]) == (400, None), line
    bad_key = {"authorization": "Bearer tm-no-such-key"}
    line = _logged(
        mesh, path, lambda: httpx.post(mesh.edge_url + path, json={}, headers=bad_key, timeout=30)
    )
    assert (line["status"], line["grpc_status"]) == (401, None), line
