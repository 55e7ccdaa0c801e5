"""A REST stream that fails before its first token: SSE events through the real edge.

A v1/v2 Generate stream sends its response headers once it is queued, so a
failure before its first token (here every prefill fails:
TOKENMESH_TEST_ENGINE_ERROR_RATE=1) reached a REST client as `200
text/event-stream` and then only the transcoder's bare JSON status line, which
the SSE format ignores: zero events, a failure that looked like an empty
success. The stream now ends with each choice's final event, `finish_reason`
the error one and `error` set, as the contract says of a stream failing after
it started. The OpenAI route holds its headers until its first body: it still
answers such a failure with an HTTP 500 and OpenAI's error JSON.

A mesh of its own (one worker whose every generation fails, the response cache
on: a seeded request leads a shared computation, its own path in the worker).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.prompts import unique_prompt

MODEL = "deterministic-test"
ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_MODELS": "",  # the test engine only: every generation fails
    "TOKENMESH_TEST_ENGINE_ERROR_RATE": "1",  # each prefill (its warm-up is exempt)
    "TOKENMESH_CACHE": "on",
}
INTERNAL = 13


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("failing")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "failing" in request.fixturenames:
        print(request.getfixturevalue("failing").log_tails(40))


@pytest.fixture(scope="module")
def http(failing: Mesh) -> Iterator[httpx.Client]:
    headers = {"x-api-key": failing.dev_api_key()}
    with httpx.Client(base_url=failing.edge_url, timeout=30, headers=headers) as client:
        yield client


def sse_events(body: str) -> list[dict[str, Any]]:
    """Returns the events an SSE reader dispatches (the spec's parsing: `data:` fields
    up to a blank line; any other line is a field or comment it ignores)."""
    events: list[dict[str, Any]] = []
    data: list[str] = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if not line:
            if data:
                events.append(json.loads("\n".join(data)))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


def _stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json=body) as response:
        text = response.read().decode()
        assert response.status_code == 200, text
        assert response.headers["content-type"].startswith("text/event-stream")
    return sse_events(text)


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.7}, {"seed": 3}],  # computed alone; leading a shared computation
    ids=["own", "leader"],
)
def test_a_v2_stream_failing_before_its_first_token_sends_each_choice_an_error_event(
    http: httpx.Client, sampling: dict[str, Any]
) -> None:
    body = {"prompt": unique_prompt("fails"), "max_output_tokens": 3, "n": 2, "sampling": sampling}
    events = _stream(http, f"/v2/models/{MODEL}:generate", body)
    assert sorted(e["choice_index"] for e in events) == [0, 1], events
    for event in events:
        assert event["finish_reason"] == "FINISH_REASON_ERROR", event
        assert event["error"]["code"] == INTERNAL, event
        assert event["error"]["message"] == "internal error; see server logs"


def test_a_v1_stream_failing_before_its_first_token_sends_an_error_event(
    http: httpx.Client,
) -> None:
    body = {"prompt": unique_prompt("fails v1"), "max_tokens": 3}
    [event] = _stream(http, f"/v1/models/{MODEL}:generate", body)
    assert event["finish_reason"] == "error", event
    assert event["error"]["code"] == "INTERNAL", event


def test_an_openai_stream_failing_before_its_first_token_is_still_an_http_error(
    http: httpx.Client,
) -> None:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 3,
        "messages": [{"role": "user", "content": unique_prompt("fails openai")}],
    }
    reply = http.post("/openai/v1/chat/completions", json=body)
    assert reply.status_code == 500, reply.text
    assert reply.json()["error"]["code"] == "internal"
