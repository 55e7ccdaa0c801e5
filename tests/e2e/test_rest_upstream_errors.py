"""The edge's own 503 when a worker is gone but still in rotation, as REST and gRPC see it.

Between a worker's crash and the moment the edge stops sending it requests
(its health check, the router's lease), each call meets a refused connection;
Envoy retries, then answers 503 itself. Only "no healthy upstream" had a
mapper of its own: this 503 carried Envoy's text ("upstream connect error or
disconnect/reset before headers. retried and the latest reset reason: remote
connection failure") as the REST message and the gRPC caller's grpc-message,
and no retry-after. Both now read a fixed message and when to try again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest
from grpc_status import rpc_status

from gateway.envoy_config import UNAVAILABLE_MESSAGE
from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel, wait_for_healthy_hosts
from tests.e2e.test_jobs import wait_until
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
CLUSTER = f"model:{MODEL}:1"
ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_TEST_MODELS": f"{MODEL}:1",
    "TOKENMESH_MODELS": "",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "1",
}
V2_COMPLETE = f"/v2/models/{MODEL}:complete"
BODY = {"prompt": "a b", "max_output_tokens": 2}
# The edge's health check must not notice the dead worker before the requests do
# (a failed check turns the answer into "no healthy upstream", mapped already).
HEALTH_CHECK_INTERVAL_S = 30.0
T = TypeVar("T")


@pytest.fixture
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A one-worker mesh whose worker just crashed (SIGKILL), still in the edge's rotation."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("upstream-errors")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=HEALTH_CHECK_INTERVAL_S,
        edge_tls_port=None,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        wait_for_healthy_hosts(mesh, [CLUSTER], 1)
        with httpx.Client(base_url=mesh.edge_url, timeout=30) as http:
            headers = {"x-api-key": mesh.dev_api_key()}
            served = wait_until(
                lambda: http.post(V2_COMPLETE, json=BODY, headers=headers).status_code == 200,
                30,
                "the worker to answer through the edge",
            )
            assert served
        mesh.kill("inference-0")
        yield mesh


def _first_refusal(send: Callable[[], T | None]) -> T:
    refusal: T = wait_until(send, 30, "the edge to refuse a call to the dead worker")
    return refusal


def test_rest_reads_a_fixed_message_and_retry_after(crashed: Mesh) -> None:
    headers = {"x-api-key": crashed.dev_api_key()}
    with httpx.Client(base_url=crashed.edge_url, headers=headers, timeout=30) as http:

        def refused() -> httpx.Response | None:
            reply = http.post(V2_COMPLETE, json=BODY)
            return reply if reply.status_code != 200 else None

        reply = _first_refusal(refused)
    assert reply.status_code == 503, reply.text
    assert reply.json() == {
        "code": 14,
        "message": UNAVAILABLE_MESSAGE,
        "http_status": 503,
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "UPSTREAM_UNAVAILABLE",
                "domain": "tokenmesh.dev",
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "1s"},
        ],
    }
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["content-type"] == "application/json"


def test_grpc_reads_a_fixed_message_and_retry_after(crashed: Mesh) -> None:
    admin = [("x-api-key", crashed.dev_api_key())]
    with authed_channel(crashed.edge_address, admin) as channel:
        stub = rpc.InferenceServiceStub(channel)

        def refused() -> grpc.RpcError | None:
            try:
                stub.Complete(pb.CompleteRequest(model=MODEL, prompt="a", max_tokens=1), timeout=10)
            except grpc.RpcError as error:
                return error
            return None

        error = _first_refusal(refused)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == UNAVAILABLE_MESSAGE
    trailers = {entry.key: str(entry.value) for entry in error.trailing_metadata() or ()}
    assert trailers["retry-after"] == "1"
    # The details agree with the status (from_call checks) and tell when to retry.
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    assert [detail.type_url.rsplit(".", 1)[-1] for detail in status.details] == [
        "ErrorInfo",
        "RetryInfo",
    ]


def test_healthz_keeps_its_answer(crashed: Mesh) -> None:
    """The health-check filter's 503 (a load balancer's probe) is not the upstream's."""
    with httpx.Client(base_url=crashed.edge_url, timeout=30) as http:

        def unhealthy() -> httpx.Response | None:
            reply = http.get("/healthz")
            return reply if reply.status_code == 503 else None

        reply = wait_until(unhealthy, 90, "/healthz to notice the dead worker")
    assert "retry-after" not in reply.headers
    assert reply.json()["message"] == ""


def test_openai_routes_read_the_fixed_message_too(crashed: Mesh) -> None:
    """The /openai/ 503 had OpenAI's shape and retry-after, but Envoy's reset text as
    its `error.message`."""
    headers = {"authorization": f"Bearer {crashed.dev_api_key()}"}
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 2}
    with httpx.Client(base_url=crashed.edge_url, headers=headers, timeout=30) as http:

        def refused() -> httpx.Response | None:
            reply = http.post("/openai/v1/completions", json=body)
            return reply if reply.status_code != 200 else None

        reply = _first_refusal(refused)
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["message"] == UNAVAILABLE_MESSAGE
    assert reply.headers["retry-after"] == "1"
