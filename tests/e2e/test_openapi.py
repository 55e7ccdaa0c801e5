"""docs/openapi.yaml through the real edge: served without a credential, and every
route answers as it says (schemathesis: generated requests, bounded)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import openapi
from tests.e2e.test_auth import create_key

DOCUMENT: dict[str, Any] = yaml.safe_load(openapi.DOCUMENT_PATH.read_text(encoding="utf-8"))
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
)
# Small and derandomized: the whole module stays well under two minutes on a
# loaded 2-core machine (`make fuzz` is where long random runs belong).
BOUNDED = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
# Admin routes that change shared state (keys, signing keys, the catalogue,
# templates) run only with the client key, which gets 403 for them.
ADMIN_READS = SCHEMA.include(method="GET", operation_id=openapi.admin_operation_ids(DOCUMENT))


@pytest.fixture(scope="module")
def client_key(mesh) -> str:
    """A key with every client scope and no admin: admin routes answer it 403."""
    scopes = "inference:generate,inference:embed,models:read,usage:read"
    return str(create_key(mesh, scopes=scopes)["secret"])


def _call(case, mesh, key: str) -> None:
    response = case.call(base_url=mesh.edge_url, headers={"x-api-key": key}, timeout=20)
    case.validate_response(response, checks=CHECKS)


def test_document_is_served_without_a_credential(mesh):
    reply = httpx.get(f"{mesh.edge_url}{openapi.SERVED_PATH}", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/yaml")
    assert reply.text == openapi.DOCUMENT_PATH.read_text(encoding="utf-8")
    validate(yaml.safe_load(reply.text))


def test_header_names_grpc_cannot_carry_are_dropped(mesh, client_key):
    # Legal HTTP/1.1 names, illegal gRPC keys: the upstream's gRPC core refused
    # the whole call (500 "Illegal header key") before the edge dropped them.
    headers = {"x-api-key": client_key, "a$b": "1", "+h": "2", "c~d": "3", "x.ok-1": "4"}
    reply = httpx.get(f"{mesh.edge_url}/v2/models", headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    token = httpx.post(
        f"{mesh.edge_url}/v1/auth/token",
        json={"api_key": client_key},
        headers={"w|x": "1"},
        timeout=10,
    )
    assert token.status_code == 200, token.text


@SCHEMA.parametrize()
@BOUNDED
def test_every_route_answers_as_documented(case, mesh, client_key):
    _call(case, mesh, client_key)


@ADMIN_READS.parametrize()
@BOUNDED
def test_admin_reads_answer_as_documented(case, mesh, admin_key):
    _call(case, mesh, admin_key)
