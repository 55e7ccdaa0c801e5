"""The life cycle of an API version through the real edge: deprecated, then retired.

This module runs its own small mesh (one worker serving deterministic-test 1 and 2)
because it sets TOKENMESH_API_DEPRECATIONS on the worker and the jobs service
(which answers a Complete sent with `Prefer: respond-async`): first with a
sunset in the future (v1 answers carry Deprecation, Sunset and Link; v2's do
not), then, after restarting both with a sunset in the past, v1 answers 410
(REST) / UNIMPLEMENTED (gRPC) naming v2 while v2 keeps working. Tests run in
file order: the retired ones come last.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core import contract
from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel, edge_routes
from tests.e2e.test_jobs import wait_until
from tests.e2e.test_routing import targets_of, version_route
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MODEL = "deterministic-test"
WORKER = "inference-0"
JOBS = "jobs"
DOCS = "https://docs.example.com/tokenmesh/docs"
FUTURE = "v1=2099-12-31"
PAST = "v1=2020-01-01"
ENV = {
    **TEST_SERVICE_ENV,
    # Version 2 (at weight 0: only calls naming it reach it) is the one a test deprecates.
    "TOKENMESH_TEST_MODELS": f"{MODEL}:1,{MODEL}:2",
    "TOKENMESH_MODELS": "",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "1",
    "TOKENMESH_API_DOCS_URL": DOCS,
    "TOKENMESH_API_DEPRECATIONS": FUTURE,
}
ANNOUNCED = ("deprecation", "sunset", "link")
V1_COMPLETE = f"/v1/models/{MODEL}:complete"
V1_GENERATE = f"/v1/models/{MODEL}:generate"
V2_COMPLETE = f"/v2/models/{MODEL}:complete"
V2_GENERATE = f"/v2/models/{MODEL}:generate"
V1_BODY = {"prompt": "a b", "max_tokens": 2}
V2_BODY = {"prompt": "a b", "max_output_tokens": 2}
# RFC 7240: a Complete the jobs service answers (services/jobs/handover.py).
RESPOND_ASYNC = {"Prefer": "respond-async"}
WAIT_OR_ASYNC = {"Prefer": "wait=10; respond-async"}


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own whose worker deprecates inference v1 (sunset in 2099)."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("versioned")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        edge_tls_port=None,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(request.getfixturevalue("versioned").log_tails(40))


@pytest.fixture(scope="module")
def http(versioned: Mesh) -> Iterator[httpx.Client]:
    headers = {"x-api-key": versioned.dev_api_key()}
    with httpx.Client(base_url=versioned.edge_url, timeout=30, headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def edge(versioned: Mesh) -> Iterator[grpc.Channel]:
    with authed_channel(versioned.edge_address, [("x-api-key", versioned.dev_api_key())]) as ch:
        yield ch


def _assert_announced(headers: Any) -> None:
    assert headers["sunset"] == "Thu, 31 Dec 2099 00:00:00 GMT"
    assert parsedate_to_datetime(headers["sunset"]).year == 2099
    assert headers["deprecation"].startswith("@") and headers["deprecation"][1:].isdigit()
    assert headers["link"] == f'<{DOCS}/migration/v1-to-v2.md>; rel="deprecation"'


def _assert_not_announced(headers: Any) -> None:
    assert not [name for name in ANNOUNCED if name in headers], dict(headers)


def _sse(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[Any]]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data:")
        ]
        return response.headers, events


def test_deprecated_v1_rest_answers_carry_deprecation_sunset_and_link(http):
    reply = http.post(V1_COMPLETE, json=V1_BODY)
    assert reply.status_code == 200, reply.text
    _assert_announced(reply.headers)
    assert reply.json()["usage"]["completion_tokens"] == 2  # the answer itself is unchanged
    _assert_announced(http.get("/v1/models").headers)
    headers, events = _sse(http, V1_GENERATE, V1_BODY)
    _assert_announced(headers)
    assert events[-1]["finish_reason"] == "length"


def test_a_deprecated_v1_error_carries_them_too(http):
    reply = http.post(V1_COMPLETE, json={"prompt": "a", "max_tokens": -1})
    assert reply.status_code == 400, reply.text
    _assert_announced(reply.headers)


def test_a_deprecated_v1_complete_handed_over_carries_them_on_the_202_and_the_200(http):
    accepted = http.post(V1_COMPLETE, json=V1_BODY, headers=RESPOND_ASYNC)
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"].startswith("/v1/jobs/job-")
    _assert_announced(accepted.headers)
    waited = http.post(V1_COMPLETE, json=V1_BODY, headers=WAIT_OR_ASYNC)
    assert waited.status_code == 200, waited.text
    assert waited.json()["usage"]["completion_tokens"] == 2  # v1's shape, unchanged
    _assert_announced(waited.headers)
    refused = http.post(V1_COMPLETE, json={"prompt": "a", "max_tokens": -1}, headers=WAIT_OR_ASYNC)
    assert refused.status_code == 400, refused.text
    _assert_announced(refused.headers)


def test_a_v2_complete_handed_over_carries_none(http):
    accepted = http.post(V2_COMPLETE, json=V2_BODY, headers=RESPOND_ASYNC)
    assert accepted.status_code == 202, accepted.text
    _assert_not_announced(accepted.headers)
    waited = http.post(V2_COMPLETE, json=V2_BODY, headers=WAIT_OR_ASYNC)
    assert waited.status_code == 200, waited.text
    _assert_not_announced(waited.headers)


def test_v2_rest_answers_carry_none(http):
    reply = http.post(V2_COMPLETE, json=V2_BODY)
    assert reply.status_code == 200, reply.text
    _assert_not_announced(reply.headers)
    headers, _events = _sse(http, V2_GENERATE, V2_BODY)
    _assert_not_announced(headers)


def test_deprecated_v1_grpc_answers_carry_them_as_initial_metadata(edge):
    stream = v1_rpc.InferenceServiceStub(edge).Generate(
        v1.GenerateRequest(model=MODEL, prompt="a b", max_tokens=2), timeout=10
    )
    assert list(stream)[-1].finish_reason == "length"
    _assert_announced(dict(stream.initial_metadata()))
    _reply, call = v2_rpc.InferenceServiceStub(edge).Complete.with_call(
        v2.CompleteRequest(model=MODEL, prompt="a b", max_output_tokens=2), timeout=10
    )
    _assert_not_announced(dict(call.initial_metadata()))


def _deprecate_model_version(mesh: Mesh, edge: grpc.Channel, sunset: int) -> None:
    """Deprecates MODEL's version 2 (sunset at Unix time `sunset`); waits until the edge
    adds its headers."""
    router_rpc.RouterServiceStub(edge).DeprecateModelVersion(
        router_pb.DeprecateModelVersionRequest(
            model=MODEL, version="2", sunset_time=Timestamp(seconds=sunset)
        ),
        timeout=10,
    )
    added = {"key": "sunset", "value": formatdate(sunset, usegmt=True)}

    def applied() -> bool:
        targets = targets_of(version_route(edge_routes(mesh), "2"))
        headers = [h["header"] for t in targets for h in t.get("response_headers_to_add", [])]
        return added in headers

    wait_until(applied, 10, f"the edge to announce version 2's sunset {added['value']}")


def _values(pairs: Any, name: str) -> list[str]:
    """Every value of `name` in HTTP headers or gRPC metadata."""
    if isinstance(pairs, httpx.Headers):
        return pairs.get_list(name)
    return [str(value) for key, value in pairs if key == name]


def test_a_deprecated_model_version_and_v1_announce_the_earliest_sunset(versioned, http, edge):
    # The route of a deprecated model version replaced v1's Deprecation and Sunset with
    # its own: a v1 client was told the model version's date when v1's came first.
    api = http.post(V1_COMPLETE, json=V1_BODY).headers  # version 1: v1's alone
    api_sunset = "Thu, 31 Dec 2099 00:00:00 GMT"
    assert api["sunset"] == api_sunset
    v1_stub, v2_stub = v1_rpc.InferenceServiceStub(edge), v2_rpc.InferenceServiceStub(edge)
    for sunset in (4102444800, 4086460800):  # 2100-01-01 (after v1's), 2099-06-30 (before)
        _deprecate_model_version(versioned, edge, sunset)
        version_sunset = formatdate(sunset, usegmt=True)
        alone = http.post(V2_COMPLETE, json={**V2_BODY, "version": "2"}).headers
        assert _values(alone, "sunset") == [version_sunset]  # v2: the model version's alone
        assert "link" not in alone
        earliest = min(api_sunset, version_sunset, key=parsedate_to_datetime)
        since = f"@{min(int(api['deprecation'][1:]), int(alone['deprecation'][1:]))}"
        body = {**V1_BODY, "version": "2"}
        streamed, _events = _sse(http, V1_GENERATE, body)
        _reply, unary = v1_stub.Complete.with_call(
            v1.CompleteRequest(model=MODEL, version="2", prompt="a b", max_tokens=2), timeout=10
        )
        stream = v1_stub.Generate(
            v1.GenerateRequest(model=MODEL, version="2", prompt="a b", max_tokens=2), timeout=10
        )
        assert list(stream)[-1].finish_reason == "length"
        for answer, headers in (
            ("REST unary (lifted from its trailers)", http.post(V1_COMPLETE, json=body).headers),
            ("REST stream", streamed),
            ("gRPC unary", unary.initial_metadata()),
            ("gRPC stream", stream.initial_metadata()),
        ):
            assert _values(headers, "sunset") == [earliest], answer
            assert _values(headers, "deprecation") == [since], answer
            assert _values(headers, "link") == [api["link"]], answer
    assert (
        v2_stub.Complete(
            v2.CompleteRequest(model=MODEL, version="2", prompt="a b", max_output_tokens=2),
            timeout=10,
        ).model.version
        == "2"
    )


def test_a_complete_handed_over_and_answered_in_time_carries_the_direct_answer_s_headers(
    versioned, http, edge
):
    # The 200 of `Prefer: respond-async, wait=N` had none of them: a client that
    # switched to it lost the version that served it and its deprecation.
    _deprecate_model_version(versioned, edge, 4086460800)  # 2099-06-30, as the test above
    for path, body in ((V2_COMPLETE, V2_BODY), (V1_COMPLETE, V1_BODY)):
        pinned = {**body, "version": "2"}
        direct = http.post(path, json=pinned)
        waited = http.post(path, json=pinned, headers=WAIT_OR_ASYNC)
        assert direct.status_code == waited.status_code == 200, (direct.text, waited.text)
        for name in ("x-model-version", "deprecation", "sunset", "link"):
            assert _values(waited.headers, name) == _values(direct.headers, name), (path, name)
        assert waited.headers["x-model-version"] == "2"
        assert waited.headers["sunset"] == formatdate(4086460800, usegmt=True)
        assert waited.headers["x-request-id"].startswith("job-"), dict(waited.headers)
        assert "x-request-id" in direct.headers


@pytest.fixture(scope="module")
def retired(versioned: Mesh, http: httpx.Client) -> Mesh:
    """The same mesh after the operator moved v1's sunset into the past (worker and jobs
    service restarted)."""
    env = {**versioned.config.service_env, "TOKENMESH_API_DEPRECATIONS": PAST}
    versioned.config = dataclasses.replace(versioned.config, service_env=env)
    for name, module in ((WORKER, "inference"), (JOBS, "jobs")):
        versioned.kill(name)
        versioned.restart_service(name, module)
    # Each path's cluster health-checks the worker on its own (`/v1/models` goes
    # to the cluster of every worker, the model's RPCs to the model's cluster):
    # wait until every one of them sees the restarted worker, and the jobs
    # cluster the restarted jobs service (only it answers a v2 hand-over 202).
    deadline = time.monotonic() + 60
    while not all(status == 410 for status in _v1_statuses(http)):
        assert time.monotonic() < deadline, "the restarted worker never answered v1 with 410"
        time.sleep(0.2)
    while http.post(V2_COMPLETE, json=V2_BODY, headers=RESPOND_ASYNC).status_code != 202:
        assert time.monotonic() < deadline, "the restarted jobs service never answered"
        time.sleep(0.2)
    return versioned


def _v1_statuses(http: httpx.Client) -> list[int]:
    return [
        http.post(V1_COMPLETE, json=V1_BODY).status_code,
        http.post(V1_GENERATE, json=V1_BODY).status_code,
        http.get("/v1/models").status_code,
    ]


def _error_info(details: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in details if d["@type"].endswith("google.rpc.ErrorInfo"))


def test_after_the_sunset_v1_rest_is_410_naming_v2(retired, http):
    for reply in (
        http.post(V1_COMPLETE, json=V1_BODY),
        http.post(V1_GENERATE, json=V1_BODY),
        http.get("/v1/models"),
    ):
        assert reply.status_code == 410, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        body = reply.json()
        assert body["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert "tokenmesh.inference.v2" in body["message"] and "/v2/models" in body["message"]
        info = _error_info(body["details"])
        assert info["reason"] == "API_VERSION_SUNSET" and info["domain"] == "tokenmesh.dev"
        assert info["metadata"]["successor"] == "tokenmesh.inference.v2"
        assert info["metadata"]["migration_guide"] == f"{DOCS}/migration/v1-to-v2.md"
        assert reply.headers["sunset"] == "Wed, 01 Jan 2020 00:00:00 GMT"
        assert contract.HTTP_STATUS_HEADER not in reply.headers  # the edge's to apply


def test_after_the_sunset_a_v1_complete_handed_over_is_410_as_the_complete_itself(retired, http):
    direct = http.post(V1_COMPLETE, json=V1_BODY)
    assert direct.status_code == 410, direct.text
    for prefer in (RESPOND_ASYNC, WAIT_OR_ASYNC):
        reply = http.post(V1_COMPLETE, json=V1_BODY, headers=prefer)
        assert reply.status_code == 410, (prefer, reply.text)
        assert reply.json() == direct.json()  # reason API_VERSION_SUNSET, naming v2
        assert "location" not in reply.headers and "preference-applied" not in reply.headers
        assert [reply.headers.get(name) for name in ANNOUNCED] == [
            direct.headers.get(name) for name in ANNOUNCED
        ]
        assert contract.HTTP_STATUS_HEADER not in reply.headers


def test_after_the_sunset_a_deprecated_model_version_announces_v1s_sunset(retired, http, edge):
    # Version 2 deprecated (sunset 2099-06-30, as above): its route's Sunset replaced
    # the retired v1's, and the 410 saying "retired on 2020-01-01" announced 2099.
    _deprecate_model_version(retired, edge, 4086460800)  # as above: no change
    reply = http.post(V1_COMPLETE, json={**V1_BODY, "version": "2"})
    assert reply.status_code == 410, reply.text
    assert reply.headers.get_list("sunset") == ["Wed, 01 Jan 2020 00:00:00 GMT"]
    assert len(reply.headers.get_list("deprecation")) == 1
    with pytest.raises(grpc.RpcError) as failed:
        v1_rpc.InferenceServiceStub(edge).Complete(
            v1.CompleteRequest(model=MODEL, version="2", prompt="a", max_tokens=2), timeout=10
        )
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    metadata = (*failed.value.initial_metadata(), *failed.value.trailing_metadata())
    assert _values(metadata, "sunset") == ["Wed, 01 Jan 2020 00:00:00 GMT"]


def test_after_the_sunset_v1_grpc_is_unimplemented_with_error_info(retired, edge):
    stub = v1_rpc.InferenceServiceStub(edge)
    with pytest.raises(grpc.RpcError) as failed:
        list(stub.Generate(v1.GenerateRequest(model=MODEL, prompt="a", max_tokens=2), timeout=10))
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status = rpc_status.from_call(failed.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "API_VERSION_SUNSET"
    assert info.metadata["successor"] == "tokenmesh.inference.v2"
    trailers = dict(failed.value.trailing_metadata())
    assert contract.HTTP_STATUS_HEADER not in trailers and "sunset" in trailers


def test_after_the_sunset_v2_is_unaffected(retired, http, edge):
    reply = http.post(V2_COMPLETE, json=V2_BODY)
    assert reply.status_code == 200, reply.text
    _assert_not_announced(reply.headers)
    _headers, events = _sse(http, V2_GENERATE, V2_BODY)
    assert events[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    completed = v2_rpc.InferenceServiceStub(edge).Complete(
        v2.CompleteRequest(model=MODEL, prompt="a b", max_output_tokens=2), timeout=10
    )
    assert len(completed.choices) == 1 and completed.usage.completion_tokens == 2
    accepted = http.post(V2_COMPLETE, json=V2_BODY, headers=RESPOND_ASYNC)
    assert accepted.status_code == 202, accepted.text
    waited = http.post(V2_COMPLETE, json=V2_BODY, headers=WAIT_OR_ASYNC)
    assert waited.status_code == 200 and waited.json()["usage"]["completion_tokens"] == 2
    _assert_not_announced(waited.headers)


def test_the_worker_counts_requests_by_api_version_and_rpc(retired, http):
    http.post(V1_COMPLETE, json=V1_BODY)  # refused, but counted: who still calls v1
    http.post(V2_COMPLETE, json=V2_BODY)
    port = retired.ports[f"{WORKER}-metrics"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tokenmesh_api_requests_total{")
    }
    assert counts['api="inference",api_version="v1",rpc="Complete"'] >= 1
    assert counts['api="inference",api_version="v2",rpc="Complete"'] >= 1
