"""docs/openapi.yaml describes what the edge answers besides a route's 200: the REST
Complete's `Prefer: respond-async` (202 with the job), 413 for a JSON body over the
edge's buffer, and how a stream ends when it failed or was cut."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from gateway import envoy_config, handover, openai_edge, openapi
from services.jobs.handover import MAX_WAIT_S
from tests.unit.test_openapi import error_reply_problems


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # The committed document (test_openapi checks that it is current).
    return dict(yaml.safe_load(openapi.DOCUMENT_PATH.read_text(encoding="utf-8")))


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, verb, operation)
        for path, operations in document["paths"].items()
        for verb, operation in operations.items()
    ]


def test_each_complete_the_edge_hands_over_documents_prefer_and_its_202(document):
    handed_over = [
        (path, operation)
        for path, verb, operation in _operations(document)
        if verb == "post" and re.match(handover.COMPLETE_PATHS, path)
    ]
    assert sorted(path for path, _ in handed_over) == [
        "/v1/models/{model}:complete",
        "/v2/models/{model}:complete",
    ]
    for path, operation in handed_over:
        [prefer] = [p for p in operation["parameters"] if p["name"] == "Prefer"]
        assert prefer["in"] == "header" and not prefer["required"], path
        assert "respond-async" in prefer["description"] and "wait=" in prefer["description"]
        assert f"at most {MAX_WAIT_S:g}" in prefer["description"], path
        accepted = operation["responses"]["202"]
        assert {"location", "preference-applied"} <= set(accepted["headers"]), path
        schema = accepted["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/tokenmesh.jobs.v1.Job"}, path
    assert "tokenmesh.jobs.v1.Job" in document["components"]["schemas"]
    # Nothing else answers 202.
    others = [p for p, _, op in _operations(document) if "202" in op["responses"]]
    assert sorted(others) == sorted(path for path, _ in handed_over)


def _too_large(path: str) -> dict[str, Any]:
    """Envoy's own reply to a body over its buffer, in the path's error shape (as
    tests/e2e/test_hostile_input.py and the OpenAI routes get it)."""
    if path.startswith(openai_edge.PATH_PREFIX):
        kind, code = openai_edge.LOCAL_ERRORS[413]
        return {"error": {"message": "Request rejected", "type": kind, "param": None, "code": code}}
    return dict(envoy_config._error_body(8)["json_format"]) | {
        "http_status": 413,
        "message": "Payload Too Large",
    }


def test_every_json_route_documents_the_edges_413(document):
    json_routes = [
        (path, verb)
        for path, verb, operation in _operations(document)
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]
    assert len(json_routes) > 10
    problems = [
        problem
        for path, verb in json_routes
        for problem in error_reply_problems(document, path, verb, 413, _too_large(path))
    ]
    assert not problems, problems
    described = document["components"]["responses"]["PayloadTooLarge"]["description"]
    assert f"{envoy_config.MAX_TRANSCODED_RESPONSE_BYTES >> 20} MiB" in described
    # A route that reads no body never gets it.
    assert "413" not in document["paths"]["/v2/models"]["get"]["responses"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_generate_stream_says_how_a_failed_and_a_cut_stream_end(document, version):
    ok = document["paths"][f"/{version}/models/{{model}}:generate"]["post"]["responses"]["200"]
    text = " ".join(ok["description"].split())
    # A failure after the stream started: in-band final messages, then trailers.
    for words in ("final message", "`error`", "FINISH_REASON_ERROR", "trailers"):
        assert words in text, words
    # A cut stream: neither; how HTTP/1.1 clients see it (docs/reliability.md's words).
    for words in ("no trailers", "without its last chunk", "exit code 18", "RemoteProtocolError"):
        assert words in text, words
