"""The bare OpenAI backend (gateway.openai_backend): the peer benchmark's baseline and
LiteLLM's backend, a real Envoy in front of a real worker over mTLS."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from bench.peer import STREAM_BODY, UNARY_BODY, UNARY_TOKENS, bare_backend
from gateway.envoy_config import Endpoint


@pytest.fixture(scope="module")
def backend(mesh, tmp_path_factory) -> Iterator[str]:
    worker = Endpoint("127.0.0.1", mesh.ports["inference-0"])
    state = tmp_path_factory.mktemp("openai-backend")
    descriptor = mesh.state_dir / "tokenmesh.pb"
    with bare_backend(state, worker, descriptor, mesh.sds_dir, []) as (url, _):
        yield url


def test_a_chat_completion_needs_no_credential_and_comes_from_the_worker(backend):
    reply = httpx.post(f"{backend}/openai/v1/chat/completions", content=UNARY_BODY, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == UNARY_TOKENS


def test_a_stream_arrives_as_server_sent_events_to_done(backend):
    url = f"{backend}/openai/v1/chat/completions"
    with httpx.stream("POST", url, content=STREAM_BODY, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_only_the_openai_surface_is_served_and_errors_keep_openai_shape(backend):
    assert httpx.get(f"{backend}/v2/models", timeout=10).status_code == 404
    unknown = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "a"}]})
    reply = httpx.post(f"{backend}/openai/v1/chat/completions", content=unknown, timeout=30)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"
