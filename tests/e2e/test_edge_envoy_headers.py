"""A client cannot steer the edge's Envoy with x-envoy-* request headers.

Envoy honours x-envoy-upstream-rq-timeout-ms, x-envoy-retry-on and their kin
only from an internal address. The edge sets no `internal_address_config`, so
no address is internal (gateway/envoy_config.py, `http_connection_manager`),
not even 127.0.0.1, where these tests connect from: Envoy removes the headers
before the router reads them. Set with no CIDR ranges, loopback would be
internal again, and a 1 ms upstream timeout would turn this call into a 504.
"""

from __future__ import annotations

import httpx

from tests.e2e.conftest import authed_channel
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

# What a client would send to cut the edge's timeouts short and multiply its
# retries (honoured, the call fails: REST 504, gRPC UNAVAILABLE).
CONTROL_HEADERS = {
    "x-envoy-upstream-rq-timeout-ms": "1",
    "x-envoy-upstream-rq-per-try-timeout-ms": "1",
    "x-envoy-retry-on": "5xx,reset,connect-failure",
    "x-envoy-retry-grpc-on": "cancelled,deadline-exceeded,unavailable",
    "x-envoy-max-retries": "5",
}
COMPLETE = {"prompt": "hello", "max_tokens": 8}


def test_a_rest_client_cannot_set_the_upstream_timeout_or_retries(mesh, admin_key):
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json=COMPLETE,
        headers={"x-api-key": admin_key, **CONTROL_HEADERS},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"]


def test_a_grpc_client_cannot_set_the_upstream_timeout_or_retries(mesh, admin_key):
    metadata = [("x-api-key", admin_key), *CONTROL_HEADERS.items()]
    with authed_channel(mesh.edge_address, metadata) as channel:
        answer = rpc.InferenceServiceStub(channel).Complete(
            pb.CompleteRequest(model="deterministic-test", prompt="hello", max_tokens=8),
            timeout=10,
        )
    assert answer.text
