"""The edge's own refusals carry the google.rpc details a service's errors carry.

A bad credential (ext_authz's 401), a missing scope (RBAC's 403) and a rate
limit (the rate-limit filter's 429) reached gRPC callers with a code and a
message only, and REST callers with `"details": []`: no ErrorInfo reason (a
client could not tell a missing scope from a bad key), no RetryInfo, and
RBAC's message ("RBAC: access denied") named the filter, not the scope. Each
now carries what the service that would have refused it carries; a gRPC
caller's details agree with its status (grpc's `rpc_status.from_call` checks),
and a REST answer has them in its JSON, never as gRPC's header.
"""

from __future__ import annotations

import base64
import socket
import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.core.contract import QUOTA_SUBJECT_HEADER
from services.launcher.mesh import Mesh
from tests.e2e.conftest import authed_channel
from tests.e2e.test_auth import create_key
from tests.e2e.test_edge_grpc_local_replies import BAD_KEY, guarded  # noqa: F401
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.usage.v1 import usage_service_pb2 as usage_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as usage_rpc

DETAILS_HEADER = "grpc-status-details-bin"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
NEEDS_GENERATE = "this operation needs the 'inference:generate' scope"


def _tenant() -> str:
    return f"details-{uuid.uuid4().hex[:8]}"


def _complete_refused(mesh: Mesh, metadata: list[tuple[str, str]]) -> grpc.RpcError:
    with authed_channel(mesh.edge_address, metadata) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            rpc.InferenceServiceStub(channel).Complete(
                pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1),
                timeout=10,
            )
    return refused.value


def _status(error: grpc.RpcError) -> status_pb2.Status:
    # from_call raises ValueError when the details disagree with the call's status.
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin"
    return status


def _detail(status: status_pb2.Status, kind: type[Any]) -> Any:
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            return detail
    raise AssertionError(f"no {kind.__name__} in {status}")


def _rest_complete(mesh: Mesh, key: str) -> httpx.Response:
    return httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json={"prompt": "a", "max_tokens": 1},
        headers={"x-api-key": key},
        timeout=10,
    )


def _rest_detail(body: dict[str, Any], type_url: str) -> dict[str, Any]:
    return next(d for d in body["details"] if d["@type"] == type_url)


def test_a_bad_credential_names_its_reason_to_grpc_callers(mesh: Mesh) -> None:
    error = _complete_refused(mesh, [("x-api-key", BAD_KEY)])
    status = _status(error)
    assert status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    info = _detail(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_CREDENTIALS", "tokenmesh.dev")


def test_a_bad_credential_names_its_reason_to_rest_callers(mesh: Mesh) -> None:
    reply = _rest_complete(mesh, BAD_KEY)
    assert reply.status_code == 401
    body = reply.json()
    assert body["code"] == 16 and body["message"] == "missing or invalid credentials"
    assert _rest_detail(body, ERROR_INFO) == {
        "@type": ERROR_INFO,
        "reason": "INVALID_CREDENTIALS",
        "domain": "tokenmesh.dev",
    }
    assert DETAILS_HEADER not in reply.headers


def test_a_missing_scope_names_the_scope_to_grpc_callers(mesh: Mesh) -> None:
    key = create_key(mesh, "--tenant", _tenant(), scopes="models:read")["secret"]
    error = _complete_refused(mesh, [("x-api-key", key)])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == NEEDS_GENERATE
    info = _detail(_status(error), error_details_pb2.ErrorInfo)
    assert info.reason == "MISSING_SCOPE"
    assert dict(info.metadata) == {"scope": "inference:generate"}


def test_a_missing_scope_names_the_scope_to_rest_and_openai_callers(mesh: Mesh) -> None:
    key = create_key(mesh, "--tenant", _tenant(), scopes="models:read")["secret"]
    reply = _rest_complete(mesh, key)
    assert reply.status_code == 403
    body = reply.json()
    assert (body["code"], body["message"]) == (7, NEEDS_GENERATE)
    assert _rest_detail(body, ERROR_INFO) == {
        "@type": ERROR_INFO,
        "reason": "MISSING_SCOPE",
        "domain": "tokenmesh.dev",
        "metadata": {"scope": "inference:generate"},
    }
    assert DETAILS_HEADER not in reply.headers
    openai = httpx.post(
        f"{mesh.edge_url}/openai/v1/chat/completions",
        json={"model": "deterministic-test", "messages": [{"role": "user", "content": "a"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert openai.status_code == 403
    assert openai.json()["error"]["message"] == NEEDS_GENERATE
    assert openai.json()["error"]["code"] == "permission_denied"


def test_an_admin_rpc_names_the_admin_scope(mesh: Mesh) -> None:
    key = create_key(mesh, "--tenant", _tenant())["secret"]
    reply = httpx.get(f"{mesh.edge_url}/v1/usage/audit", headers={"x-api-key": key}, timeout=10)
    assert reply.status_code == 403, reply.text
    assert reply.json()["message"] == "this operation needs the 'admin' scope"


def test_the_edge_rate_limit_has_the_workers_details(mesh: Mesh) -> None:
    # The usage service's RPCs are limited at the edge (a worker limits its own,
    # and always sent these details): the rate-limit filter's 429 now has them.
    key = create_key(mesh, "--tenant", _tenant(), "--rpm", "1", scopes="usage:read")["secret"]
    usage = f"{mesh.edge_url}/v1/usage"
    assert httpx.get(usage, headers={"x-api-key": key}, timeout=10).status_code == 200
    with authed_channel(mesh.edge_address, [("x-api-key", key)]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            usage_rpc.UsageServiceStub(channel).GetUsage(usage_pb.GetUsageRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = _status(refused.value)
    assert _detail(status, error_details_pb2.ErrorInfo).reason == "RATE_LIMITED"
    assert 1 <= _detail(status, error_details_pb2.RetryInfo).retry_delay.seconds <= 60
    quota = _detail(status, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject.startswith("key ")
    reply = httpx.get(usage, headers={"x-api-key": key}, timeout=10)
    assert reply.status_code == 429
    body = reply.json()
    assert _rest_detail(body, ERROR_INFO)["reason"] == "RATE_LIMITED"
    assert _rest_detail(body, RETRY_INFO)["retry_delay"] == f"{reply.headers['retry-after']}s"
    assert DETAILS_HEADER not in reply.headers
    # Which quota, as the gRPC caller's details (and a worker's REST 429) say: it was
    # missing from the REST JSON.
    violations = _rest_detail(body, "type.googleapis.com/google.rpc.QuotaFailure")["violations"]
    assert violations == [
        {"subject": quota.violations[0].subject, "description": body["message"]}
    ], body
    assert QUOTA_SUBJECT_HEADER not in reply.headers
    trailers = [entry.key for entry in refused.value.trailing_metadata() or ()]
    assert QUOTA_SUBJECT_HEADER not in trailers


def test_the_auth_limiter_tells_when_to_retry(guarded: Mesh) -> None:  # noqa: F811
    for _ in range(10):
        error = _complete_refused(guarded, [("x-api-key", BAD_KEY)])
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            break
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = _status(error)
    assert _detail(status, error_details_pb2.ErrorInfo).reason == "AUTH_FAILURES_RATE_LIMITED"
    retry = _detail(status, error_details_pb2.RetryInfo).retry_delay
    # The wait its retry-after says (rounded up to whole seconds), not a shorter one.
    trailers = {entry.key: str(entry.value) for entry in error.trailing_metadata() or ()}
    assert (retry.seconds, retry.nanos) == (int(trailers["retry-after"]), 0)
    reply = _rest_complete(guarded, BAD_KEY)
    assert reply.status_code == 429
    body = reply.json()
    assert _rest_detail(body, ERROR_INFO)["reason"] == "AUTH_FAILURES_RATE_LIMITED"
    assert _rest_detail(body, RETRY_INFO)["retry_delay"] == f"{reply.headers['retry-after']}s"


def test_a_grpc_request_envoy_cannot_read_is_invalid_argument(mesh: Mesh) -> None:
    # A fragment in the path: Envoy's codec refuses it (400) before any filter; gRPC's
    # mapping of 400 made it INTERNAL, with no message. (Raw bytes: clients drop a
    # fragment before sending.)
    host, port = mesh.edge_address.rsplit(":", 1)
    request = (
        "GET /tokenmesh.inference.v1.InferenceService/ListModels#frag HTTP/1.1\r\n"
        "Host: edge\r\ncontent-type: application/grpc\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request.encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head = answer.decode().split("\r\n\r\n", 1)[0].split("\r\n")
    fields = (line.split(": ", 1) for line in head[1:])
    headers = {name.lower(): value for name, value in fields}
    assert headers["grpc-status"] == "3"
    assert headers["grpc-message"] == (
        "request: the edge could not read this request's path or headers"
    )
    status = status_pb2.Status.FromString(base64.b64decode(headers[DETAILS_HEADER]))
    assert status.code == 3 and status.message == headers["grpc-message"]
    assert _detail(status, error_details_pb2.ErrorInfo).reason == "MALFORMED_REQUEST"
