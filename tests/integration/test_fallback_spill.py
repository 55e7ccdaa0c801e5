"""A model with a fallback keeps its traffic while any of its workers is healthy.

A model's `fallback:` cluster is Envoy's aggregate of the model version's cluster and
its fallback model's (services/router/snapshot.py). Envoy's aggregate cluster treats
them as priority levels and spills to the next in proportion to how unhealthy the
first is, by the levels' overprovisioning factor: at Envoy's default, 1 of 2 workers
down sent ~30% of the model's requests to the fallback model. A real Envoy, static
clusters with the router's load assignments and LB settings, HTTP upstreams that
answer their names.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gateway.envoy_config import Endpoint, load_assignment
from services.launcher.processes import reserve_port
from services.router import snapshot
from tests.envoy_process import running_envoy


@contextlib.contextmanager
def _upstream(name: str) -> Iterator[int]:
    """An HTTP server answering its name; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = name.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _cluster(name: str, ports: list[int]) -> dict[str, Any]:
    """A static cluster with the router's load assignment and a model version's LB
    settings (no panic mode, Maglev), actively health-checked."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "MAGLEV",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "health_checks": [
            {
                "timeout": "0.2s",
                "interval": "0.2s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/health"},
            }
        ],
        "load_assignment": load_assignment(name, [Endpoint("127.0.0.1", p) for p in ports]),
    }


def _bootstrap(listen: int, admin: int, clusters: list[dict[str, Any]]) -> dict[str, Any]:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "fallback",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "fallback:m:1"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    address = {"socket_address": {"address": "127.0.0.1", "port_value": listen}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": address,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def _healthy(admin: int, cluster: str) -> int:
    listing = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=2).text
    return sum(
        line.startswith(f"{cluster}::") and line.endswith("::health_flags::healthy")
        for line in listing.splitlines()
    )


def test_a_model_with_one_healthy_worker_of_two_sends_nothing_to_its_fallback(
    tmp_path: Path,
) -> None:
    listen, admin, dead = reserve_port(), reserve_port(), reserve_port()
    with _upstream("model") as alive, _upstream("fallback") as fallback:
        clusters = [
            _cluster("model:m:1", [alive, dead]),  # one of its two workers is down
            _cluster("model:fb:1", [fallback]),
            snapshot.aggregate_cluster("fallback:m:1", ["model:m:1", "model:fb:1"]),
        ]
        with running_envoy(_bootstrap(listen, admin, clusters), admin, tmp_path):
            deadline = time.monotonic() + 15
            while (_healthy(admin, "model:m:1"), _healthy(admin, "model:fb:1")) != (1, 1):
                assert time.monotonic() < deadline, "health checks did not settle"
                time.sleep(0.1)
            with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=5) as client:
                answered = collections.Counter(client.get("/").text for _ in range(200))
    assert answered == {"model": 200}, answered
