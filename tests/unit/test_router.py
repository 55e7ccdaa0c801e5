"""The router's pure parts: catalogue rules, the snapshot builder, the ADS stream state."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from gateway.grpc_paths import GRPC_CONTENT_TYPE
from services.core.errors import InvalidArgument, NotFound
from services.router import catalog as cat
from services.router import snapshot
from services.router.catalog import ModelEntry
from services.router.registry import DRAINING, WorkerEntry
from services.router.snapshot import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, EdgeFlags
from services.router.xds import CLUSTER_LINGER_S, ControlPlane, _Stream, pack

NOW = 1_800_000_000.0
DEFAULT_FLAGS = EdgeFlags()


def two_versions() -> ModelEntry:
    model = cat.add_version(None, "m", "1", 0)
    return cat.add_version(model, "m", "2", 0)


def test_first_version_takes_all_traffic_and_later_ones_start_at_zero():
    model = two_versions()
    assert model.effective_weights(NOW) == {"1": 100}
    with pytest.raises(InvalidArgument, match="starts at 0"):
        cat.add_version(model, "m", "3", 10)


def test_split_must_sum_to_100_and_name_known_versions():
    model = two_versions()
    assert cat.set_split(model, {"1": 80, "2": 20}).effective_weights(NOW) == {"1": 80, "2": 20}
    with pytest.raises(InvalidArgument, match="they sum to 90"):
        cat.set_split(model, {"1": 90})
    with pytest.raises(InvalidArgument, match="'7' of 'm' is not registered"):
        cat.set_split(model, {"7": 100})


def test_pin_overrides_the_split_and_sunset_versions_stop_serving():
    model = cat.set_split(two_versions(), {"1": 50, "2": 50})
    assert cat.pin(model, "2").effective_weights(NOW) == {"2": 100}
    sunset = cat.deprecate(model, "1", sunset_at=NOW - 1, now=NOW - 100)
    assert sunset.effective_weights(NOW) == {"2": 100}  # the sunset share moves over
    assert sunset.version("1") is not None and sunset.version("1").deprecated_at == NOW - 100


def test_a_sunset_version_cannot_be_pinned():
    # The pin did nothing (effective_weights skips a sunset version) yet was reported,
    # and StartRollout refused with MODEL_PINNED because of it.
    model = cat.deprecate(two_versions(), "1", sunset_at=NOW - 1, now=NOW - 100)
    with pytest.raises(InvalidArgument, match="'1' of 'm' was sunset") as info:
        cat.pin(model, "1", NOW)
    assert [v.field for v in info.value.violations] == ["version"]
    assert cat.pin(model, "1", NOW - 50).pinned == "1"  # before its sunset: fine
    assert cat.pin(model, "2", NOW).pinned == "2"
    assert cat.pin(cat.pin(model, "2", NOW), "", NOW).pinned == ""


def test_a_sunset_that_cannot_be_formatted_back_is_refused():
    # 253402300800 s (the year 10000: 9999-12-31T23:59:59.999999999Z as a float) was
    # stored, and every snapshot build raised from then on.
    with pytest.raises(InvalidArgument, match="at most 9999-12-31T23:59:59Z") as info:
        cat.deprecate(two_versions(), "1", sunset_at=cat.MAX_TIME_S + 1, now=NOW)
    assert [v.field for v in info.value.violations] == ["sunset_time"]
    with pytest.raises(InvalidArgument):
        cat.deprecate(two_versions(), "1", sunset_at=float("nan"), now=NOW)
    kept = cat.deprecate(two_versions(), "1", sunset_at=cat.MAX_TIME_S, now=NOW)
    assert kept.version("1").sunset_at == cat.MAX_TIME_S


def test_a_stored_sunset_past_9999_reads_as_9999_and_builds_go_on():
    # Written by an older router: it must not stop every build and catalogue read.
    stored = json.loads(two_versions().to_json())
    stored["versions"][0].update(deprecated_at=NOW, sunset_at=253402300800.0)
    for sunset_at in (253402300800.0, float("inf")):
        stored["versions"][0]["sunset_at"] = sunset_at
        model = ModelEntry.from_json("m", json.dumps(stored))
        assert model.version("1").sunset_at == cat.MAX_TIME_S
        built = snapshot.build({"m": model}, [], NOW, DEFAULT_FLAGS, snapshot.ClusterOptions())
        assert "Fri, 31 Dec 9999 23:59:59 GMT" in json.dumps(built.by_type[ROUTE_TYPE])


def test_fallbacks_must_exist_and_not_chain():
    a, b = two_versions(), cat.add_version(None, "b", "1", 0)
    models = {"m": a, "b": b}
    with pytest.raises(NotFound):
        cat.set_fallback(a, "nope", models)
    with pytest.raises(InvalidArgument, match="itself"):
        cat.set_fallback(a, "m", models)
    models["b"] = cat.set_fallback(b, "m", models)
    with pytest.raises(InvalidArgument, match="chains"):
        cat.set_fallback(a, "b", models)
    # From the other end: m falling back to c while b falls back to m (b -> m -> c).
    models["c"] = cat.add_version(None, "c", "1", 0)
    with pytest.raises(InvalidArgument, match="chains"):
        cat.set_fallback(models["m"], "c", models)


def test_aliases_cannot_shadow_versions():
    model = two_versions()
    assert cat.set_alias(model, "canary", "2").aliases == {"canary": "2"}
    with pytest.raises(InvalidArgument):
        cat.set_alias(model, "1", "2")


def test_versions_cannot_shadow_aliases_either():
    # A worker registering version "stable" took the alias's callers to a new
    # version at 0% (its exact route comes first), silently.
    model = cat.set_alias(two_versions(), "stable", "1")
    with pytest.raises(InvalidArgument, match="alias"):
        cat.add_version(model, "m", "stable", 0)


def worker(
    worker_id: str, port: int, *models: tuple[str, str], state: str = "serving"
) -> WorkerEntry:
    return WorkerEntry(worker_id, "127.0.0.1", port, models, state, NOW + 5)


def build(
    models: dict[str, ModelEntry], workers: list[WorkerEntry], flags: EdgeFlags = DEFAULT_FLAGS
):
    return snapshot.build(models, workers, NOW, flags, snapshot.ClusterOptions())


def test_snapshot_has_a_cluster_per_version_with_only_its_routable_workers():
    workers = [
        worker("w1", 1001, ("m", "1"), ("m", "2")),
        worker("w2", 1002, ("m", "1")),
        worker("w3", 1003, ("m", "2"), state=DRAINING),
        WorkerEntry("w4", "127.0.0.1", 1004, (("m", "2"),), "serving", NOW - 1),  # lease ran out
    ]
    resources = build({"m": cat.set_split(two_versions(), {"1": 80, "2": 20})}, workers)
    assert set(resources.by_type[CLUSTER_TYPE]) == {"inference", "model:m:1", "model:m:2"}
    ports = {
        name: [
            e["endpoint"]["address"]["socket_address"]["port_value"]
            for group in cla["endpoints"]
            for e in group["lb_endpoints"]
        ]
        for name, cla in resources.by_type[ENDPOINT_TYPE].items()
    }
    assert ports == {"inference": [1001, 1002], "model:m:1": [1001, 1002], "model:m:2": [1001]}
    assert (
        pack(resources).versions
        == pack(build({"m": cat.set_split(two_versions(), {"1": 80, "2": 20})}, workers)).versions
    )


def test_routes_match_versions_then_split_and_tell_the_worker():
    model = cat.set_alias(cat.set_split(two_versions(), {"1": 80, "2": 20}), "canary", "2")
    routes = snapshot.model_routes(model, {"m": model}, NOW)
    matches = [
        {h["name"]: h.get("string_match", {}).get("exact", "*") for h in r["match"]["headers"]}
        for r in routes
    ]
    assert matches == [
        {"x-tokenmesh-model": "m", "x-model-version": "1"},
        {"x-tokenmesh-model": "m", "x-model-version": "2"},
        {"x-tokenmesh-model": "m", "x-model-version": "canary"},
        {"x-tokenmesh-model": "m", "x-model-version": "latest"},  # implicit: the newest
        {"x-tokenmesh-model": "m", "x-model-version": "*"},  # unknown version: NOT_FOUND
        {"x-tokenmesh-model": "m"},
    ]
    assert routes[3]["route"]["weighted_clusters"]["clusters"][0]["name"] == "model:m:2"
    assert routes[4]["route"]["cluster"] == "inference"
    split = routes[-1]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"]) for c in split] == [("model:m:1", 80), ("model:m:2", 20)]
    told = {h["header"]["key"]: h["header"]["value"] for h in split[1]["request_headers_to_add"]}
    assert told == {"x-tokenmesh-route-model": "m", "x-tokenmesh-route-version": "2"}
    canary = routes[2]["route"]["weighted_clusters"]["clusters"][0]
    assert canary["name"] == "model:m:2"
    assert routes[-1]["route"]["timeout"] == "0s"  # streams: idle timeout only


def test_prefix_affinity_hashes_the_prompt_head_over_bounded_load_maglev_clusters():
    model = cat.set_split(two_versions(), {"1": 80, "2": 20})
    workers = [worker("w1", 1001, ("m", "1"))]
    hashed = build({"m": model}, workers)  # the default
    plain = snapshot.build(
        {"m": model}, workers, NOW, DEFAULT_FLAGS, snapshot.ClusterOptions(prefix_affinity=False)
    )
    for resources, policy in ((hashed, "MAGLEV"), (plain, "ROUND_ROBIN")):
        clusters = resources.by_type[CLUSTER_TYPE]
        assert clusters["model:m:1"]["lb_policy"] == policy
        assert clusters["inference"]["lb_policy"] == "ROUND_ROBIN"  # ListModels and the like
    balance = hashed.by_type[CLUSTER_TYPE]["model:m:2"]["common_lb_config"]
    assert balance["consistent_hashing_lb_config"] == {"hash_balance_factor": 150}
    routes = hashed.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
    model_routes = [r for r in routes if "weighted_clusters" in r.get("route", {})]
    assert model_routes and all(
        r["route"]["hash_policy"] == [{"header": {"header_name": "x-tokenmesh-prefix"}}]
        for r in model_routes
    )
    plain_routes = plain.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
    assert not any("hash_policy" in r.get("route", {}) for r in plain_routes)


def test_fallback_goes_through_an_aggregate_cluster_and_deprecation_adds_headers():
    backup = cat.add_version(None, "b", "1", 0)
    model = cat.deprecate(two_versions(), "1", sunset_at=4102444800, now=NOW)
    model = cat.set_fallback(model, "b", {"m": model, "b": backup})
    resources = build({"m": model, "b": backup}, [])
    aggregate = resources.by_type[CLUSTER_TYPE]["fallback:m:1"]
    assert aggregate["cluster_type"]["typed_config"]["clusters"] == ["model:m:1", "model:b:1"]
    route = snapshot.model_routes(model, {"m": model, "b": backup}, NOW)[-1]
    target = route["route"]["weighted_clusters"]["clusters"][0]
    assert target["name"] == "fallback:m:1"
    added = {h["header"]["key"]: h["header"]["value"] for h in target["response_headers_to_add"]}
    assert added == {"deprecation": f"@{int(NOW)}", "sunset": "Fri, 01 Jan 2100 00:00:00 GMT"}
    # Beside a deprecated API version's own (the edge keeps the earliest), not over them.
    assert {h["append_action"] for h in target["response_headers_to_add"]} == {
        "APPEND_IF_EXISTS_OR_ADD"
    }
    told = {h["header"]["key"] for h in target["request_headers_to_add"]}
    assert {"x-tokenmesh-fallback-model", "x-tokenmesh-fallback-version"} <= told
    assert pack(resources).by_type[ROUTE_TYPE]["edge"]  # valid Envoy protos


def test_every_resource_converts_to_envoy_protos():
    model = cat.set_fallback(two_versions(), "b", {"b": cat.add_version(None, "b", "1", 0)})
    for flags in (EdgeFlags(), EdgeFlags(auth=False, ratelimit=False)):
        packed = pack(
            build(
                {"m": model, "b": cat.add_version(None, "b", "1", 0)},
                [worker("w", 1, ("m", "1"))],
                flags,
            )
        )
        route = route_pb2.RouteConfiguration()
        assert packed.by_type[ROUTE_TYPE]["edge"].Unpack(route)
        assert route.virtual_hosts[0].routes


def test_worker_clusters_eject_only_on_failures_envoy_sees_and_apply_health_soon():
    packed = pack(build({"m": two_versions()}, [worker("w", 1, ("m", "1"))]))
    cluster = cluster_pb2.Cluster()
    assert packed.by_type[CLUSTER_TYPE]["model:m:1"].Unpack(cluster)
    outlier = cluster.outlier_detection
    # A status a live worker answers (a caller can provoke one) never ejects it.
    assert outlier.split_external_local_origin_errors
    assert outlier.enforcing_consecutive_5xx.value == 0
    assert outlier.enforcing_consecutive_gateway_failure.value == 0
    assert outlier.enforcing_success_rate.value == 0
    assert outlier.consecutive_local_origin_failure.value == 2  # connect failures, resets
    assert cluster.common_lb_config.update_merge_window.ToMilliseconds() == 250


def _plane() -> tuple[ControlPlane, dict[str, dict[str, ModelEntry]]]:
    state: dict[str, dict[str, ModelEntry]] = {"models": {"m": two_versions()}}

    async def build_for(flavours: Sequence[EdgeFlags]):
        return [build(state["models"], [worker("w", 1, ("m", "1"))], flags) for flags in flavours]

    return ControlPlane(build_for, poll_s=1), state


def _request(
    type_url: str, nonce: str = "", version: str = "", error: str = "", node: bool = False
):
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url, response_nonce=nonce, version_info=version
    )
    if error:
        request.error_detail.code = 3
        request.error_detail.message = error
    if node:
        request.node.id = "edge-test"
        request.node.metadata.CopyFrom(
            struct_pb2.Struct(fields={"tokenmesh_auth": struct_pb2.Value(bool_value=False)})
        )
    return request


def test_ads_stream_acks_nacks_and_ignores_stale_nonces():
    async def scenario():
        plane, state = _plane()
        await plane.refresh()
        stream = _Stream(plane, "peer")
        await stream.on_request(_request(CLUSTER_TYPE, node=True))
        assert stream.flags == EdgeFlags(auth=False, ratelimit=True)
        first = stream.outbox.get_nowait()
        assert first.type_url == CLUSTER_TYPE and len(first.resources) == 3
        # ACK: nothing new to send.
        await stream.on_request(_request(CLUSTER_TYPE, first.nonce, first.version_info))
        assert stream.outbox.empty()
        assert stream.subscriptions[CLUSTER_TYPE].acked_version == first.version_info
        # A change is sent once; a stale nonce is ignored; a NACK is not resent.
        state["models"] = {"m": cat.set_split(two_versions(), {"1": 50, "2": 50})}
        await plane.refresh()
        stream.send_all()
        assert stream.outbox.empty()  # clusters did not change (only routes did)
        await stream.on_request(_request(ROUTE_TYPE))
        routes = stream.outbox.get_nowait()
        await stream.on_request(_request(ROUTE_TYPE, "stale", "x", error="bad"))
        assert stream.outbox.empty()
        await stream.on_request(_request(ROUTE_TYPE, routes.nonce, "", error="rejected"))
        assert stream.outbox.empty()
        assert stream.subscriptions[ROUTE_TYPE].acked_version == ""

    asyncio.run(scenario())


def test_expired_leases_count_during_the_grace_after_a_control_plane_restart():
    stale = WorkerEntry("w", "127.0.0.1", 1001, (("m", "1"),), "serving", NOW - 30)
    draining = worker("d", 1002, ("m", "1"), state=DRAINING)
    models = {"m": two_versions()}

    def hosts(ended_after: float | None) -> int:
        resources = snapshot.build(
            models, [stale, draining], NOW, EdgeFlags(), snapshot.ClusterOptions(), ended_after
        )
        return len(resources.by_type[ENDPOINT_TYPE]["model:m:1"]["endpoints"][0]["lb_endpoints"])

    assert hosts(ended_after=None) == 0  # no grace
    assert hosts(ended_after=NOW - 40) == 1  # draining workers stay out even then
    assert hosts(ended_after=NOW - 30) == 0  # it ended before the last build outside one


def test_a_sunset_version_is_answered_by_the_edge_and_leaves_the_split():
    model = cat.set_split(two_versions(), {"1": 50, "2": 50})
    model = cat.deprecate(model, "1", sunset_at=NOW - 60, now=NOW - 3600)
    routes = snapshot.model_routes(model, {"m": model}, NOW)
    sunset = routes[0]
    assert sunset["direct_response"]["status"] == 404
    assert "version '1' of 'm' was sunset on" in sunset["direct_response"]["body"]["inline_string"]
    split = routes[-1]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"]) for c in split] == [("model:m:2", 100)]
    resources = build({"m": model}, [worker("w", 1, ("m", "1"), ("m", "2"))])
    assert "model:m:1" not in resources.by_type[CLUSTER_TYPE]
    assert pack(resources).by_type[ROUTE_TYPE]["edge"]  # valid Envoy protos


NATIVE_GRPC = [
    {"name": "content-type", "string_match": {"safe_regex": {"regex": GRPC_CONTENT_TYPE}}},
    {"name": "x-envoy-original-path", "present_match": False},
]


def answered_by_the_edge(
    routes: list[dict[str, Any]], model: str, label: str | None
) -> dict[str, tuple[int, str, dict[str, str]]]:
    """How the edge itself answers a request for `label` of `model` (None: naming no
    version), by caller ("grpc": native gRPC, "rest"): HTTP status, body, added headers.
    The first route whose match is that of the caller counts, as in Envoy (a native
    gRPC request also matches the REST one's)."""
    rest = snapshot._match(model, label)
    native = {**rest, "headers": rest["headers"] + NATIVE_GRPC}
    found: dict[str, tuple[int, str, dict[str, str]]] = {}
    for caller, matches in (("grpc", (native, rest)), ("rest", (rest,))):
        route = next((r for r in routes if r["match"] in matches), None)
        if route is not None and "direct_response" in route:
            reply = route["direct_response"]
            added = route.get("response_headers_to_add", [])
            headers = {h["header"]["key"]: h["header"]["value"] for h in added}
            found[caller] = (reply["status"], reply["body"]["inline_string"], headers)
    return found


def test_a_sunset_version_answers_grpc_callers_not_found():
    # Without a grpc-status of its own, Envoy derived UNIMPLEMENTED (12) from the 404;
    # REST callers get the JSON 404 (code 5) without a grpc-status header.
    model = cat.deprecate(two_versions(), "1", sunset_at=NOW - 60, now=NOW - 3600)
    routes = snapshot.model_routes(model, {"m": model}, NOW)
    message = "version '1' of 'm' was sunset on Fri, 15 Jan 2027 07:59:00 GMT"
    assert answered_by_the_edge(routes, "m", "1") == {
        "grpc": (404, message, {"grpc-status": "5"}),
        "rest": (404, message, {}),
    }


def test_a_model_whose_versions_were_all_sunset_answers_requests_without_a_version_404():
    # The split is empty then: no route took a request naming no version, which fell
    # through to `inference`, and a worker still loading version 1 served it.
    model = cat.deprecate(two_versions(), "1", sunset_at=NOW - 120, now=NOW - 3600)
    model = cat.deprecate(model, "2", sunset_at=NOW - 60, now=NOW - 3600)
    assert model.effective_weights(NOW) == {}
    routes = snapshot.model_routes(model, {"m": model}, NOW)
    last = "Fri, 15 Jan 2027 07:59:00 GMT"  # version 2's sunset, NOW - 60
    message = f"every version of 'm' was sunset, the last on {last}"
    assert answered_by_the_edge(routes, "m", None) == {
        "grpc": (404, message, {"grpc-status": "5"}),
        "rest": (404, message, {}),
    }
    # "latest" named the newest serving version; now the newest version's sunset answers.
    latest = answered_by_the_edge(routes, "m", "latest")
    assert latest["rest"][1] == f"version 'latest' of 'm' was sunset on {last}"
    resources = build({"m": model}, [worker("w", 1, ("m", "1"), ("m", "2"))])
    assert not any(name.startswith("model:m:") for name in resources.by_type[CLUSTER_TYPE])
    assert pack(resources).by_type[ROUTE_TYPE]["edge"]  # valid Envoy protos


def test_a_retry_re_picks_enough_to_leave_a_dead_worker_of_two():
    """Routes hash to pick a worker; a retry's re-pick is a perturbed hash, a draw
    weighted by the load-aware weights. With 3 picks a retry went back to the dead
    worker of two even ones 1 time in 8 (a drain under load failed requests so); with
    10, at weights 100 to 5 (the live one slowed), 6 times in 10 (a killed worker's
    requests failed in CI so). Every route must leave it at most 1 time in 100."""
    from services.router.load_weights import MIN_WEIGHT, NEUTRAL_WEIGHT

    live = MIN_WEIGHT / (MIN_WEIGHT + NEUTRAL_WEIGHT)
    model = cat.set_split(two_versions(), {"1": 80, "2": 20})
    for route in snapshot.model_routes(model, {"m": model}, NOW):
        policy = route.get("route", {}).get("retry_policy")
        if policy is not None:
            assert (1 - live) ** policy["host_selection_retry_max_attempts"] < 1 / 100


def test_a_poll_that_reads_the_same_state_wakes_no_stream_and_a_change_does():
    async def scenario():
        plane, state = _plane()
        await plane.refresh()
        generation, version = plane.generation, plane.resources(DEFAULT_FLAGS).versions
        await plane.refresh()  # rebuilt from the same state: equal, not identical, dicts
        assert plane.generation == generation
        state["models"] = {"m": cat.set_split(two_versions(), {"1": 50, "2": 50})}
        await plane.refresh()
        assert plane.generation == generation + 1
        changed = plane.resources(DEFAULT_FLAGS).versions
        assert changed[ROUTE_TYPE] != version[ROUTE_TYPE]
        assert changed[CLUSTER_TYPE] == version[CLUSTER_TYPE]

    asyncio.run(scenario())


def test_a_poll_rebuilds_only_the_flavours_of_connected_edges():
    async def scenario():
        built: list[list[EdgeFlags]] = []
        plane, _state = _plane()
        clock = [100.0]
        plane._clock = lambda: clock[0]
        build_for = plane._build

        async def recording(flavours: Sequence[EdgeFlags]) -> Sequence[snapshot.Resources]:
            built.append(list(flavours))
            resources: Sequence[snapshot.Resources] = await build_for(flavours)
            return resources

        plane._build = recording
        await plane.refresh()
        assert built[-1] == [DEFAULT_FLAGS]  # nobody connected: what a first request gets
        stream = _Stream(plane, "edge")
        await stream.on_request(_request(CLUSTER_TYPE, node=True))  # without auth
        edge = EdgeFlags(auth=False)
        assert stream.flags == edge and built[-1] == [edge]  # built on arrival
        await plane.refresh()
        assert built[-1] == [edge]  # the default is no longer rebuilt for nobody
        assert plane.resources(edge).versions[ROUTE_TYPE]
        twin = _Stream(plane, "another edge")
        await twin.on_request(_request(CLUSTER_TYPE, node=True))
        assert built[-1] == [edge]  # already fresh: no build of its own
        plane.release(edge)
        await plane.refresh()
        assert built[-1] == [edge]  # one of its edges is still connected
        plane.release(edge)
        await plane.refresh()
        assert built[-1] == [DEFAULT_FLAGS]  # no longer rebuilt, but held a while:
        assert plane.resources(edge).versions[ROUTE_TYPE]  # a reconnect breaks after making
        clock[0] += CLUSTER_LINGER_S
        await plane.refresh()
        with pytest.raises(KeyError):
            plane.resources(edge)  # dropped after the hold, not kept stale

    asyncio.run(scenario())


def test_repacking_reuses_what_did_not_change_and_versions_stay_content_hashes():
    workers = [worker("w1", 1001, ("m", "1")), worker("w2", 1002, ("m", "1"))]
    models = {"m": two_versions()}
    first = pack(build(models, workers))
    heavier = [replace(workers[0], weight=replace(workers[0].weight, weight=40)), workers[1]]
    again = build(models, heavier)
    incremental, full = pack(again, first), pack(again)
    assert incremental.versions == full.versions
    assert incremental.versions[ENDPOINT_TYPE] != first.versions[ENDPOINT_TYPE]
    assert incremental.versions[CLUSTER_TYPE] == first.versions[CLUSTER_TYPE]
    # Unchanged resources are the very messages packed before; the changed one is new.
    assert (
        incremental.by_type[CLUSTER_TYPE]["model:m:1"] is first.by_type[CLUSTER_TYPE]["model:m:1"]
    )
    changed = incremental.by_type[ENDPOINT_TYPE]["model:m:1"]
    assert changed is not first.by_type[ENDPOINT_TYPE]["model:m:1"]
    assert changed == full.by_type[ENDPOINT_TYPE]["model:m:1"]


def test_a_slow_build_cannot_install_older_state_over_a_newer_one():
    # The poll, catalogue RPCs and rollouts all refresh: a build that read the state
    # first and finished last installed the older state (a rollback undone) until
    # the next poll. Refreshes now build one at a time.
    async def scenario():
        state = {"models": {"m": two_versions()}}
        slow = asyncio.Event()

        async def build_for(flavours):
            models = state["models"]  # what this build read
            if models["m"] is first:
                await slow.wait()  # the first build stalls after reading
            return [build(models, [worker("w", 1, ("m", "1"))], flags) for flags in flavours]

        first = state["models"]["m"]
        plane = ControlPlane(build_for, poll_s=1)
        older = asyncio.create_task(plane.refresh())
        await asyncio.sleep(0)  # it has read the state
        state["models"] = {"m": cat.set_split(two_versions(), {"1": 50, "2": 50})}
        newer = asyncio.create_task(plane.refresh())
        await asyncio.sleep(0)
        slow.set()
        await asyncio.gather(older, newer)
        routes = plane.resources(EdgeFlags()).source.by_type[ROUTE_TYPE]
        return json.dumps(routes)

    installed = asyncio.run(scenario())
    assert '"weight": 50' in installed  # the newer state stays


def test_records_written_by_a_newer_replica_still_read():
    # Mid-upgrade, an older router raised on a field it did not know (TypeError) at
    # every read of the record: every build, renewal or rollout tick stopped.
    from services.router.catalog import VersionEntry
    from services.router.registry import WorkerEntry

    entry = json.loads(worker("w", 1, ("m", "1")).to_json())
    entry["load"] = {**(entry.get("load") or {}), "added_later": 1}
    entry["weight"] = {**(entry.get("weight") or {}), "added_later": 1}
    assert WorkerEntry.from_json("w", json.dumps(entry)).worker_id == "w"
    assert VersionEntry.from_json({"version": "1", "added_later": True}).version == "1"


def test_every_router_replica_reads_redis_clock():
    # Lease ends and rollout step starts are written by one replica and read by
    # another: on their own clocks, a replica 2 s off made workers flap out of its
    # edges' endpoints (3 s leases, 1 s heartbeats).
    class RedisAhead:
        async def time(self) -> tuple[int, int]:
            at = time.time() + 120
            return int(at), int(at % 1 * 1e6)

    before = cat.now()
    try:
        asyncio.run(cat.sync_clock(RedisAhead()))
        assert 119 < cat.now() - time.time() < 121
    finally:
        cat._redis_clock_offset_s = 0.0
    assert abs(cat.now() - before) < 5


def test_a_dropped_cluster_outlives_the_routes_that_named_it():
    # Make before break: Envoy applies a stream's clusters before its routes, so a
    # cluster removed with its routes left them naming a missing cluster (503s).
    async def scenario() -> list[tuple[bool, bool]]:
        state = {"models": {"m": two_versions()}}
        clock = {"now": 100.0}

        async def build_for(flavours: Sequence[EdgeFlags]):
            workers = [worker("w", 1, ("m", "1"), ("m", "2"))]
            return [build(state["models"], workers, flags) for flags in flavours]

        plane = ControlPlane(build_for, poll_s=1, clock=lambda: clock["now"])
        seen = []
        for models, now in (
            ({"m": two_versions()}, 100.0),
            ({"m": cat.add_version(None, "m", "1", 0)}, 101.0),  # version 2 removed
            ({"m": cat.add_version(None, "m", "1", 0)}, 105.9),
            ({"m": cat.add_version(None, "m", "1", 0)}, 106.0),
        ):
            state["models"], clock["now"] = models, now
            await plane.refresh()
            source = plane.resources(EdgeFlags()).source.by_type
            routes = json.dumps(source[ROUTE_TYPE])
            seen.append(("model:m:2" in source[CLUSTER_TYPE], "model:m:2" in routes))
        return seen

    assert asyncio.run(scenario()) == [(True, True), (True, False), (True, False), (False, False)]


def test_a_sunset_in_the_past_is_refused():
    # It ended the version's routes at once: a mistyped date took all its traffic.
    with pytest.raises(InvalidArgument, match="sunset_time"):
        cat.deprecate(two_versions(), "1", sunset_at=NOW - 1, now=NOW)
    assert cat.deprecate(two_versions(), "1", sunset_at=NOW + 60, now=NOW).versions[0].sunset_at


def test_the_router_clock_reads_redis_at_the_round_trips_midpoint():
    # A Redis that answers 0.2 s late, its clock equal to ours, read 0.1 s in: read
    # against the send time, now() would run 0.1 s ahead until the next build.
    class SlowRedis:
        async def time(self) -> tuple[int, int]:
            await asyncio.sleep(0.2)
            at = time.time() - 0.1  # the clock Redis read halfway through the wait
            return int(at), int(at % 1 * 1e6)

    try:
        asyncio.run(cat.sync_clock(SlowRedis()))
        assert abs(cat._redis_clock_offset_s) < 0.05
    finally:
        cat._redis_clock_offset_s = 0.0


def test_an_edge_reconnecting_within_a_linger_keeps_the_cluster_and_it_does_not_flap():
    # The only edge of its flavour reconnected: `ensure` installed its build without
    # make-before-break (the dropped cluster gone at once), and the next poll put the
    # cluster back from the lingering set until the linger ended: gone, back, gone.
    async def scenario() -> list[bool]:
        state = {"models": {"m": two_versions()}}
        clock = {"now": 100.0}
        edge = EdgeFlags(auth=False)  # not the flavour a poll keeps while nobody is connected

        async def build_for(flavours: Sequence[EdgeFlags]):
            workers = [worker("w", 1, ("m", "1"), ("m", "2"))]
            return [build(state["models"], workers, flags) for flags in flavours]

        plane = ControlPlane(build_for, poll_s=1, clock=lambda: clock["now"])
        await plane.ensure(edge)
        seen = []

        def has_version_2() -> None:
            seen.append("model:m:2" in plane.resources(edge).source.by_type[CLUSTER_TYPE])

        state["models"], clock["now"] = {"m": cat.add_version(None, "m", "1", 0)}, 101.0
        await plane.refresh()
        has_version_2()
        plane.release(edge)
        clock["now"] = 101.5
        await plane.refresh()  # a poll while its edge is away: the flavour is held
        await plane.ensure(edge)  # its edge reconnects
        has_version_2()
        for now in (102.0, 106.0, 107.0):
            clock["now"] = now
            await plane.refresh()
            has_version_2()
        return seen

    assert asyncio.run(scenario()) == [True, True, True, False, False]
