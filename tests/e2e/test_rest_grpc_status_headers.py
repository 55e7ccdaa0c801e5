"""REST answers through the real edge carry no gRPC status headers, and the REST
Complete's `Prefer: respond-async` answer is the one docs/openapi.yaml describes.

The transcoder merges a unary answer's trailers into its headers: every REST 200,
and the jobs service's 202 to `Prefer: respond-async`, showed `grpc-status: 0`
and an empty `grpc-message` to REST clients. A REST error never had them.

Every REST and OpenAI answer, streams included, also passed on the service's
`grpc-accept-encoding` (gateway/response_headers.py); a native gRPC answer
keeps all of gRPC's fields.
"""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from gateway import openapi
from tests.e2e import test_jobs_handover as handover

MODEL = "deterministic-test"
GRPC_STATUS_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")
V2_COMPLETE = (
    "/v2/models/{model}:complete",
    {"prompt": "In the beginning", "max_output_tokens": 2},
)
# A REST client with a key of the jobs scopes (the handover tests' fixture).
api = handover.api
V1_COMPLETE = ("/v1/models/{model}:complete", {"prompt": "In the beginning", "max_tokens": 2})


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return dict(yaml.safe_load(openapi.DOCUMENT_PATH.read_text(encoding="utf-8")))


def _leaked(reply: httpx.Response) -> dict[str, str]:
    return {name: reply.headers[name] for name in GRPC_STATUS_HEADERS if name in reply.headers}


def _validate(document: dict[str, Any], schema: dict[str, Any], body: Any) -> None:
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    root["components"] = document["components"]
    jsonschema.Draft202012Validator(root).validate(body)


@pytest.mark.parametrize(("path", "body"), [V2_COMPLETE, V1_COMPLETE])
def test_a_respond_async_complete_answers_the_documented_202_without_grpc_headers(
    api, document, path, body
):
    reply = api.post(path.format(model=MODEL), json=body, headers={"Prefer": "respond-async"})
    assert reply.status_code == 202, reply.text
    assert not _leaked(reply), reply.headers
    operation = document["paths"][path]["post"]
    assert "Prefer" in [p["name"] for p in operation["parameters"] if p["in"] == "header"]
    accepted = operation["responses"]["202"]
    for name, header in accepted["headers"].items():
        if header.get("required"):
            assert name in reply.headers, name
    assert reply.headers["preference-applied"] == "respond-async"
    _validate(document, accepted["content"]["application/json"]["schema"], reply.json())
    assert reply.headers["location"] == f"/v1/jobs/{reply.json()['id']}"


def test_rest_answers_carry_no_grpc_status_headers(api):
    path, body = V2_COMPLETE
    complete = path.format(model=MODEL)
    replies = {
        "complete": api.post(complete, json=body),
        "complete, answered inline by the jobs service": api.post(
            complete, json=body, headers={"Prefer": "respond-async, wait=30"}
        ),
        "list": api.get("/v2/models"),
        "error": api.post(complete, json={}),
    }
    statuses = {what: reply.status_code for what, reply in replies.items()}
    # The jobs service answers inline when the job ends within its wait, else 202:
    # on the session's shared mesh other tests' jobs may be ahead of it (CI saw
    # 202). Both are REST answers of the jobs service: neither may leak the headers.
    inline = statuses.pop("complete, answered inline by the jobs service")
    assert inline in (200, 202), replies["complete, answered inline by the jobs service"].text
    assert statuses == {"complete": 200, "list": 200, "error": 400}, {
        what: reply.text for what, reply in replies.items()
    }
    leaked = {what: _leaked(reply) for what, reply in replies.items() if _leaked(reply)}
    assert not leaked, leaked
    # The headers the answers do carry are still there.
    assert replies["complete"].headers["x-model-version"] == "1"
    assert replies["complete, answered inline by the jobs service"].headers["x-request-id"]


OPENAI_CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "In the beginning"}],
    "max_tokens": 2,
}


def _grpc_named(reply: httpx.Response) -> dict[str, str]:
    """Every header of gRPC's protocol (gRPC reserves the `grpc-` prefix)."""
    return {name: value for name, value in reply.headers.items() if name.startswith("grpc-")}


def _streamed(api: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    with api.stream("POST", path, json=body) as reply:
        reply.read()
    return reply


def test_rest_and_openai_answers_carry_no_grpc_protocol_header(api):
    complete = V2_COMPLETE[0].format(model=MODEL)
    replies = {
        "complete": api.post(complete, json=V2_COMPLETE[1]),
        "v1 complete": api.post(V1_COMPLETE[0].format(model=MODEL), json=V1_COMPLETE[1]),
        "list": api.get("/v2/models"),
        "error": api.post(complete, json={}),
        "generate (SSE)": _streamed(
            api, f"/v2/models/{MODEL}:generate", {"prompt": "In the", "max_output_tokens": 2}
        ),
        "openai chat": api.post("/openai/v1/chat/completions", json=OPENAI_CHAT),
        "openai chat (SSE)": _streamed(
            api, "/openai/v1/chat/completions", {**OPENAI_CHAT, "stream": True}
        ),
        "openai models": api.get("/openai/v1/models"),
    }
    statuses = {what: reply.status_code for what, reply in replies.items()}
    assert statuses == {what: 400 if what == "error" else 200 for what in replies}, statuses
    leaked = {what: _grpc_named(reply) for what, reply in replies.items() if _grpc_named(reply)}
    assert not leaked, leaked
    # Envoy's own timing header is no leak: it is the upstream's time (as OpenAI's
    # openai-processing-ms), and the playground shows it (gateway/playground).
    assert "x-envoy-upstream-service-time" in replies["complete"].headers


def test_a_native_grpc_answer_keeps_its_grpc_headers(mesh, api):
    """Over h2c with curl: gRPC's clients hide grpc-* metadata from their callers."""
    result = subprocess.run(
        [
            "curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"x-api-key: {api.headers['x-api-key']}",
            "--data-binary", "@-",
            f"{mesh.edge_url}/tokenmesh.inference.v2.InferenceService/ListModels",
        ],
        input=b"\0\0\0\0\0",  # one empty message
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    # The headers, then (after a blank line) the trailers.
    lines = result.stdout.decode().replace("\r\n", "\n").split("\n")
    fields = dict(line.lower().split(": ", 1) for line in lines if ": " in line)
    assert lines[0].strip() == "HTTP/2 200", result.stdout
    assert fields["content-type"] == "application/grpc"
    assert fields["grpc-accept-encoding"], fields
    assert fields["grpc-status"] == "0", fields
