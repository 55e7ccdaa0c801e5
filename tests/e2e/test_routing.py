"""Model routing through the real edge: canary splits, pins, versions, deprecation,
fallbacks, worker crashes, drains and control-plane restarts.

This module runs its own mesh (own Redis, router, two workers serving
deterministic-test versions 1 and 2) because it changes the catalogue and
kills processes.
"""

from __future__ import annotations

import collections
import email.utils
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway.model_routing import LUA_FILTER_NAME, MODEL_HEADER, SPREAD_KEY, VERSION_HEADER
from services.core import contract
from services.launcher.mesh import Mesh, MeshConfig
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import (
    authed_channel,
    edge_hosts,
    edge_routes,
    seen_by_the_edge,
    spread_of,
    stable_round,
    wait_for_healthy_hosts,
)
from tests.e2e.test_jobs import wait_until
from tokenmesh.auth.v1 import auth_service_pb2 as auth_pb
from tokenmesh.auth.v1 import auth_service_pb2_grpc as auth_rpc
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MODEL = "deterministic-test"
CLUSTERS = (f"model:{MODEL}:1", f"model:{MODEL}:2")  # the edge's clusters of its versions
RETIRING = "retiring-test"  # a model one test retires (every version sunset)
ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_TEST_MODELS": f"{MODEL}:1,{MODEL}:2,{RETIRING}:1",
    "TOKENMESH_MODELS": "",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "5",
    "TOKENMESH_ROUTER_LEASE_SECONDS": "2",
    "TOKENMESH_ROUTER_HEALTH_CHECK_SECONDS": "0.5",
    "TOKENMESH_DRAIN_DELAY_SECONDS": "0.5",
    # Two failed checks at the mesh's 0.5 s interval, and a margin.
    "TOKENMESH_DRAIN_HEALTH_WAIT_SECONDS": "1.5",
    "TOKENMESH_RATELIMIT_MODEL_RPM": "throttled=2",
}


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own: Redis, services, two workers with versions 1 and 2, Envoy."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("routed")),
        redis_url=None,
        workers=2,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _dump_routed_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(request.getfixturevalue("routed").log_tails(40))


@pytest.fixture(scope="module")
def edge(routed: Mesh) -> Iterator[grpc.Channel]:
    with authed_channel(routed.edge_address, [("x-api-key", routed.dev_api_key())]) as channel:
        yield channel


@pytest.fixture(scope="module")
def catalogue(edge: grpc.Channel) -> router_rpc.RouterServiceStub:
    return router_rpc.RouterServiceStub(edge)


@pytest.fixture(autouse=True)
def _reset_catalogue(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts from version 1 taking 100%, nothing pinned."""
    if "catalogue" in request.fixturenames:
        stub = request.getfixturevalue("catalogue")
        stub.PinModelVersion(router_pb.PinModelVersionRequest(model=MODEL, version=""))
        split(request.getfixturevalue("routed"), stub, {"1": 100})
    yield


def split(mesh: Mesh, stub: router_rpc.RouterServiceStub, weights: dict[str, int]) -> None:
    """Sets MODEL's traffic split and waits until the edge routes by it."""
    stub.SetTrafficSplit(
        router_pb.SetTrafficSplitRequest(
            model=MODEL,
            weights=[router_pb2.TrafficWeight(version=v, weight=w) for v, w in weights.items()],
        ),
        timeout=10,
    )
    expected = {version: weight for version, weight in weights.items() if weight}
    wait_for_routes(mesh, lambda routes: split_of(routes) == expected, f"the split {expected}")


def wait_for_routes(
    mesh: Mesh, applied: Callable[[list[dict[str, Any]]], bool], what: str, edge: str = "envoy"
) -> None:
    """Waits until an edge's routes show a catalogue change (the router pushes at once;
    Envoy applies it a few ms later)."""
    wait_until(lambda: applied(edge_routes(mesh, edge)), 10, f"{edge} to route {what}")


def _matched(route: dict[str, Any]) -> dict[str, str | None]:
    """The request headers a route matches: name -> exact value (None: presence only)."""
    headers = route.get("match", {}).get("headers", [])
    return {h["name"]: h.get("string_match", {}).get("exact") for h in headers}


def split_of(routes: list[dict[str, Any]], model: str = MODEL) -> dict[str, int]:
    """How routes split `model`'s calls that name no version: version -> weight."""
    for route in routes:
        matched = _matched(route)
        if matched.get(MODEL_HEADER) == model and VERSION_HEADER not in matched:
            clusters = route["route"]["weighted_clusters"]["clusters"]
            # Cluster names end with the version: model:NAME:V or fallback:NAME:V.
            return {c["name"].rsplit(":", 1)[1]: c["weight"] for c in clusters}
    return {}


def version_route(routes: list[dict[str, Any]], label: str, model: str = MODEL) -> dict[str, Any]:
    """The route of calls naming `label` (a version or an alias) of `model`; {} if none."""
    for route in routes:
        matched = _matched(route)
        if matched.get(MODEL_HEADER) == model and matched.get(VERSION_HEADER) == label:
            return route
    return {}


def targets_of(route: dict[str, Any]) -> list[dict[str, Any]]:
    """The weighted clusters a route sends to (cluster name, headers it adds)."""
    return list(route.get("route", {}).get("weighted_clusters", {}).get("clusters", []))


def falls_back(routes: list[dict[str, Any]], model: str) -> bool:
    """Whether `model`'s version-1 route goes through a fallback (aggregate) cluster."""
    return any(
        t["name"].startswith("fallback:") for t in targets_of(version_route(routes, "1", model))
    )


@dataclass
class Served:
    version: str
    worker: str
    headers: dict[str, str]
    finish_reason: str


def complete(
    channel: grpc.Channel,
    model: str = MODEL,
    version: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
    max_tokens: int = 1,
    prompt: str = "a b",
) -> Served:
    stub = rpc.InferenceServiceStub(channel)
    reply, call = stub.Complete.with_call(
        pb.CompleteRequest(model=model, version=version, prompt=prompt, max_tokens=max_tokens),
        metadata=metadata,
        timeout=10,
    )
    headers = {k: str(v) for k, v in call.initial_metadata()}
    assert headers["x-model-version"] == reply.model.version
    return Served(reply.model.version, headers["x-tokenmesh-worker"], headers, reply.finish_reason)


def rest_complete(routed: Mesh, model: str = MODEL, **body: object) -> httpx.Response:
    """POST /v1/models/{model}:complete through the edge with the admin key."""
    return httpx.post(
        f"{routed.edge_url}/v1/models/{model}:complete",
        json={"prompt": "a", "max_tokens": 1, **body},
        headers={"x-api-key": routed.dev_api_key()},
        timeout=10,
    )


def edge_stats(routed: Mesh, prefix: str = "cluster.usage.ratelimit") -> dict[str, str]:
    """Returns the edge's Envoy counters under `prefix` (for failure messages)."""
    text = routed.admin("/stats")
    pairs = (line.split(": ", 1) for line in text.splitlines() if line.startswith(prefix))
    return dict(pair for pair in pairs if len(pair) == 2)


def workers_of(channel: grpc.Channel, prompts: Iterable[str]) -> set[str]:
    """Returns the workers that served one Complete of each prompt."""
    return {complete(channel, prompt=prompt).worker for prompt in prompts}


def prefix_key(head: str, tenant: str = "admin") -> str:
    """The edge's x-tokenmesh-prefix of a prompt starting with `head` (gateway/
    model_routing.lua's tenant_prefix), sent with a key of `tenant` (the dev key's)."""
    return tenant.encode().hex() + "00" + head.encode()[:64].hex()


def hashed_worker(channel: grpc.Channel, prompt: str) -> str:
    """Returns the worker the routes' hash sends `prompt` to: its head's first request on
    an Envoy thread takes a turn instead, so the prompt is sent twice."""
    complete(channel, prompt=prompt)
    return complete(channel, prompt=prompt).worker


def prompt_for_each_worker(channel: grpc.Channel, workers: set[str]) -> dict[str, str]:
    """Finds a prompt the edge routes to each of `workers` (routes hash the prompt's head)."""
    found: dict[str, str] = {}
    for n in range(64):
        served = hashed_worker(channel, f"probe {n}")
        found.setdefault(served, f"probe {n}")
        if set(found) >= workers:
            return found
    raise AssertionError(f"64 prompts reached only {sorted(found)}")


def many(channel: grpc.Channel, count: int, **kwargs: object) -> collections.Counter[str]:
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda _: complete(channel, **kwargs), range(count)))  # type: ignore[arg-type]
    return collections.Counter(s.version for s in served)


def test_a_new_model_version_starts_at_zero_weight(catalogue):
    model = catalogue.GetCatalogModel(router_pb.GetCatalogModelRequest(model=MODEL)).model
    weights = {v.version: v.weight for v in model.versions}
    assert weights == {"1": 100, "2": 0}
    assert all(v.healthy_workers == 2 for v in model.versions)


def test_canary_at_20_percent_gets_13_to_27_percent(routed, edge, catalogue):
    split(routed, catalogue, {"1": 80, "2": 20})
    counts = many(edge, 300)
    assert counts["1"] + counts["2"] == 300
    assert 0.13 * 300 <= counts["2"] <= 0.27 * 300, counts


def test_weight_zero_gets_nothing(edge, catalogue):
    counts = many(edge, 100)
    assert counts == {"1": 100}


def test_pinning_sends_everything_to_one_version(routed, edge, catalogue):
    split(routed, catalogue, {"1": 50, "2": 50})
    catalogue.PinModelVersion(router_pb.PinModelVersionRequest(model=MODEL, version="2"))
    wait_for_routes(routed, lambda routes: split_of(routes) == {"2": 100}, "the pin")
    assert many(edge, 100) == {"2": 100}


def _default_versions(routed: Mesh) -> set[tuple[str, str]]:
    """MODEL's default_version as GET /v1/models/{model} and GET /v2/models report it."""
    headers = {"x-api-key": routed.dev_api_key()}
    one = httpx.get(f"{routed.edge_url}/v1/models/{MODEL}", headers=headers, timeout=10)
    listed = httpx.get(f"{routed.edge_url}/v2/models", headers=headers, timeout=10)
    assert one.status_code == 200 and listed.status_code == 200, (one.text, listed.text)
    [v2] = [m for m in listed.json()["models"] if m["name"] == MODEL]
    return {("v1", one.json()["model"]["default_version"]), ("v2", v2["default_version"])}


def test_the_default_version_is_the_one_unpinned_requests_are_routed_to(routed, edge, catalogue):
    # Version 2 is READY and newest, but the split sends every unpinned request to 1.
    split(routed, catalogue, {"1": 100, "2": 0})
    expected = {("v1", "1"), ("v2", "1")}
    wait_until(lambda: _default_versions(routed) == expected, 10, "the split's default")
    rest = rest_complete(routed)
    assert rest.status_code == 200 and rest.headers["x-model-version"] == "1", rest.text
    # It follows the catalogue: a pin, then a split whose largest share is 2.
    catalogue.PinModelVersion(router_pb.PinModelVersionRequest(model=MODEL, version="2"))
    expected = {("v1", "2"), ("v2", "2")}
    wait_until(lambda: _default_versions(routed) == expected, 10, "the pinned default")
    catalogue.PinModelVersion(router_pb.PinModelVersionRequest(model=MODEL, version=""))
    split(routed, catalogue, {"1": 30, "2": 70})
    wait_until(lambda: _default_versions(routed) == expected, 10, "the split's default")
    split(routed, catalogue, {"1": 70, "2": 30})
    expected = {("v1", "1"), ("v2", "1")}
    wait_until(lambda: _default_versions(routed) == expected, 10, "the split's default")


def test_request_version_header_and_alias_choose_the_version(routed, edge, catalogue):
    assert complete(edge, version="2").version == "2"
    assert complete(edge, metadata=(("x-model-version", "2"),)).version == "2"
    # The body's version field wins over the header.
    assert complete(edge, version="1", metadata=(("x-model-version", "2"),)).version == "1"
    catalogue.SetModelAlias(
        router_pb.SetModelAliasRequest(model=MODEL, alias="canary", version="2")
    )
    wait_for_routes(routed, lambda routes: bool(version_route(routes, "canary")), "the alias")
    assert complete(edge, version="canary").version == "2"
    assert complete(edge, version="latest").version == "2"  # implicit alias


def _openai_model(routed: Mesh, model_id: str) -> httpx.Response:
    return httpx.get(
        f"{routed.edge_url}/openai/v1/models/{model_id}",
        headers={"authorization": f"Bearer {routed.dev_api_key()}"},
        timeout=10,
    )


def test_an_openai_model_lookup_resolves_an_alias_as_the_routes_do(routed, catalogue):
    # The worker knows no aliases: GET /openai/v1/models/<model>@<alias> was a 404
    # while a completion with the same model id was served.
    catalogue.SetModelAlias(
        router_pb.SetModelAliasRequest(model=MODEL, alias="canary", version="2")
    )
    wait_for_routes(routed, lambda routes: bool(version_route(routes, "canary")), "the alias")
    for model_id in (f"{MODEL}@canary", f"{MODEL}@latest", f"{MODEL}@1", MODEL):
        reply = _openai_model(routed, model_id)
        assert reply.status_code == 200, (model_id, reply.text)
        assert reply.json()["id"] == model_id
    unknown = _openai_model(routed, f"{MODEL}@no-such-alias")
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["code"] == "model_version_not_found"


def test_unknown_version_is_not_found(edge):
    with pytest.raises(grpc.RpcError) as info:
        complete(edge, version="9")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_rest_response_names_the_version(routed, catalogue):
    split(routed, catalogue, {"2": 100})
    reply = rest_complete(routed, prompt="a b")
    assert reply.status_code == 200
    assert reply.headers["x-model-version"] == "2"
    assert reply.json()["model"] == {"name": MODEL, "version": "2"}


def test_a_rest_call_with_a_ten_byte_varint_still_follows_the_routes(routed, catalogue):
    # The transcoder writes the path's model last, after the body's fields; a uint64
    # seed at or past 2^63 takes a 10-byte varint, which stopped the Lua filter's
    # walk before it: the call skipped the routes (and the per-model limits) and
    # the worker served its newest version.
    reply = rest_complete(routed, prompt="a b", seed="18446744073709551615")
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == {"name": MODEL, "version": "1"}


def _openai_chat(routed: Mesh, raw: bytes) -> httpx.Response:
    return httpx.post(
        f"{routed.edge_url}/openai/v1/completions",
        content=raw,
        headers={"authorization": f"Bearer {routed.dev_api_key()}"},
        timeout=10,
    )


def test_the_edge_reads_an_openai_body_as_the_worker_does(routed, catalogue):
    # The split sends everything to version 1; a body the edge misread went past the
    # routes to the worker, which served version 2 (its newest).
    tail = b', "prompt": "a b", "max_tokens": 1}'
    escaped = _openai_chat(routed, b'{"model": "deterministic-\\u0074est"' + tail)
    assert escaped.status_code == 200, escaped.text
    assert escaped.json()["model"] == f"{MODEL}@1"
    # A key given twice: the worker's parser keeps the last, and so does the edge.
    twice = _openai_chat(
        routed, b'{"model": "no-such-model", "m\\u006fdel": "' + MODEL.encode() + b'"' + tail
    )
    assert twice.status_code == 200, twice.text
    assert twice.json()["model"] == f"{MODEL}@1"
    # UTF-8 only (the edge reads nothing else): a BOM or UTF-16 is a clear 400.
    plain = b'{"model": "' + MODEL.encode() + b'"' + tail
    for raw in (b"\xef\xbb\xbf" + plain, plain.decode().encode("utf-16")):
        refused = _openai_chat(routed, raw)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["type"] == "invalid_request_error"


def test_a_compressed_request_is_refused_not_sent_past_the_routes(edge):
    # The Lua filter cannot read a gzip message's model: the request went to any
    # worker, past the split, the key's pin and the per-model limits.
    stub = rpc.InferenceServiceStub(edge)
    request = pb.CompleteRequest(model=MODEL, prompt="a b " * 50, max_tokens=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Complete(request, compression=grpc.Compression.Gzip, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "uncompressed" in info.value.details()
    status = rpc_status.from_call(info.value)
    assert status is not None, "no google.rpc details"
    assert b"COMPRESSED_REQUEST" in status.details[0].value
    assert stub.Complete(request, timeout=10).model.version == "1"


def test_an_empty_version_header_names_no_version(edge, catalogue):
    # It matched the routes' "a version this edge does not know" case, which any
    # worker serves with its newest version, past the split.
    assert complete(edge, metadata=(("x-model-version", ""),)).version == "1"


def test_deprecated_version_sends_deprecation_and_sunset(routed, edge, catalogue):
    catalogue.DeprecateModelVersion(
        router_pb.DeprecateModelVersionRequest(
            model=MODEL,
            version="2",
            sunset_time={"seconds": 4102444800},  # 2100-01-01
        )
    )
    wait_for_routes(
        routed,
        lambda routes: any(
            "response_headers_to_add" in t for t in targets_of(version_route(routes, "2"))
        ),
        "the deprecation headers",
    )
    served = complete(edge, version="2")
    assert served.headers["deprecation"].startswith("@")
    assert served.headers["sunset"] == "Fri, 01 Jan 2100 00:00:00 GMT"
    assert "deprecation" not in complete(edge, version="1").headers
    reply = rest_complete(routed, version="2")
    assert reply.headers["sunset"] == "Fri, 01 Jan 2100 00:00:00 GMT"


def test_a_model_past_every_versions_sunset_is_404_also_without_a_version(routed, edge, catalogue):
    # Its split was empty then: a request naming no version took no route of the
    # model's and fell through to the route of every worker, where one still loading
    # the retired version served it (without its Deprecation or Sunset).
    assert complete(edge, model=RETIRING).version == "1"
    sunset = int(time.time()) + 3
    catalogue.DeprecateModelVersion(
        router_pb.DeprecateModelVersionRequest(
            model=RETIRING, version="1", sunset_time={"seconds": sunset}
        ),
        timeout=10,
    )
    wait_until(
        lambda: "direct_response" in version_route(edge_routes(routed), "1", RETIRING),
        15,
        "the edge to answer the sunset version itself",
    )
    when = email.utils.formatdate(sunset, usegmt=True)
    for version, message in (
        ("", f"every version of '{RETIRING}' was sunset, the last on {when}"),
        ("1", f"version '1' of '{RETIRING}' was sunset on {when}"),
    ):
        # gRPC callers: NOT_FOUND, as for an unknown version (Envoy said UNIMPLEMENTED).
        with pytest.raises(grpc.RpcError) as info:
            complete(edge, model=RETIRING, version=version)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value
        assert info.value.details() == message
        for reply in (
            rest_complete(routed, RETIRING, version=version),
            httpx.post(
                f"{routed.edge_url}/v2/models/{RETIRING}:complete",
                json={"prompt": "a", "max_output_tokens": 1, "version": version},
                headers={"x-api-key": routed.dev_api_key()},
                timeout=10,
            ),
        ):
            assert reply.status_code == 404, reply.text
            assert reply.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
            assert reply.json()["message"] == message
            assert "x-model-version" not in reply.headers
            assert "grpc-status" not in reply.headers, reply.headers


def test_no_worker_is_503_with_retry_then_the_fallback_serves(routed, edge, catalogue):
    catalogue.RegisterModelVersion(
        router_pb.RegisterModelVersionRequest(model="ghost", version="1")
    )
    wait_for_routes(routed, lambda routes: bool(version_route(routes, "1", "ghost")), "ghost")
    reply = rest_complete(routed, "ghost")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["code"] == 14
    with pytest.raises(grpc.RpcError) as info:
        complete(edge, model="ghost")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(info.value.trailing_metadata() or ())["retry-after"] == "1"

    catalogue.SetFallbackModel(
        router_pb.SetFallbackModelRequest(model="ghost", fallback_model=MODEL)
    )
    wait_for_routes(routed, lambda routes: falls_back(routes, "ghost"), "ghost's fallback")
    served = complete(edge, model="ghost")
    assert served.headers["x-tokenmesh-fallback-from"] == "ghost"
    assert served.headers["x-tokenmesh-model"] == MODEL
    catalogue.SetFallbackModel(router_pb.SetFallbackModelRequest(model="ghost", fallback_model=""))


def test_catalogue_changes_are_validated(routed, catalogue):
    with pytest.raises(grpc.RpcError) as info:
        catalogue.SetTrafficSplit(
            router_pb.SetTrafficSplitRequest(
                model=MODEL, weights=[router_pb2.TrafficWeight(version="3", weight=100)]
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'3'" in (info.value.details() or "")
    reply = httpx.post(
        f"{routed.edge_url}/v1/catalog/models/{MODEL}:split",
        json={"weights": [{"version": "1", "weight": 60}]},
        headers={"x-api-key": routed.dev_api_key()},
        timeout=10,
    )
    assert reply.status_code == 400
    assert "sum to 100" in reply.json()["message"]
    missing = httpx.get(
        f"{routed.edge_url}/v1/catalog/models/nope",
        headers={"x-api-key": routed.dev_api_key()},
        timeout=10,
    )
    assert missing.status_code == 404


def test_cli_lists_splits_deprecates_and_sets_fallbacks(routed, edge):
    def cli(*args: str) -> str:
        env = {**os.environ, "TOKENMESH_STATE_DIR": str(routed.state_dir)}
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def weights() -> dict[str, int]:
        listed = json.loads(cli("models", "list", "--json"))
        model = next(m for m in listed["models"] if m["name"] == MODEL)
        return {v["version"]: v["weight"] for v in model["versions"]}

    cli("models", "split", MODEL, "1=100", "2=0")
    assert weights() == {"1": 100, "2": 0}  # a zero weight is printed, not left out
    cli("models", "split", MODEL, "1=70", "2=30")
    assert weights() == {"1": 70, "2": 30}
    cli("models", "deprecate", MODEL, "1", "--sunset", "2099-12-31")
    cli("models", "register", "ghost", "1")
    cli("models", "fallback", "ghost", MODEL)
    listed = json.loads(cli("models", "list", "--json"))
    model = next(m for m in listed["models"] if m["name"] == MODEL)
    assert model["versions"][0]["state"] == "CATALOG_VERSION_STATE_DEPRECATED"
    assert model["versions"][0]["sunset_time"] == "2099-12-31T00:00:00Z"
    assert next(m for m in listed["models"] if m["name"] == "ghost")["fallback_model"] == MODEL
    workers = json.loads(cli("workers", "list", "--json"))["workers"]
    assert {w["id"] for w in workers} >= {"inference-0", "inference-1"}
    cli("models", "fallback", "ghost", "")


@dataclass
class Outcome:
    started: float
    ok: bool
    error: str = ""


def run_load(
    channel: grpc.Channel, stop: threading.Event, out: list[Outcome], request: Callable[[], object]
) -> None:
    deadline = time.monotonic() + 60  # bounded in time and count
    while not stop.is_set() and time.monotonic() < deadline and len(out) < 20000:
        started = time.monotonic()
        try:
            request()
            out.append(Outcome(started, True))
        except grpc.RpcError as exc:
            out.append(Outcome(started, False, f"{exc.code().name}: {exc.details()}"))


def under_load(
    edge: grpc.Channel, threads: int = 4
) -> tuple[threading.Event, list[Outcome], list[threading.Thread]]:
    stop, out = threading.Event(), list[Outcome]()
    # Prompts of their own: the routes hash a prompt's head, so one prompt
    # would load one worker only.
    numbers = itertools.count()

    def call() -> Served:
        return complete(edge, prompt=f"load {next(numbers)}")

    workers = [
        threading.Thread(target=run_load, args=(edge, stop, out, call)) for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    return stop, out, workers


def finish(stop: threading.Event, workers: list[threading.Thread]) -> None:
    stop.set()
    for worker in workers:
        worker.join(30)


def test_control_plane_restart_keeps_routes_and_loses_no_request(routed, edge, catalogue):
    split(routed, catalogue, {"1": 50, "2": 50})
    stop, outcomes, threads = under_load(edge)
    time.sleep(0.5)
    routed.kill("router")
    time.sleep(1.0)
    routed.restart_service("router", "router")
    time.sleep(2.0)
    finish(stop, threads)
    failures = [o.error for o in outcomes if not o.ok]
    assert not failures, failures[:5]
    assert len(outcomes) > 50
    assert set(many(edge, 60)) == {"1", "2"}  # the 50/50 split survived


def test_workers_renew_within_a_lease_of_a_long_control_plane_outage(routed, catalogue):
    # After an outage of several leases, the router counts expired leases for one lease
    # (and a reconnect) from its return. gRPC's own reconnect backoff (1 s, x1.6, up to
    # 120 s) had a worker's next connect seconds after the router was back, past that
    # grace: its build then left the workers out and the edges answered "no healthy
    # upstream" until they renewed.
    def healthy_workers() -> list[int]:
        request = router_pb.GetCatalogModelRequest(model=MODEL)
        try:
            model = catalogue.GetCatalogModel(request, timeout=5).model
        except grpc.RpcError:  # the edge's connection to the router is opening again
            return []
        return [v.healthy_workers for v in model.versions]

    routed.kill("router")
    time.sleep(10.0)  # the default backoff's attempts: ~1, 2.6, 5.2, 9.3, 15.8 s
    routed.restart_service("router", "router")
    back = time.monotonic()
    wait_until(lambda: healthy_workers() == [2, 2], 10, "both workers to renew")
    renewed_in = time.monotonic() - back
    lease_s = float(ENV["TOKENMESH_ROUTER_LEASE_SECONDS"])
    assert renewed_in < lease_s, f"renewed {renewed_in:.1f}s after the router came back"


def long_streams_on_each_worker(edge: grpc.Channel) -> list[Any]:
    """Opens two long Generate streams on each worker, each past its first message.

    The prompts are found by probing; a weight that moved between the probes
    and the streams (load-aware routing) can send a prompt elsewhere: then the
    streams are cancelled and opened again.
    """
    stub = rpc.InferenceServiceStub(edge)
    both = {"inference-0", "inference-1"}
    for _attempt in range(5):
        prompts = prompt_for_each_worker(edge, both)
        streams = [
            stub.Generate(
                pb.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=500), timeout=30
            )
            for prompt in sorted(prompts.values()) * 2
        ]
        for stream in streams:
            next(stream)
        served = [dict(stream.initial_metadata())["x-tokenmesh-worker"] for stream in streams]
        if collections.Counter(served) == {worker: 2 for worker in both}:
            return streams
        for stream in streams:
            stream.cancel()
    raise AssertionError(f"streams kept landing unevenly: {served}")


def test_kill_9_of_a_worker_fails_nothing_after_2_seconds(routed, edge, catalogue):
    # Long streams on each worker, to see how the killed one's streams end.
    streams = long_streams_on_each_worker(edge)
    stop, outcomes, threads = under_load(edge)
    time.sleep(0.5)
    killed_at = time.monotonic()
    routed.kill("inference-1")
    time.sleep(3.0)
    finish(stop, threads)
    late_failures = [o.error for o in outcomes if not o.ok and o.started > killed_at + 2.0]
    assert not late_failures, late_failures[:5]
    assert sum(o.ok for o in outcomes if o.started > killed_at + 2.0) > 20
    ended = []
    for stream in streams:
        worker = dict(stream.initial_metadata())["x-tokenmesh-worker"]
        try:
            for _ in stream:
                pass
            ended.append((worker, "completed"))
        except grpc.RpcError as exc:
            ended.append((worker, exc.code().name))
    # The killed worker's streams end with an error status; the other's complete.
    assert all(
        (outcome != "completed") == (worker == "inference-1") for worker, outcome in ended
    ), ended
    # Its lease (2 s here) ran out: the registry no longer routes to it.
    model = catalogue.GetCatalogModel(router_pb.GetCatalogModelRequest(model=MODEL)).model
    assert [v.healthy_workers for v in model.versions] == [1, 1]
    assert {worker for worker, _ in ended} == {"inference-0", "inference-1"}
    routed.start_worker("inference-1")
    wait_for_healthy_hosts(routed, CLUSTERS, 2)
    spread = spread_of(routed, CLUSTERS[0], lambda head: complete(edge, prompt=head).worker)
    assert spread == {"inference-0", "inference-1"}


def test_prompts_that_start_alike_reach_the_same_worker(routed, edge):
    # The routes hash a generation's first 64 prompt bytes (bounded-load Maglev):
    # a shared system prompt keeps meeting the worker whose prefix cache holds it.
    head = "the mesh routes tokens through envoy to workers and back again: "
    assert len(head.encode()) >= 64
    complete(edge, prompt=head)  # one connection, one Envoy thread
    seen_by_the_edge(lambda: rest_complete(routed, prompt=head))  # a connection each

    def workers_of_a_round() -> tuple[set[str], set[str]]:
        same = workers_of(edge, (f"{head}question {n}" for n in range(12)))
        stream_worker = dict(
            rpc.InferenceServiceStub(edge)
            .Generate(pb.GenerateRequest(model=MODEL, prompt=head + "streamed", max_tokens=2))
            .initial_metadata()
        )["x-tokenmesh-worker"]
        rest = rest_complete(routed, prompt=head + "over REST")
        return same, {stream_worker, rest.headers["x-tokenmesh-worker"]}

    same, other_paths = stable_round(routed, CLUSTERS[0], workers_of_a_round)
    assert len(same) == 1 and other_paths == same, (same, other_paths)
    # Different heads spread over the workers.
    spread = spread_of(routed, CLUSTERS[0], lambda n: complete(edge, prompt=n + head).worker)
    assert spread == {"inference-0", "inference-1"}


def pins_of(routes: list[dict[str, Any]], label: str = "1") -> dict[str, str]:
    """The prompt heads a version route pins to a worker: prefix key -> worker address."""
    metadata = version_route(routes, label).get("metadata", {}).get("filter_metadata", {})
    placed = dict(metadata.get(LUA_FILTER_NAME, {}))
    placed.pop(SPREAD_KEY, None)  # the turns unseen heads take
    return placed


def test_hot_prompt_heads_are_pinned_evenly_over_the_workers(routed, edge, catalogue):
    # `catalogue`: from version 1 at 100%, nothing pinned (after a test that pinned
    # version 2, run right before it, this one timed out).
    # Hashing a handful of heads splits them unevenly. Pick 8 heads the hash puts
    # 6 on one worker and 2 on the other, keep them busy: the workers report them
    # in their heartbeats, the router pins them 4 and 4, and the edge sends each
    # head to its pinned worker (the old code kept the 6/2 split).
    by_worker: dict[str, list[str]] = {"inference-0": [], "inference-1": []}
    for n in range(300):
        head = f"{n:03d}: a system prompt that many questions share, longer than 64 bytes. "
        by_worker[hashed_worker(edge, head + "probe")].append(head)
        heavy = max(by_worker, key=lambda w: len(by_worker[w]))
        light = min(by_worker, key=lambda w: len(by_worker[w]))
        if len(by_worker[heavy]) >= 6 and len(by_worker[light]) >= 2:
            break
    heads = by_worker[heavy][:6] + by_worker[light][:2]
    keys = {head: prefix_key(head) for head in heads}
    addresses = {routed.address(w): w for w in by_worker}

    def pinned_evenly_and_followed() -> bool:
        served = {
            head: {complete(edge, prompt=head + f"q{i}").worker for i in range(3)} for head in heads
        }
        pins = pins_of(edge_routes(routed))
        if not all(keys[h] in pins for h in heads):
            return False
        owners = {h: addresses.get(pins[keys[h]]) for h in heads}
        split = collections.Counter(owners.values())
        return split == {"inference-0": 4, "inference-1": 4} and all(
            served[h] == {owners[h]} for h in heads
        )

    wait_until(pinned_evenly_and_followed, 30, "8 hot heads pinned 4/4 and followed")


def test_heads_the_edge_has_not_seen_go_to_the_workers_in_turn(routed, edge):
    # A head nobody sent is cached nowhere, so the edge places its first request
    # by turn, weighted like a round robin (a hash splits a handful of distinct
    # heads unevenly: bench row K2); its later requests follow the hash, all to
    # one worker. With even weights the turns alternate.
    heads: list[str] = []

    def first_requests_alternate() -> bool:
        metadata = version_route(edge_routes(routed), "1").get("metadata", {})
        turns = metadata.get("filter_metadata", {}).get(LUA_FILTER_NAME, {}).get(SPREAD_KEY, [])
        if set(collections.Counter(turns).values()) != {4}:
            return False  # other tests' traffic moved a weight: wait for even turns
        tag = uuid.uuid4().hex
        heads[:] = [
            f"{tag} {n:02d}: a prompt nobody sent before, longer than 64 bytes" for n in range(12)
        ]
        first = [complete(edge, prompt=head).worker for head in heads]
        return all(a != b for a, b in itertools.pairwise(first))

    wait_until(first_requests_alternate, 30, "unseen heads' first requests alternating")

    def workers_of_each_head() -> list[set[str]]:
        return [workers_of(edge, (f"{head} again {i}" for i in range(3))) for head in heads]

    later = stable_round(routed, CLUSTERS[0], workers_of_each_head)
    assert all(len(workers) == 1 for workers in later), later


def test_an_edge_started_without_prefix_affinity_spreads_prompts_that_start_alike(routed):
    # Same control plane, same workers: only this edge's clusters are round robin
    # (bench rows K1/K2 compare the two).
    address = routed.start_extra_edge("edge-round-robin", prefix_affinity=False)
    head = "the mesh routes tokens through envoy to workers and back again: "
    with authed_channel(address, [("x-api-key", routed.dev_api_key())]) as plain:
        spread = workers_of(plain, (f"{head}question {n}" for n in range(12)))
    assert spread == {"inference-0", "inference-1"}


def test_sigterm_drains_a_worker_its_stream_completes(routed, edge):
    stub = rpc.InferenceServiceStub(edge)
    stream = stub.Generate(pb.GenerateRequest(model=MODEL, prompt="a", max_tokens=500), timeout=30)
    first = next(stream)
    victim = dict(stream.initial_metadata())["x-tokenmesh-worker"]
    address = routed.address(victim)
    stop, outcomes, threads = under_load(edge)
    routed.terminate(victim)
    # The edge drops the draining worker as soon as the router takes it out; it
    # used to keep it, still healthy and taking requests, as pending removal
    # until the stopped worker failed two health checks.
    seen = states_until_gone(routed, CLUSTERS[0], address)
    assert not [flags for flags in seen if "pending_dynamic_removal" in flags], seen
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    assert first.index == 0 and rest[-1].usage.completion_tokens == 500
    assert routed.wait_exit(victim, 30) == 0
    time.sleep(0.5)
    finish(stop, threads)
    failures = [o.error for o in outcomes if not o.ok]
    assert not failures, failures[:5]
    survivor = "inference-0" if victim == "inference-1" else "inference-1"
    assert {complete(edge).worker for _ in range(10)} == {survivor}
    routed.start_worker(victim)


def test_a_killed_workers_heads_reach_the_other_worker_at_once(routed, edge):
    # A seen head follows the hash (or its pin), an unseen one a turn: both name
    # an address. When that worker dies, its requests must reach the survivor
    # (retried on another host) before health checks or the router notice.
    victim, survivor = "inference-0", "inference-1"
    head = prompt_for_each_worker(edge, {victim, survivor})[victim]
    dead = routed.address(victim)
    routed.kill(victim)  # returns once it is dead
    try:
        assert {complete(edge, prompt=head).worker for _ in range(10)} == {survivor}
        assert workers_of(edge, (f"after the kill {n}" for n in range(10))) == {survivor}
    finally:
        routed.start_worker(victim)
    wait_for_healthy_hosts(routed, CLUSTERS, 2)
    for cluster in CLUSTERS:  # the next test finds only live workers (its lease expires)
        states_until_gone(routed, cluster, dead, 30)


def states_until_gone(mesh: Mesh, cluster: str, address: str, timeout_s: float = 10) -> list[str]:
    """Polls the edge's `cluster` until `address` leaves it; returns the health flags
    it showed meanwhile (every 0.1 s)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while host := edge_hosts(mesh, cluster).get(address):
        assert time.monotonic() < deadline, f"{address} still in {cluster}: {seen}"
        seen.append(host["health_flags"])
        time.sleep(0.1)
    return seen


def test_a_worker_the_router_cannot_drain_leaves_through_the_edges_health_checks(routed, edge):
    # With the router down (or its Redis stalled), DrainWorker fails and the edges
    # keep routing to a stopping worker until their health checks see it: it must
    # turn NOT_SERVING and still answer what arrives meanwhile (it used to refuse
    # new requests at once).
    victim = "inference-1"
    routed.terminate("router")
    assert routed.wait_exit("router", 30) == 0
    try:
        with routed.channel(victim, caller=contract.EDGE) as direct:
            health = health_pb2_grpc.HealthStub(direct)
            models = rpc.InferenceServiceStub(direct)
            routed.terminate(victim)
            wait_until(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                10,
                "the stopping worker to say NOT_SERVING",
            )
            assert models.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert routed.wait_exit(victim, 30) == 0
    finally:
        routed.restart_service("router", "router")
    routed.start_worker(victim)
    wait_until(lambda: both_workers_serve(edge), 30, "the edge to route to both workers again")


def both_workers_serve(edge: grpc.Channel) -> bool:
    """Returns whether the edge spreads prompts over both workers (False on an error)."""
    try:
        return workers_of(edge, (f"both {n}" for n in range(20))) == {"inference-0", "inference-1"}
    except grpc.RpcError:
        return False


def test_several_edges_share_one_control_plane(routed, catalogue):
    # A second Envoy of another flavour (no auth): its own routes, the same split.
    address = routed.start_extra_edge("edge-open", auth=None)
    split(routed, catalogue, {"2": 100})
    wait_for_routes(routed, lambda routes: split_of(routes) == {"2": 100}, "2", "edge-open")
    with grpc.insecure_channel(address) as open_edge:
        assert many(open_edge, 20) == {"2": 20}
    split(routed, catalogue, {"1": 100})
    wait_for_routes(routed, lambda routes: split_of(routes) == {"1": 100}, "1", "edge-open")
    with grpc.insecure_channel(address) as open_edge:
        assert many(open_edge, 20) == {"1": 20}


def test_a_key_pin_routes_its_requests_unless_they_name_a_version(routed, edge, catalogue):
    auth = auth_rpc.AuthServiceStub(edge)
    created = auth.CreateApiKey(
        auth_pb.CreateApiKeyRequest(
            tenant="pinned",
            scopes=["inference:generate"],
            pinned_versions={MODEL: "2"},
        )
    )
    assert dict(created.api_key.pinned_versions) == {MODEL: "2"}
    token = httpx.post(
        f"{routed.edge_url}/v1/auth/token", json={"api_key": created.secret}, timeout=10
    ).json()["access_token"]
    for credential in (("x-api-key", created.secret), ("authorization", f"Bearer {token}")):
        with authed_channel(routed.edge_address, [credential]) as pinned:
            assert many(pinned, 10) == {"2": 10}  # the catalogue says 100% version 1
            assert complete(pinned, version="1").version == "1"
    assert many(edge, 10) == {"1": 10}  # other keys follow the catalogue


def test_drain_rpc_takes_a_worker_out_and_it_exits(routed, edge):
    with routed.channel("router") as channel:
        registry = router_rpc.WorkerRegistryServiceStub(channel)
        drained = registry.DrainWorker(router_pb.DrainWorkerRequest(worker_id="inference-0"))
        assert drained.worker.state == router_pb2.WORKER_STATE_DRAINING
        # The worker learns it at its next heartbeat and stops itself like on SIGTERM.
        assert routed.wait_exit("inference-0", 30) == 0
        assert {complete(edge).worker for _ in range(10)} == {"inference-1"}
        routed.start_worker("inference-0")
        wait_until(
            lambda: (
                {
                    w.id: w.state
                    for w in registry.ListWorkers(router_pb.ListWorkersRequest()).workers
                }.get("inference-0")
                == router_pb2.WORKER_STATE_SERVING
            ),
            30,
            "the restarted worker to register",
        )
    wait_for_healthy_hosts(routed, CLUSTERS, 2)
    spread = spread_of(routed, CLUSTERS[0], lambda head: complete(edge, prompt=head).worker)
    assert spread == {"inference-0", "inference-1"}


def test_a_per_model_request_limit_applies_to_every_caller(routed, catalogue):
    catalogue.RegisterModelVersion(
        router_pb.RegisterModelVersionRequest(model="throttled", version="1")
    )
    catalogue.SetFallbackModel(
        router_pb.SetFallbackModelRequest(model="throttled", fallback_model=MODEL)
    )
    wait_for_routes(routed, lambda routes: falls_back(routes, "throttled"), "the fallback")
    replies = [rest_complete(routed, "throttled") for _ in range(3)]
    # The limiter answered every call (an unanswered one fails open, without headers).
    remaining = [r.headers.get("x-ratelimit-remaining") for r in replies]
    assert [r.status_code for r in replies] == [200, 200, 429], (remaining, edge_stats(routed))
    assert remaining == ["1", "0", "0"]
    # The bundled mesh keeps request windows in a volatile Redis of their own
    # (no fsync per decision), and everything else in the durable one.
    window = "tm:ratelimit:model:throttled"
    with redis.Redis.from_url(routed.limits_redis_url) as limits:
        assert limits.zcard(window) == 2
        assert limits.config_get("appendonly") == {"appendonly": "no"}
    with redis.Redis.from_url(routed.redis_url) as durable:
        assert not durable.exists(window)
        assert durable.config_get("appendfsync") == {"appendfsync": "always"}
    assert "model_requests_per_minute=2 for model throttled" in replies[2].json()["message"]
    assert int(replies[2].headers["retry-after"]) >= 1


def test_a_stopping_router_lets_go_of_its_envoys_at_once(routed, edge):
    stop, outcomes, threads = under_load(edge)
    started = time.monotonic()
    routed.terminate("router")
    assert routed.wait_exit("router", 30) == 0
    stopped_in = time.monotonic() - started
    routed.restart_service("router", "router")
    time.sleep(1.0)
    finish(stop, threads)
    # ADS streams end on SIGTERM instead of holding the 5 s grace period.
    assert stopped_in < 3.0, stopped_in
    failures = [o.error for o in outcomes if not o.ok]
    assert not failures, failures[:5]


def set_worker_pools(catalogue: router_rpc.RouterServiceStub, *pools: str) -> None:
    catalogue.SetModelWorkerPools(
        router_pb.SetModelWorkerPoolsRequest(model=MODEL, worker_pools=list(pools)), timeout=10
    )


def test_a_placed_model_reaches_only_its_pools_certificates(routed, edge, catalogue):
    # This mesh's workers hold the shared `worker` certificate, not `worker-gpu`.
    set_worker_pools(catalogue, "gpu")
    forged = f"forged-{uuid.uuid4().hex[:8]}"
    try:
        wait_until(lambda: not edge_hosts(routed, CLUSTERS[0]), 10, "the workers to leave")
        with pytest.raises(grpc.RpcError) as unrouted:
            complete(edge, prompt="placed")
        assert unrouted.value.code() == grpc.StatusCode.UNAVAILABLE
        # A registry entry that says `gpu` for a worker whose certificate does not
        # (what a tampered registry would hold) reaches the edge's cluster, and the
        # edge's TLS check of the pool's SPIFFE id refuses the worker.
        with redis.Redis.from_url(routed.redis_url) as client:
            real = WorkerEntry.from_json("inference-0", client.hget(WORKERS_KEY, "inference-0"))
            # Only the real worker's address: the rest of its entry is what earlier tests
            # left (a drain's state, say).
            fake = WorkerEntry(
                forged,
                real.host,
                real.port,
                ((MODEL, "1"),),
                lease_expires_at=time.time() + 600,
                pool="gpu",
            )
            client.hset(WORKERS_KEY, forged, fake.to_json())
        wait_until(lambda: len(edge_hosts(routed, CLUSTERS[0])) == 1, 10, "the forged entry")
        wait_until(
            lambda: sum(map(int, san_failures(routed).values())) > 0, 10, "a refused certificate"
        )
        assert [h.get("health_flags") for h in edge_hosts(routed, CLUSTERS[0]).values()] != [
            "healthy"
        ]
        with pytest.raises(grpc.RpcError) as refused:
            complete(edge, prompt="placed")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        with redis.Redis.from_url(routed.redis_url) as client:
            client.hdel(WORKERS_KEY, forged)
        set_worker_pools(catalogue)
    wait_for_healthy_hosts(routed, CLUSTERS, 2)
    assert complete(edge, prompt="placed").worker in {"inference-0", "inference-1"}


def san_failures(routed: Mesh) -> dict[str, str]:
    """The edge's per-cluster counters of upstream certificates refused by their SAN."""
    stats = edge_stats(routed, "cluster.")
    return {name: value for name, value in stats.items() if name.endswith("ssl.fail_verify_san")}
