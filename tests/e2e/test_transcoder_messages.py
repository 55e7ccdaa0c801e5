"""The transcoder's 400s speak the API's words, not protobuf's (gateway/transcoder_messages.py).

Its messages named protobuf types (`in the type "tokenmesh.openai.v1.ListModelsRequest"`,
`for type TYPE_INT32`, `type.googleapis.com/tokenmesh.inference.v1.Priority`) and
protobuf's own terms ("Proto field is not repeating"), to REST and OpenAI callers.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from services.launcher.mesh import Mesh

COMPLETE = "/v1/models/deterministic-test:complete"
CASES = [
    ("GET", "/v1/models?foo=1", None, 'unknown query parameter "foo"'),
    (
        "GET",
        "/v2/models?page_size=abc",
        None,
        'page_size: invalid value "abc" (expected an integer)',
    ),
    (
        "POST",
        COMPLETE,
        {"prompt": "a", "temperature": "hot"},
        'temperature: invalid value "hot" (expected a number)',
    ),
    (
        "POST",
        COMPLETE,
        {"prompt": "a", "priority": "NOPE"},
        'priority: invalid value "NOPE" (not one of the field\'s values)',
    ),
    ("POST", COMPLETE, {"prompt": {"a": 1}}, "prompt: Starting an object on a scalar field"),
    ("POST", COMPLETE, {"prompt": ["a"]}, "a list where one value belongs"),
    (
        "POST",
        COMPLETE,
        {"prompt": "a", "stop": [{"a": 1}]},
        "stop: Starting an object on a scalar field",
    ),
    (
        "POST",
        "/v2/models/deterministic-test:complete",
        {"prompt": "a", "sampling": "hot"},
        'sampling: invalid value "hot" (expected an object)',
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), CASES)
def test_a_rest_caller_reads_the_apis_words(
    mesh: Mesh, method: str, path: str, body: dict[str, Any] | None, message: str
) -> None:
    reply = httpx.request(
        method,
        f"{mesh.edge_url}{path}",
        json=body,
        headers={"x-api-key": mesh.dev_api_key()},
        timeout=10,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["message"] == message
    assert reply.json()["code"] == 3


def test_an_openai_caller_reads_which_query_parameter_is_unknown(mesh: Mesh) -> None:
    reply = httpx.get(
        f"{mesh.edge_url}/openai/v1/models?api-version=2024-06-01",
        headers={"authorization": f"Bearer {mesh.dev_api_key()}"},
        timeout=10,
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["message"] == 'unknown query parameter "api-version"'
    assert error["type"] == "invalid_request_error"


def test_a_workers_own_400_is_left_as_it_is(mesh: Mesh) -> None:
    reply = httpx.post(
        f"{mesh.edge_url}{COMPLETE}",
        json={"prompt": "a", "max_tokens": -1},
        headers={"x-api-key": mesh.dev_api_key()},
        timeout=10,
    )
    assert reply.status_code == 400
    body = reply.json()
    assert body["message"] == "max_tokens: must be between 1 and 8192"
    assert any(d["@type"].endswith("BadRequest") for d in body["details"])


def test_a_bad_time_says_what_a_time_looks_like(mesh: Mesh) -> None:
    reply = httpx.get(
        f"{mesh.edge_url}/v1/usage?start_time=yesterday",
        headers={"x-api-key": mesh.dev_api_key()},
        timeout=10,
    )
    assert reply.status_code == 400
    message = reply.json()["message"]
    assert message.startswith("start_time: ")
    assert message.endswith("(expected an RFC 3339 time, such as 2026-01-02T03:04:05Z)")
    assert "googleapis" not in message
