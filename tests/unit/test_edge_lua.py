"""The edge's per-request Lua work runs in one coroutine each way (gateway/edge_lua.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway import edge_auth, edge_lua, envoy_config, key_cache
from gateway.edge_auth import EdgeAuth
from gateway.envoy_config import EdgeConfig, Endpoint
from gateway.model_routing import MODEL_HEADER
from services.core import contract

LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"


def _config(tmp_path: Path, **options: Any) -> EdgeConfig:
    """An edge in front of one inference upstream, with `options`."""
    return EdgeConfig(
        listen_port=18080,
        admin_socket=Path("/tmp/envoy-admin.sock"),
        descriptor_path=tmp_path / "d.pb",
        upstreams={"inference": [Endpoint("127.0.0.1", 10000)]},
        **options,
    )


def _lua_filters(config: EdgeConfig) -> list[str]:
    hcm = envoy_config.http_connection_manager(config)
    return [f["name"] for f in hcm["http_filters"] if f["typed_config"]["@type"] == LUA]


def test_the_full_edge_runs_four_lua_filters_two_of_them_for_every_request(
    tmp_path: Path,
) -> None:
    # Each Lua filter costs Envoy a coroutine per request (and per response):
    # header names, edge health, OpenAI errors and REST statuses share two.
    config = _config(tmp_path, auth=EdgeAuth(), xds=Endpoint("127.0.0.1", 18000))
    assert _lua_filters(config) == [
        edge_lua.REQUEST_FILTER,
        edge_lua.RESPONSE_FILTER,
        key_cache.FILTER_NAME,
        "envoy.filters.http.lua",  # model routing (reads inference bodies)
    ]


def test_the_merged_response_filter_makes_the_openai_body_before_the_rest_status() -> None:
    # The order the two filters ran in before they were merged (Envoy runs
    # response filters last to first): a status change sees the JSON body.
    source = edge_lua.response_source()
    handler = source[source.index("function envoy_on_response") :]
    assert handler.index("openai_error_body(") < handler.index("apply_error_status(")


def test_every_edge_strips_client_copies_of_its_routing_shadow_and_identity_headers(
    tmp_path: Path,
) -> None:
    # A static edge (no control plane, no auth) too: a worker reads a client's
    # x-tokenmesh-shadow as a mirrored copy, which is not metered, and trusts the
    # edge's identity headers (an edge without auth passed a client's
    # x-tokenmesh-scopes: admin, or another key's id to bill).
    config = _config(tmp_path, auth=None)
    filters = envoy_config.http_connection_manager(config)["http_filters"]
    removed = {
        m["remove"]
        for f in filters
        if f["name"] == "envoy.filters.http.header_mutation"
        for m in f["typed_config"]["mutations"].get("request_mutations", [])
    }
    assert {contract.SHADOW_HEADER, contract.SHADOWED_HEADER, MODEL_HEADER} <= removed
    assert set(contract.IDENTITY_HEADERS) <= removed
    assert contract.ATTEMPT_COUNT_HEADER in removed  # Envoy sets it on each try


def test_a_jwts_key_check_runs_before_the_api_key_check_open_on_its_own_cluster(
    tmp_path: Path,
) -> None:
    # The JWT key check (open: a JWT rides out an auth outage) and the API-key check
    # (closed) never run on one request: the key cache marks which one asks. Both
    # call the auth service through a cluster clients' own auth requests cannot fill.
    config = replace(
        _config(tmp_path, auth=EdgeAuth()),
        upstreams={
            "inference": [Endpoint("127.0.0.1", 10000)],
            "auth": [Endpoint("127.0.0.1", 10001)],
        },
    )
    filters = envoy_config.http_connection_manager(config)["http_filters"]
    names = [f["name"] for f in filters]
    at = names.index
    assert at(edge_auth.JWT_FILTER) < at(key_cache.FILTER_NAME) < at(key_cache.JWT_KEY_CHECK_FILTER)
    assert (
        at(key_cache.JWT_KEY_CHECK_FILTER)
        < at(edge_auth.EXT_AUTHZ_FILTER)
        < at("envoy.filters.http.rbac")
    )
    jwt_check = filters[at(key_cache.JWT_KEY_CHECK_FILTER)]["typed_config"]
    api_keys = filters[at(edge_auth.EXT_AUTHZ_FILTER)]["typed_config"]
    assert jwt_check["failure_mode_allow"] and not api_keys["failure_mode_allow"]
    assert jwt_check["metadata_context_namespaces"] == [edge_auth.JWT_FILTER]
    assert "metadata_context_namespaces" not in api_keys
    assert jwt_check["allowed_headers"] == {"patterns": [{"exact": contract.KEY_ID_HEADER}]}
    for check in (jwt_check, api_keys):
        assert check["grpc_service"]["envoy_grpc"]["cluster_name"] == edge_auth.AUTH_CHECKS_CLUSTER
    clusters = {c["name"] for c in envoy_config.bootstrap(config)["static_resources"]["clusters"]}
    assert {"auth", edge_auth.AUTH_CHECKS_CLUSTER} <= clusters


def test_the_edge_reconnects_to_a_router_back_from_an_outage_within_a_second_or_so(
    tmp_path: Path,
) -> None:
    # Envoy's default ADS backoff grows to 30 s: measured, the edge resubscribed 7.6
    # and 10.5 s after the router was back from a 10 s outage (3.1 and 3.7 s now).
    config = _config(tmp_path, xds=Endpoint("127.0.0.1", 18000))
    (ads,) = envoy_config.bootstrap(config)["dynamic_resources"]["ads_config"]["grpc_services"]
    back_off = ads["retry_policy"]["retry_back_off"]
    assert back_off == {"base_interval": "0.1s", "max_interval": "1s"}
