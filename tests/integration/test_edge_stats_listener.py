"""The edge's statistics port: Prometheus text from the admin, and nothing else of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import envoy_config, protos
from gateway.envoy_config import EdgeConfig, Endpoint
from services.launcher.processes import reserve_port
from tests.envoy_process import ready, running_envoy


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    admin, stats = tmp_path / "admin.sock", reserve_port()
    config = EdgeConfig(
        listen_port=reserve_port(),
        admin_socket=admin,
        descriptor_path=protos.build_descriptor_set(tmp_path / "d.pb"),
        upstreams={
            name: [Endpoint("127.0.0.1", reserve_port())] for name in envoy_config.HEALTH_SERVICE
        },
        auth=None,
        stats=Endpoint("127.0.0.1", stats),
    )
    with running_envoy(envoy_config.bootstrap(config), admin, tmp_path):
        yield admin, stats


def test_the_stats_port_serves_prometheus_text_and_nothing_else(edge):
    _, stats = edge
    base = f"http://127.0.0.1:{stats}"
    reply = httpx.get(f"{base}/stats/prometheus", timeout=5)
    assert reply.status_code == 200
    assert "# TYPE envoy_server_live gauge" in reply.text
    # The admin's other pages and its mutations are not reachable from here.
    for method, path in [
        ("GET", "/stats"),
        ("GET", "/config_dump"),
        ("POST", "/quitquitquit"),
        ("POST", "/stats/prometheus"),
        ("POST", "/logging?level=debug"),
    ]:
        assert httpx.request(method, f"{base}{path}", timeout=5).status_code == 404, path
    assert ready(edge[0]), "the edge is still up"
