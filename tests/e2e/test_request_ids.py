"""Every answer names its request id, the one the edge's access log holds.

OpenAI answers every request with `x-request-id`, and its SDK shows it as an
error's `request_id` (what users quote to support). The edge's errors had none
(a worker's trailers-only refusal, Envoy's own replies), and a success named
the worker's own id, which no edge log held. Now the edge adds its id to every
answer that has none, and a worker adopts it when the caller named no
`request_id` of its own (tests/e2e/test_answer_headers.py: a caller's own id
stays).
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import openai
import pytest

from services.launcher.mesh import Mesh
from tests.e2e.test_edge_access_log import _logged, http  # noqa: F401
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
COMPLETE = f"/v2/models/{MODEL}:complete"
CHAT = "/openai/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "a b"}]


@pytest.mark.parametrize(
    ("path", "body", "auth", "status"),
    [
        (COMPLETE, {"prompt": "a b", "max_output_tokens": 2}, True, 200),
        (COMPLETE, {"prompt": "a b", "max_output_tokens": 2, "stream": True}, True, 200),
        (COMPLETE, {"prompt": "a b", "max_output_tokens": 0}, True, 400),  # the worker's
        ("/v2/models/no-such-model:complete", {"prompt": "a b"}, True, 404),
        (COMPLETE, {"prompt": "a b"}, False, 401),  # the edge's own reply
        (CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}, True, 200),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, True, 400),
    ],
)
def test_an_answer_names_the_request_id_in_the_access_log(
    mesh: Mesh,
    http: httpx.Client,  # noqa: F811 - the fixture imported above
    path: str,
    body: dict[str, Any],
    auth: bool,
    status: int,
) -> None:
    replies: list[httpx.Response] = []
    headers = None if auth else {"authorization": ""}
    line = _logged(mesh, path, lambda: replies.append(http.post(path, json=body, headers=headers)))
    (reply,) = replies
    assert reply.status_code == status, reply.text
    assert reply.headers.get_list("x-request-id") == [line["request_id"]], line


def test_a_grpc_error_names_its_request_id(mesh: Mesh, channel: grpc.Channel) -> None:
    stub = rpc.InferenceServiceStub(channel)
    bad = pb.CompleteRequest(model=MODEL, prompt="a b", max_output_tokens=10**6)
    with pytest.raises(grpc.RpcError) as error:
        stub.Complete(bad, timeout=30)
    call: Any = error.value
    metadata = {key: value for key, value in call.trailing_metadata() or ()}
    assert metadata.get("x-request-id"), metadata


def test_the_openai_sdk_reads_an_errors_request_id(mesh: Mesh, admin_key: str) -> None:
    with openai.OpenAI(
        api_key=admin_key, base_url=f"{mesh.edge_url}/openai/v1", max_retries=0, timeout=60
    ) as client:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)  # type: ignore[arg-type]
        assert error.value.request_id
        answer = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=2,
        )
        assert answer.headers["x-request-id"]
        # The answer's id is the request id (OpenAI's `chatcmpl-...`).
        assert answer.parse().id == f"chatcmpl-{answer.headers['x-request-id']}"


def test_the_edges_health_answer_names_a_request_id(mesh: Mesh) -> None:
    """Every edge answer names one (README); `GET /healthz`, answered by the health-check
    filter before any route's headers apply, named none."""
    reply = httpx.get(f"{mesh.edge_url}/healthz", timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers.get("x-request-id"), dict(reply.headers)
