"""Dashboards, alert rules and autoscalers query names that a running mesh exports.

The unit test (tests/unit/test_observability.py) checks the services' names
against their code; Envoy's stats exist only in a running Envoy: here every
envoy_* name must be in the edge's /stats/prometheus, and every tokenmesh_*
name in some service's /metrics (HELP/TYPE lines name a labelled metric
before it has a sample).
"""

from __future__ import annotations

import re

import httpx

from tests import observability as obs

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "untyped": ("",),
}


def _exported(text: str) -> set[str]:
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        names.add(family)
        names.update(family + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    names.update(re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", text, flags=re.MULTILINE))
    return names


def test_every_queried_name_is_exported_by_the_running_mesh(mesh):
    headers = {"x-api-key": mesh.dev_api_key()}
    # Traffic first: Envoy creates some stats on first use (status classes, timings).
    ok = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete",
        json={"prompt": "names", "max_tokens": 2},
        headers=headers,
        timeout=10,
    )
    assert ok.status_code == 200
    denied = httpx.post(
        f"{mesh.edge_url}/v1/models/deterministic-test:complete", json={}, timeout=10
    )
    assert denied.status_code == 401
    envoy = mesh.admin("/stats/prometheus")
    services = "\n".join(
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for name, port in mesh.ports.items()
        if name.endswith("-metrics")
    )
    exported = _exported(envoy) | _exported(services)
    recorded = obs.recorded_names()
    missing = sorted(
        f"{query.where}: {name}"
        for query in obs.all_queries()
        for name in obs.metric_names(query.expr)
        if name not in exported
        and name not in recorded
        and name not in obs.PENDING_METRICS
        and name not in obs.PROMETHEUS_NAMES
    )
    assert not missing, "\n".join(missing)


def test_cluster_name_patterns_match_the_edges_clusters(mesh):
    # Envoy's stats spell a cluster "model:demo-lm:1" as "model_demo-lm_1".
    envoy = mesh.admin("/stats/prometheus")
    clusters = set(re.findall(r'envoy_cluster_name="([^"]+)"', envoy))
    assert "model_deterministic-test_1" in clusters, sorted(clusters)
    for query in obs.all_queries():
        for _, matchers in obs.selectors(query.expr):
            pattern = matchers.get("envoy_cluster_name", "").strip('"')
            if pattern:
                regex = pattern.encode().decode("unicode_escape")
                assert any(re.fullmatch(regex, c) for c in clusters), f"{query.where}: {pattern}"
