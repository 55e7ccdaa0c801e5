"""Envoy's own error replies, as native gRPC callers see them through the real edge.

Envoy answers a gRPC request's local reply trailers-only, its grpc-message the
reply's body and its grpc-status derived from the HTTP status unless one is
set. Two things went wrong: the body was the JSON error shape REST callers
get, so a gRPC caller read `{"code":16,"details":[],...}` as its message; and
ext_authz's failed-authentication limiter (429) reached gRPC callers as
UNAVAILABLE (Envoy's mapping of 429), which clients retry at once, defeating
the limiter. REST callers keep their JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel
from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import wait_until
from tokenmesh.client import Client, TokenmeshRpcError
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MAX_FAILURES = 5
BAD_KEY = "tm_" + "y" * 43
UNAUTHENTICATED = "missing or invalid credentials"


def _refused(mesh: Mesh, metadata: Sequence[tuple[str, str]], model: str) -> grpc.RpcError:
    with authed_channel(mesh.edge_address, metadata) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            rpc.InferenceServiceStub(channel).Complete(
                pb.CompleteRequest(model=model, prompt="a", max_tokens=1), timeout=10
            )
    return refused.value


def _trailers(error: grpc.RpcError) -> dict[str, str]:
    return {entry.key: str(entry.value) for entry in error.trailing_metadata() or ()}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own whose auth limiter throttles a source after 5 failures."""
    env = {
        **TEST_SERVICE_ENV,
        "TOKENMESH_MODELS": "",
        "TOKENMESH_AUTH_MAX_FAILURES_PER_MINUTE": str(MAX_FAILURES),
    }
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("guarded")),
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=env,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.mark.parametrize(
    "metadata",
    [[("x-api-key", BAD_KEY)], [("authorization", "Bearer aaa.bbb.ccc")], []],
    ids=["bad API key", "bad JWT", "no credential"],
)
def test_an_unauthenticated_grpc_caller_reads_a_plain_message(
    mesh: Mesh, metadata: list[tuple[str, str]]
) -> None:
    error = _refused(mesh, metadata, "deterministic-test")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == UNAUTHENTICATED


def test_a_rest_caller_keeps_the_json_error(mesh: Mesh) -> None:
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json={"prompt": "a", "max_tokens": 1},
        headers={"x-api-key": BAD_KEY},
        timeout=10,
    )
    assert reply.status_code == 401
    assert reply.json() == {
        "code": 16,
        "message": UNAUTHENTICATED,
        "http_status": 401,
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "INVALID_CREDENTIALS",
                "domain": "tokenmesh.dev",
            }
        ],
    }


def test_a_grpc_caller_without_the_scope_reads_a_plain_message(guarded: Mesh) -> None:
    key = create_key(guarded, scopes="models:read")
    error = _refused(guarded, [("x-api-key", key["secret"])], "deterministic-test")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "this operation needs the 'inference:generate' scope"


def test_no_healthy_worker_is_unavailable_with_a_plain_message_and_retry_after(
    guarded: Mesh,
) -> None:
    admin = [("x-api-key", guarded.dev_api_key())]
    with authed_channel(guarded.edge_address, admin) as channel:
        router_rpc.RouterServiceStub(channel).RegisterModelVersion(
            router_pb.RegisterModelVersionRequest(model="ghost", version="1"), timeout=10
        )

    def no_worker() -> grpc.RpcError | None:
        # While the new cluster warms, its route may answer the other 503 (UNAVAILABLE,
        # "upstream unavailable; try again"): the steady state is the one asserted.
        error = _refused(guarded, admin, "ghost")
        steady = error.code() == grpc.StatusCode.UNAVAILABLE
        return error if steady and error.details() == "no healthy upstream" else None

    error = wait_until(no_worker, 30, "the edge to route ghost (to no worker)")
    assert error.details() == "no healthy upstream"
    assert _trailers(error)["retry-after"] == "1"
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc details"
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry) and retry.retry_delay.seconds == 1
    # The SDK tells when to try again (from RetryInfo, or the header without one).
    asyncio.run(_sdk_retry_after(guarded, "ghost", expected=1.0))


async def _sdk_retry_after(mesh: Mesh, model: str, expected: float) -> None:
    async with Client(mesh.edge_address, token=mesh.dev_api_key()) as client:
        with pytest.raises(TokenmeshRpcError) as refused:
            await client.complete(model, "hi")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.retry_after_s == expected


def test_the_auth_limiter_answers_grpc_callers_resource_exhausted(guarded: Mesh) -> None:
    codes = []
    for _ in range(MAX_FAILURES + 3):
        error = _refused(guarded, [("x-api-key", BAD_KEY)], "deterministic-test")
        codes.append(error.code())
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            break
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    assert error.details() == "too many failed authentication attempts"
    assert int(_trailers(error)["retry-after"]) >= 1
