"""gRPC protocol headers a client sends do not reach the services as it sent them.

A REST client's `grpc-timeout: garbage` was forwarded by the transcoder: the worker
answered `500 Error parsing 'grpc-timeout' metadata` (internal text), and the edge's
connection to that worker then failed every later call with a deadline (REST's and
native gRPC's alike), for every tenant. The edge drops a REST request's `grpc-*`
headers, and a native call's `grpc-timeout`/`grpc-encoding` that the gRPC spec does
not allow (the review's repro: /work/briefs/s29/review_rest_findings.md).
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import authed_channel
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"


@pytest.mark.parametrize(
    "header", [("grpc-timeout", "garbage"), ("grpc-encoding", "bogus"), ("grpc-timeout", "5S")]
)
def test_a_rest_clients_grpc_headers_are_dropped_and_deadlines_keep_working(mesh, header):
    key = mesh.dev_api_key()
    body = {"prompt": "x", "max_output_tokens": 1}
    reply = httpx.post(
        f"{mesh.edge_url}/v2/models/{MODEL}:complete",
        json=body,
        headers={"x-api-key": key, header[0]: header[1]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    with authed_channel(mesh.edge_address, [("x-api-key", key)]) as channel:
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model=MODEL, prompt="after", max_output_tokens=1)
        for _ in range(3):  # every one has a deadline
            assert stub.Complete(request, timeout=10).usage.completion_tokens == 1


def test_a_native_calls_malformed_grpc_timeout_is_dropped(mesh):
    key = mesh.dev_api_key()
    with authed_channel(mesh.edge_address, [("x-api-key", key)]) as channel:
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model=MODEL, prompt="native", max_output_tokens=1)
        # grpcio sends this metadata as it is (its own grpc-timeout comes from `timeout`).
        metadata = (("grpc-timeout", "forever"),)
        assert stub.Complete(request, metadata=metadata).usage.completion_tokens == 1
        for _ in range(3):  # and the connection's deadlines keep working
            assert stub.Complete(request, timeout=10).usage.completion_tokens == 1
