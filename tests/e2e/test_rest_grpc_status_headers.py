"""REST answers through the real edge carry no gRPC status headers, and the REST
Complete's `Prefer: respond-async` answer is the one docs/openapi.yaml describes.

The transcoder merges a unary answer's trailers into its headers: every REST 200,
and the jobs service's 202 to `Prefer: respond-async`, showed `grpc-status: 0`
and an empty `grpc-message` to REST clients. A REST error never had them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from gateway import openapi
from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import JOB_SCOPES

MODEL = "deterministic-test"
GRPC_STATUS_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")
V2_COMPLETE = (
    "/v2/models/{model}:complete",
    {"prompt": "In the beginning", "max_output_tokens": 2},
)
V1_COMPLETE = ("/v1/models/{model}:complete", {"prompt": "In the beginning", "max_tokens": 2})


@pytest.fixture(scope="module")
def api(mesh) -> Iterator[httpx.Client]:
    key = create_key(mesh, scopes=JOB_SCOPES)
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": key["secret"]}
    ) as client:
        yield client


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
