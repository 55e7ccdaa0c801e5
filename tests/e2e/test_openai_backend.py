"""The bare OpenAI backend (gateway.openai_backend): the peer benchmark's baseline and
LiteLLM's backend, a real Envoy in front of a real worker over mTLS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from bench.peer import STREAM_BODY, UNARY_BODY, UNARY_TOKENS, bare_backend
from gateway import openapi
from gateway.envoy_config import Endpoint
from tests.e2e.test_openai_local_replies import _exchange
from tests.unit.test_openapi import error_reply_problems

# Over Envoy's default max_request_headers_kb (60), which the bare backend keeps.
OVERSIZED_HEADER = "a" * 64 * 1024


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


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return dict(yaml.safe_load(openapi.DOCUMENT_PATH.read_text(encoding="utf-8")))


def _documented(document: dict[str, Any], body: dict[str, Any], status: int) -> list[str]:
    """What docs/openapi.yaml gets wrong about this reply, on an /openai/ route and on ours
    (sent before any header was read, the edge's body is the same whatever the path)."""
    return [
        *error_reply_problems(document, "/openai/v1/models", "get", status, body),
        *error_reply_problems(document, "/v2/models", "get", status, body),
    ]


def test_headers_over_envoys_limit_are_openais_431_in_both_shapes(backend, document):
    # Envoy answers before it read any header, so no /openai/ path mapper can
    # match: the bare backend answered Envoy's plain text until it had the
    # edge's before-headers mappers.
    with (
        openai.OpenAI(api_key="none", base_url=f"{backend}/openai/v1", max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as refused,
    ):
        client.with_options(default_headers={"x-padding": OVERSIZED_HEADER}).models.list()
    assert refused.value.status_code == 431
    assert (refused.value.type, refused.value.code) == (
        "invalid_request_error",
        "request_headers_too_large",
    )
    body = refused.value.response.json()
    assert body["code"] == 8 and body["http_status"] == 431  # what REST clients read
    problems = _documented(document, body, 431)
    assert not problems, problems


def test_a_malformed_request_is_openais_400_in_both_shapes(backend, document):
    # A header line without a colon: the HTTP/1.1 codec refuses it, before any header.
    reply = _exchange(
        backend.removeprefix("http://"), b"GET /openai/v1/models HTTP/1.1\r\nhost nocolon\r\n\r\n"
    )
    assert reply.status == 400
    error = reply.body["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_request",
        None,
    )
    assert reply.body["code"] == 3 and reply.body["message"] == error["message"]
    problems = _documented(document, reply.body, 400)
    assert not problems, problems
