"""A listener that serves only Envoy's Prometheus statistics, for scraping in a pod.

Envoy's admin interface is a Unix socket (gateway/admin.py: it can also
drain, quit and change log levels). When TOKENMESH_EDGE_STATS_PORT is set,
this listener answers GET /stats/prometheus from the admin, through a
cluster on that socket, and 404 to anything else, so Prometheus can scrape the edge's statistics
(the edge dashboard, the edge and health alerts: docs/observability.md).
"""

from __future__ import annotations

from typing import Any

STATS_PATH = "/stats/prometheus"
ADMIN_CLUSTER = "edge_admin"
STAT_PREFIX = "edge_stats"
_MANAGER_FILTER = "envoy.filters.network.http_connection_manager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def stats_listener(host: str, port: int) -> dict[str, Any]:
    """Builds the listener on host:port that proxies GET /stats/prometheus to the admin."""
    routes = [
        {
            "match": {
                "path": STATS_PATH,
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "10s"},
        },
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    manager = {
        "@type": _HCM,
        "stat_prefix": STAT_PREFIX,
        "codec_type": "HTTP1",
        "route_config": {
            "name": STAT_PREFIX,
            "virtual_hosts": [{"name": STAT_PREFIX, "domains": ["*"], "routes": routes}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": STAT_PREFIX,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [{"name": _MANAGER_FILTER, "typed_config": manager}]}],
    }
