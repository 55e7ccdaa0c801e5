"""The peer benchmark's pieces: the bare OpenAI backend's Envoy config, LiteLLM's offline
settings, and the per-edge prefix-affinity switch the routing rows compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import peer
from gateway import envoy_config, openai_backend
from gateway.envoy_config import EdgeConfig, Endpoint
from services.core import contract, pki
from services.router import catalog as cat
from services.router import snapshot
from services.router.registry import WorkerEntry
from services.router.snapshot import CLUSTER_TYPE, ROUTE_TYPE, EdgeFlags


def _filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def test_the_bare_backend_transcodes_only_the_openai_surface_with_no_auth_or_limits():
    bootstrap = openai_backend.bootstrap(
        Endpoint("127.0.0.1", 9000),
        Path("/a.sock"),
        Path("/d.pb"),
        [Endpoint("127.0.0.1", 9100)],
        None,
    )
    names = [f["name"] for f in _filters(bootstrap)]
    assert names == [
        "tokenmesh.openai_errors",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    transcoder = _filters(bootstrap)[1]["typed_config"]
    assert transcoder["services"] == ["tokenmesh.openai.v1.OpenAIService"]
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"] for r in routes] == [{"prefix": "/tokenmesh.openai.v1.OpenAIService/"}]
    assert routes[0]["route"]["timeout"] == "0s"  # token streams: idle timeout only
    assert "rate_limits" not in hcm["typed_config"]["route_config"]["virtual_hosts"][0]


def test_the_bare_backend_reaches_workers_over_mtls_as_the_edge_does(tmp_path):
    bootstrap = openai_backend.bootstrap(
        Endpoint("127.0.0.1", 9000),
        Path("/a.sock"),
        Path("/d.pb"),
        [Endpoint("127.0.0.1", 9100)],
        tmp_path,
    )
    (cluster,) = bootstrap["static_resources"]["clusters"]
    edge_cluster = envoy_config.cluster("inference", [Endpoint("127.0.0.1", 9100)], 1.0, tmp_path)
    assert cluster == edge_cluster
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    matcher = tls["combined_validation_context"]["default_validation_context"]
    assert matcher["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": pki.spiffe_id(contract.WORKER)
    }


def test_litellm_runs_with_its_master_key_no_database_no_callbacks_and_offline():
    config = peer.litellm_config("http://127.0.0.1:1/openai/v1", "sk-bench-x")
    assert config["general_settings"] == {"master_key": "sk-bench-x", "disable_spend_logs": True}
    assert "database_url" not in str(config)
    settings = config["litellm_settings"]
    assert settings["callbacks"] == settings["success_callback"] == []
    assert settings["telemetry"] is False
    (model,) = config["model_list"]
    assert model["litellm_params"]["model"] == f"openai/{peer.MODEL}"
    assert peer.LITELLM_ENV["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_every_target_gets_the_same_request_bytes():
    assert peer.UNARY_BODY.count(b'"max_tokens": 8') == 1
    assert b'"stream": true' in peer.STREAM_BODY


def test_an_edge_without_prefix_affinity_gets_round_robin_from_the_same_control_plane():
    config = EdgeConfig(9000, Path("/a.sock"), Path("/d.pb"), {}, prefix_affinity=False)
    metadata = envoy_config.bootstrap(config)["node"]["metadata"]
    flags = EdgeFlags.from_metadata(metadata)
    assert flags.prefix_affinity is False
    assert EdgeFlags.from_metadata({}).prefix_affinity is True  # older edges: the default
    model = cat.add_version(None, "m", "1", 0)
    workers = [WorkerEntry("w1", "127.0.0.1", 1001, (("m", "1"),), lease_expires_at=1.8e9 + 60)]
    options = snapshot.ClusterOptions()
    for edge_flags, policy in ((EdgeFlags(), "MAGLEV"), (flags, "ROUND_ROBIN")):
        built = snapshot.build({"m": model}, workers, 1.8e9, edge_flags, options)
        assert built.by_type[CLUSTER_TYPE]["model:m:1"]["lb_policy"] == policy
        routes = built.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
        assert any("hash_policy" in r.get("route", {}) for r in routes) == (policy == "MAGLEV")
