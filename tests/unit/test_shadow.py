"""Shadow traffic's pure parts: the catalogue rule, the edge's mirror routes, the worker's
marks, and the comparison of pairs."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway import model_routing
from services.core import contract
from services.core.errors import FailedPrecondition, InvalidArgument
from services.inference import request_limits, shadow
from services.router import catalog as cat
from services.router import snapshot
from services.router.catalog import ModelEntry
from services.router.shadow_pairs import LIVE, SHADOW, Pair, Record, compare, percentile

NOW = 1_800_000_000.0


def shadowed(percent: int = 10) -> ModelEntry:
    model = cat.add_version(cat.add_version(None, "m", "1", 0), "m", "2", 0)
    return cat.set_shadow(model, "2", percent, NOW)


def test_a_shadow_needs_a_serving_version_that_does_not_take_all_traffic():
    model = shadowed()
    assert model.shadow(NOW) == ("2", 10)
    with pytest.raises(InvalidArgument, match="not registered"):
        cat.set_shadow(model, "7", 10, NOW)
    with pytest.raises(InvalidArgument, match="between 0 and 100"):
        cat.set_shadow(model, "2", 101, NOW)
    with pytest.raises(InvalidArgument, match="already serves all"):
        cat.set_shadow(model, "1", 10, NOW)
    sunset = cat.deprecate(model, "2", sunset_at=NOW - 1, now=NOW - 10)
    assert sunset.shadow(NOW) is None  # a sunset version shadows nothing
    assert cat.set_shadow(model, "2", 0, NOW).shadow(NOW) is None
    assert cat.set_shadow(model, "", 10, NOW).shadow(NOW) is None


def test_the_shadow_survives_the_catalogue_document_and_old_documents_have_none():
    model = shadowed(25)
    assert ModelEntry.from_json("m", model.to_json()) == model
    plain = cat.set_shadow(model, "", 0, NOW)
    assert "shadow" not in plain.to_json()
    assert ModelEntry.from_json("m", plain.to_json()).shadow(NOW) is None


def _routes(model: ModelEntry) -> dict[str | None, dict[str, Any]]:
    """The model's routes by the version label they match (None: the split)."""
    found = {}
    for route in snapshot.model_routes(model, {"m": model}, NOW):
        headers = {h["name"]: h for h in route["match"]["headers"]}
        version = headers.get(model_routing.VERSION_HEADER, {}).get("string_match", {})
        if "route" in route and "weighted_clusters" in route["route"]:
            found[version.get("exact")] = route
    return found


def test_live_routes_mirror_their_share_to_the_shadow_versions_cluster():
    routes = _routes(shadowed(10))
    split, explicit_1, explicit_2 = routes[None], routes["1"], routes["2"]
    for route in (split, explicit_1):
        (policy,) = route["route"]["request_mirror_policies"]
        assert policy["cluster"] == snapshot.model_cluster("m", "2")
        assert policy["runtime_fraction"]["default_value"] == {
            "numerator": 10,
            "denominator": "HUNDRED",
        }
        mutations = policy["request_headers_mutations"]
        assert {"append": _set(contract.SHADOW_HEADER, "2")} in mutations
        assert {"remove": contract.SHADOWED_HEADER} in mutations
        assert {"remove": model_routing.FALLBACK_MODEL_HEADER} in mutations
        assert _set(contract.SHADOWED_HEADER, "2") in route["request_headers_to_add"]
    # Requests the shadow version serves itself are not copied to it.
    assert "request_mirror_policies" not in explicit_2["route"]
    assert "request_headers_to_add" not in explicit_2


def test_no_mirror_without_a_shadow_or_when_the_split_serves_only_the_shadow():
    stopped = cat.set_shadow(shadowed(), "", 0, NOW)
    assert all("request_mirror_policies" not in r["route"] for r in _routes(stopped).values())
    all_on_2 = cat.set_split(shadowed(), {"2": 100})
    assert "request_mirror_policies" not in _routes(all_on_2)[None]["route"]


def test_shadow_headers_are_edge_only():
    assert contract.SHADOW_HEADER in model_routing.EDGE_ONLY_HEADERS
    assert contract.SHADOWED_HEADER in model_routing.EDGE_ONLY_HEADERS
    assert contract.SHADOW_HEADER.startswith(contract.EDGE_HEADER_PREFIX)


def _set(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def test_a_copy_serves_the_shadow_version_and_pairs_by_the_edges_request_id():
    headers = {
        model_routing.ROUTE_VERSION_HEADER: "1",
        contract.SHADOW_HEADER: "2",
        "x-request-id": "edge-id-1",
    }
    assert shadow.routed_version(headers) == "2"
    copy = shadow.mark(headers, "body-id")
    assert copy == shadow.ShadowMark(SHADOW, "2", "edge-id-1") and copy.is_copy
    live = {model_routing.ROUTE_VERSION_HEADER: "1", contract.SHADOWED_HEADER: "2"}
    assert shadow.routed_version(live) == "1"
    assert shadow.mark(live, "body-id") == shadow.ShadowMark(LIVE, "2", "body-id")
    assert shadow.mark({model_routing.ROUTE_VERSION_HEADER: "1"}, "x") is None
    with pytest.raises(FailedPrecondition, match="served this request itself"):
        shadow.routed_version(
            {model_routing.ROUTE_VERSION_HEADER: "2", contract.SHADOW_HEADER: "2"}
        )


def test_a_copy_is_not_counted_against_the_callers_request_limits():
    identity = {contract.KEY_ID_HEADER: "key_1", contract.RPM_HEADER: "10"}
    assert request_limits.descriptor(identity) is not None
    assert request_limits.descriptor({**identity, contract.SHADOW_HEADER: "2"}) is None


def record(version: str, reason: str = "stop", text: str = "t", **fields: object) -> Record:
    values: dict[str, Any] = {
        "ttft_ms": 10.0,
        "total_ms": 50.0,
        "output_tokens": 4,
        "reproducible": True,
    }
    values.update(fields)
    return Record(version=version, finish_reason=reason, text_hash=text, **values)


def test_compare_summarises_each_side_and_counts_agreeing_reproducible_pairs():
    pairs = [
        Pair("a", record("1", ttft_ms=10.0), record("2", ttft_ms=30.0)),
        Pair("b", record("1"), record("2", text="other")),
        Pair("c", record("1"), record("2", reason="error", text="")),
        Pair("d", record("1", reproducible=False), record("2", reproducible=False, text="x")),
        Pair("e", record("3"), record("2")),  # another pair of versions: left out
    ]
    result = compare(pairs, "1", "2")
    assert result.pairs == 4
    assert (result.reproducible_pairs, result.agreeing_pairs) == (2, 1)
    assert result.agreement_rate == 0.5
    assert result.baseline.requests == result.candidate.requests == 4
    assert result.baseline.error_rate == 0 and result.candidate.error_rate == 0.25
    assert result.candidate.finish_reasons == {"stop": 3, "error": 1}
    assert result.candidate.ttft.p99_ms == 30.0 and result.baseline.ttft.p99_ms == 10.0
    # Swapped, the versions' roles do not match these pairs': only counted.
    swapped = compare(pairs, "2", "1")
    assert (swapped.pairs, swapped.reversed_pairs, swapped.baseline.requests) == (0, 4, 0)


def test_a_window_spanning_a_promotion_compares_one_role_per_side():
    # v2 shadowed v1, then (promoted) v1 shadowed v2: taken either way round, each
    # column mixed one version's live requests with its batch-priority copies, under
    # a header naming one role each.
    before = [Pair(f"a{n}", record("1", ttft_ms=10.0), record("2", ttft_ms=90.0)) for n in range(3)]
    after = [Pair(f"b{n}", record("2", ttft_ms=12.0), record("1", ttft_ms=80.0)) for n in range(2)]
    result = compare(before + after, "1", "2")
    assert (result.pairs, result.reversed_pairs) == (3, 2)
    assert result.baseline.ttft.p99_ms == 10.0 and result.candidate.ttft.p99_ms == 90.0


def test_latencies_leave_out_the_wait_for_a_slot():
    # A copy waits at batch priority behind its version's live requests: that is the
    # scheduler's policy, not the model's speed, and read as the model's, a candidate
    # as fast as the baseline looked 9x slower to start.
    live = record("1", ttft_ms=10.0, total_ms=50.0, queue_ms=2.0)
    copy = record("2", ttft_ms=90.0, total_ms=130.0, queue_ms=82.0)
    result = compare([Pair("a", live, copy)], "1", "2")
    assert (result.baseline.ttft.p50_ms, result.candidate.ttft.p50_ms) == (8.0, 8.0)
    assert (result.baseline.total.p50_ms, result.candidate.total.p50_ms) == (48.0, 48.0)
    assert (result.baseline.queue.p50_ms, result.candidate.queue.p50_ms) == (2.0, 82.0)


def test_percentile_is_nearest_rank():
    assert percentile([], 50) == 0.0
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0


def _first_match(
    routes: list[dict[str, Any]], path: str, headers: dict[str, str]
) -> dict[str, Any]:
    """The route Envoy takes for a request (path, exact and presence header matches)."""
    for route in routes:
        match = route["match"]
        if "path" in match and match["path"] != path:
            continue
        if not path.startswith(match.get("prefix", "")):
            continue
        if all(
            h["name"] in headers
            and h.get("string_match", {}).get("exact", headers[h["name"]]) == headers[h["name"]]
            for h in match.get("headers", [])
        ):
            return route
    raise AssertionError(f"no route takes {path} {headers}")


@pytest.mark.parametrize("version", [None, "1"], ids=["split", "version 1"])
def test_model_lookups_are_not_mirrored_only_inference_requests(version: str | None) -> None:
    routes = snapshot.model_routes(shadowed(100), {"m": shadowed(100)}, NOW)
    headers = {model_routing.MODEL_HEADER: "m"}
    if version is not None:
        headers[model_routing.VERSION_HEADER] = version
    generate = _first_match(routes, "/tokenmesh.inference.v2.InferenceService/Generate", headers)
    assert generate["route"]["request_mirror_policies"]
    for path in model_routing.MODEL_LOOKUP_PATHS:
        lookup = _first_match(routes, path, headers)
        # The same targets as the inference request, without the copy or its mark.
        assert "request_mirror_policies" not in lookup["route"]
        assert "request_headers_to_add" not in lookup
        assert lookup["route"]["weighted_clusters"] == generate["route"]["weighted_clusters"]


def test_the_lua_filter_routes_the_lookups_the_routes_know() -> None:
    # model_routing.lua's MODEL_LOOKUPS and MODEL_LOOKUP_PATHS must agree: a lookup
    # path only the filter knew would be mirrored again.
    source = model_routing.LUA_SOURCE.read_text()
    table = source.split("local MODEL_LOOKUPS = {", 1)[1].split("}", 1)[0]
    assert tuple(re.findall(r'\["([^"]+)"\]', table)) == model_routing.MODEL_LOOKUP_PATHS
