"""Non-streamed answers over 1 MiB (the edge's buffer) through a real Envoy: 200, whole.

OpenAI's chat and legacy completions with n and logprobs, embeddings of the
most inputs as floats, and v2's REST Complete and Embed. Before, each was one
message the transcoder had to buffer within 1 MiB: a 500, which the OpenAI SDK
retried twice, each run computed and billed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from bench.peer import bare_backend
from gateway.envoy_config import Endpoint
from services.core import contract
from services.inference.validation import MAX_EMBED_INPUTS
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

EDGE_BUFFER_BYTES = 1 << 20
MODEL = "deterministic-test"
EMBEDDER = "all-minilm-l6-v2"
# n=4, 160 tokens with 20 alternatives each: ~1.1 MB of JSON (the deterministic engine;
# more choices of fewer tokens: the same bytes in half the engine steps).
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "a"}],
    "n": 4,
    "max_tokens": 160,
    "logprobs": True,
    "top_logprobs": 20,
    "seed": 7,
}
# 8 prompts x n=4 x 200 tokens with 5 alternatives each: ~1.2 MB.
LEGACY: dict[str, Any] = {
    "model": MODEL,
    "prompt": ["a", "b", "c", "d", "e", "f", "g", "h"],
    "n": 4,
    "max_tokens": 200,
    "logprobs": 5,
    "seed": 7,
}
INPUTS = [f"text number {i}" for i in range(MAX_EMBED_INPUTS)]


@pytest.fixture(scope="module")
def backend(mesh, tmp_path_factory) -> Iterator[str]:
    worker = Endpoint("127.0.0.1", mesh.ports["inference-0"])
    state = tmp_path_factory.mktemp("openai-backend-large")
    with bare_backend(state, worker, mesh.state_dir / "tokenmesh.pb", mesh.sds_dir, []) as (url, _):
        yield url


def _sdk(base_url: str, key: str = "none") -> openai.OpenAI:
    # max_retries=0: a 500 fails the test at once instead of running (and billing) thrice.
    return openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=120)


def _direct(mesh: Any, method: str, body: dict[str, Any]) -> bytes:
    """The worker's own bytes for `body` (gRPC, as the edge calls it)."""
    from google.api.httpbody_pb2 import HttpBody

    with mesh.channel("inference-0", contract.EDGE) as channel:
        stub = openai_rpc.OpenAIServiceStub(channel)
        request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
        parts = list(getattr(stub, method)(request, timeout=120))
    return b"".join(part.data for part in parts)


def _same_but_ids(edge: bytes, direct: bytes) -> None:
    """Asserts the edge passed the worker's bytes unchanged (but the answer's id and time)."""
    from services.inference.openai import shapes

    assert len(edge) > EDGE_BUFFER_BYTES
    answered = json.loads(edge)
    expected = json.loads(direct)
    expected["id"], expected["created"] = answered["id"], answered["created"]
    assert edge == shapes.json_bytes(expected)


def test_a_chat_answer_over_a_mebibyte_comes_whole_through_the_bare_backend(mesh, backend):
    with _sdk(f"{backend}/openai/v1") as client:
        raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.http_response.status_code == 200
    edge = raw.http_response.content
    _same_but_ids(edge, _direct(mesh, "CreateChatCompletion", CHAT))
    answer = raw.parse()
    assert [c.index for c in answer.choices] == list(range(CHAT["n"]))
    for choice in answer.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == CHAT["max_tokens"]
        assert all(len(item.top_logprobs) == 20 for item in choice.logprobs.content)


def test_a_legacy_completion_over_a_mebibyte_comes_whole_through_the_bare_backend(mesh, backend):
    reply = httpx.post(f"{backend}/openai/v1/completions", json=LEGACY, timeout=120)
    assert reply.status_code == 200, reply.text[:300]
    _same_but_ids(reply.content, _direct(mesh, "CreateCompletion", LEGACY))
    assert [c["index"] for c in reply.json()["choices"]] == list(range(32))


def test_the_most_embeddings_as_floats_come_through_the_bare_backend(backend):
    with _sdk(f"{backend}/openai/v1") as client:
        raw = client.embeddings.with_raw_response.create(
            model=EMBEDDER, input=INPUTS, encoding_format="float"
        )
    assert raw.http_response.status_code == 200
    assert len(raw.http_response.content) > EDGE_BUFFER_BYTES
    # The request id rides a unary answer's trailers; the backend lifts it, as the edge.
    assert raw.http_response.headers["x-request-id"]
    assert contract.RESPONSE_HEADERS_TRAILER not in raw.http_response.headers
    answer = raw.parse()
    assert [item.index for item in answer.data] == list(range(MAX_EMBED_INPUTS))
    assert all(len(item.embedding) == 384 for item in answer.data)


def test_large_openai_answers_come_through_the_edge(mesh, admin_key):
    with _sdk(f"{mesh.edge_url}/openai/v1", admin_key) as client:
        chat = client.chat.completions.with_raw_response.create(**CHAT)
        embeddings = client.embeddings.with_raw_response.create(
            model=EMBEDDER, input=INPUTS, encoding_format="float"
        )
    for raw in (chat, embeddings):
        assert raw.http_response.status_code == 200
        assert len(raw.http_response.content) > EDGE_BUFFER_BYTES
        assert raw.http_response.headers["x-request-id"]
    assert len(chat.parse().choices) == CHAT["n"]
    assert len(embeddings.parse().data) == MAX_EMBED_INPUTS


def test_large_v2_rest_answers_come_through_the_edge(mesh, admin_key):
    auth = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=mesh.edge_url, headers=auth, timeout=120) as http:
        embed = http.post(f"/v2/models/{EMBEDDER}:embed", json={"inputs": INPUTS})
        complete = http.post(
            f"/v2/models/{MODEL}:complete",
            json={"prompt": "a", "n": 8, "max_output_tokens": 320, "logprobs": True,
                  "top_logprobs": 20},
        )  # fmt: skip
    for reply in (embed, complete):
        assert reply.status_code == 200, reply.text[:300]
        assert len(reply.content) > EDGE_BUFFER_BYTES
    assert len(embed.json()["embeddings"]) == MAX_EMBED_INPUTS
    assert len(complete.json()["choices"]) == 8
