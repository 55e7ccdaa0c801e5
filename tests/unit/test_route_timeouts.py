"""Routes to workers let a non-streamed answer take as long as a client waits for one."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from gateway import envoy_config, openai_backend
from services.jobs import handover
from services.router import catalog as cat
from services.router import snapshot
from tokenmesh.client import Client, V1Client

NOW = 1_800_000_000.0
# The OpenAI SDK's default timeout: a client waits this long for a non-streamed answer.
OPENAI_SDK_TIMEOUT_S = 600


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def _to_workers(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The route actions that reach workers' inference RPCs (one cluster, or a model's
    versions). Not the health check's exact route (a total timeout), nor the REST
    paths' regex ones the transcoder leaves before they route (gateway/handover.py)."""
    actions = [r["route"] for r in routes if "route" in r and "prefix" in r["match"]]
    return [a for a in actions if a.get("cluster") == "inference" or "weighted_clusters" in a]


def test_no_route_to_workers_cuts_a_silent_non_streamed_answer_before_clients_give_up():
    # A unary Complete (or an OpenAI request without `stream`) sends nothing until its
    # generation is done: the route's idle timeout was 60 s, a 504 for anything longer.
    model = cat.add_version(cat.add_version(None, "m", "1", 0), "m", "2", 0)
    model = cat.set_split(model, {"1": 90, "2": 10})
    table = snapshot.route_configuration({"m": model}, NOW, snapshot.EdgeFlags())
    actions = _to_workers(table["virtual_hosts"][0]["routes"])
    assert any("weighted_clusters" in a for a in actions)  # the model's own routes
    assert any(a.get("cluster") == "inference" for a in actions)  # the per-service one
    backend = openai_backend.route_configuration()["virtual_hosts"][0]["routes"]
    for action in [*actions, *(r["route"] for r in backend)]:
        assert action["timeout"] == "0s"  # no total bound: a long generation is fine
        assert _seconds(action["idle_timeout"]) >= OPENAI_SDK_TIMEOUT_S, action


def test_the_jobs_routes_outlast_the_longest_wait_the_jobs_service_answers_after():
    # `Prefer: wait=60` is silent for up to 60 s before its answer: an idle timeout
    # of 60 s raced it.
    jobs = [r["route"] for r in envoy_config.routes() if r["route"]["cluster"] == "jobs"]
    assert jobs
    for action in jobs:
        assert _seconds(action["idle_timeout"]) > handover.MAX_WAIT_S
        assert _seconds(action["idle_timeout"]) < OPENAI_SDK_TIMEOUT_S  # a stream's, not a call's


def test_the_sdk_waits_as_long_as_the_edge_lets_an_answer_be_silent():
    # Its per-call deadline was 60 s: a stream or a non-streamed answer longer than
    # that ended with DEADLINE_EXCEEDED however long the edge allowed.
    for client in (Client, V1Client):
        default = inspect.signature(client.__init__).parameters["timeout_s"].default
        assert default >= _seconds(envoy_config.INFERENCE_IDLE_TIMEOUT) == OPENAI_SDK_TIMEOUT_S


def test_a_request_must_arrive_whole_well_before_an_answer_may_stay_silent(tmp_path):
    # Routes to workers allow 600 s of silence, for answers; a client trickling its
    # request body one byte a few minutes apart held a stream that long.
    config = envoy_config.EdgeConfig(
        listen_port=18080,
        admin_socket=Path("/tmp/envoy-admin.sock"),
        descriptor_path=tmp_path / "d.pb",
        upstreams={"inference": [envoy_config.Endpoint("127.0.0.1", 10000)]},
    )
    hcm = envoy_config.http_connection_manager(config)
    assert _seconds(hcm["request_timeout"]) < _seconds(envoy_config.INFERENCE_IDLE_TIMEOUT)
    assert _seconds(hcm["request_headers_timeout"]) <= 10
