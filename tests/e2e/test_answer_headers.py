"""A unary answer's headers, lifted out of its trailers by the real edge.

Workers send them in the answer's final batch (services.core.interceptors,
HeadersAtEnd); the edge lifts them (gateway/response_headers.py), so its
clients still get them as response headers: gRPC initial metadata, REST
headers. Each once, and never the name list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.core import contract
from services.inference.validation import MAX_EMBED_INPUTS
from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel, edge_routes
from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import wait_until
from tests.e2e.test_routing import targets_of, version_route
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

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


@pytest.fixture(scope="module")
def api_deprecated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own whose worker deprecates inference v1 (sunset in 2099)."""
    env = {
        **TEST_SERVICE_ENV,
        "TOKENMESH_TEST_MODELS": "deterministic-test:1",
        "TOKENMESH_MODELS": "",
        "TOKENMESH_API_DEPRECATIONS": "v1=2099-12-31",
    }
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("api-deprecated")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        edge_tls_port=None,
        service_env=env,
    )
    with Mesh(config) as mesh:
        yield mesh


def test_a_header_the_edge_sets_is_not_doubled_by_the_lifted_one(api_deprecated):
    # A deprecated model version's route adds Deprecation and Sunset to its answers;
    # lifted from the trailers after the route's were set, the worker's API-version
    # ones were sent too (two Sunsets). One of each now: the earliest (the API's
    # 2099-12-31 before the model version's 2100-01-01).
    mesh = api_deprecated
    admin = [("x-api-key", mesh.dev_api_key())]
    with authed_channel(mesh.edge_address, admin) as channel:
        router_rpc.RouterServiceStub(channel).DeprecateModelVersion(
            router_pb.DeprecateModelVersionRequest(
                model="deterministic-test", version="1", sunset_time={"seconds": 4102444800}
            ),
            timeout=10,
        )
    added = {"key": "sunset", "value": "Fri, 01 Jan 2100 00:00:00 GMT"}

    def applied() -> bool:
        routes = edge_routes(mesh)
        targets = targets_of(version_route(routes, "1", model="deterministic-test"))
        return added in [h["header"] for t in targets for h in t.get("response_headers_to_add", [])]

    wait_until(applied, 10, "the edge to announce version 1's sunset")
    reply = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json={"prompt": "a b", "max_tokens": 2},
        headers=dict(admin),
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers.get_list("sunset") == ["Thu, 31 Dec 2099 00:00:00 GMT"]
    assert len(reply.headers.get_list("deprecation")) == 1
    assert len(reply.headers.get_list("link")) == 1  # the API version's, not the route's


def test_every_answer_is_never_sniffed_nor_cached_and_routes_keep_their_own(mesh):
    # Error bodies quote the caller's path and query; the credential is often
    # x-api-key, which shared caches do not treat as Authorization. Neither header
    # was on any answer but the static files'.
    key = {"x-api-key": create_key(mesh)["secret"]}
    edge = mesh.edge_url
    answers = {
        "REST 200": httpx.get(f"{edge}/v2/models", headers=key, timeout=10),
        "OpenAI 200": httpx.get(
            f"{edge}/openai/v1/models",
            headers={"authorization": f"Bearer {key['x-api-key']}"},
            timeout=10,
        ),
        "401 (ext_authz)": httpx.get(f"{edge}/v2/models", timeout=10),
        "404 quoting the path": httpx.get(f"{edge}/nope/<b>x</b>", headers=key, timeout=10),
        "400 quoting the query": httpx.get(f"{edge}/v2/models?<b>=1", headers=key, timeout=10),
        "healthz": httpx.get(f"{edge}/healthz", timeout=10),
    }
    for name, answer in answers.items():
        assert answer.headers.get("x-content-type-options") == "nosniff", (name, answer.headers)
        assert answer.headers.get_list("cache-control") == ["no-store"], (name, answer.headers)
    # A route's own wins: the static files revalidate, an event stream is never kept.
    page = httpx.get(f"{edge}/playground", timeout=10)
    assert page.headers.get_list("cache-control") == ["no-cache"]
    body = {"prompt": "a b", "max_tokens": 2}
    with httpx.stream(
        "POST", f"{edge}/v1/models/deterministic-test:generate", json=body, headers=key, timeout=10
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers.get_list("cache-control") == ["no-cache"]
        assert stream.headers.get("x-content-type-options") == "nosniff"
