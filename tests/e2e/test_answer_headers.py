"""A unary answer's headers, lifted out of its trailers by the real edge.

Workers send them in the answer's final batch (services.core.interceptors,
HeadersAtEnd); the edge lifts them (gateway/response_headers.py), so its
clients still get them as response headers: gRPC initial metadata, REST
headers. Each once, and never the name list.
"""

from __future__ import annotations

import httpx

from services.core import contract
from services.inference.validation import MAX_EMBED_INPUTS
from tests.e2e.conftest import authed_channel
from tests.e2e.test_auth import create_key
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

LIFTED = {"x-request-id", "x-model-version", "x-ratelimit-limit", "x-ratelimit-remaining"}


def _names(metadata: object) -> set[str]:
    return {key for key, _ in metadata or ()}  # type: ignore[attr-defined]


def test_a_grpc_clients_unary_answer_has_its_headers_first_and_once(mesh):
    key = create_key(mesh, "--rpm", "100")
    with authed_channel(mesh.edge_address, [("x-api-key", key["secret"])]) as channel:
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model="deterministic-test", prompt="a b", max_tokens=2)
        response, call = stub.Complete.with_call(request, timeout=10)
    assert response.usage.completion_tokens == 2
    initial = dict(call.initial_metadata())
    assert LIFTED <= initial.keys()
    assert initial["x-ratelimit-remaining"] == "99"
    trailing = _names(call.trailing_metadata())
    assert not trailing & LIFTED  # moved, not copied
    assert contract.RESPONSE_HEADERS_TRAILER not in trailing | initial.keys()


def test_a_large_answer_sends_its_headers_first_and_the_edge_drops_the_mark(channel):
    # Over contract.HEADERS_AT_END_MAX_BYTES the worker sends them first (the edge
    # would have to buffer the answer to lift them).
    stub = rpc.InferenceServiceStub(channel)
    request = pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["kitten"] * MAX_EMBED_INPUTS)
    response, call = stub.Embed.with_call(request, timeout=30)
    assert response.ByteSize() > contract.HEADERS_AT_END_MAX_BYTES
    initial = _names(call.initial_metadata())
    assert {"x-request-id", "x-model-version"} <= initial
    assert contract.RESPONSE_HEADERS_TRAILER not in initial | _names(call.trailing_metadata())


def test_a_rest_clients_unary_answer_has_its_headers(mesh):
    key = create_key(mesh, "--rpm", "100")
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json={"prompt": "a b", "max_tokens": 2, "request_id": "answer-1"},
        headers={"x-api-key": key["secret"]},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert LIFTED <= reply.headers.keys()
    assert reply.headers["x-request-id"] == "answer-1"
    assert reply.headers["x-ratelimit-remaining"] == "99"
    assert contract.RESPONSE_HEADERS_TRAILER not in reply.headers
    assert int(reply.headers["content-length"]) == len(reply.content)
