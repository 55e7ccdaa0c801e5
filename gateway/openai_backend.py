"""A bare OpenAI backend: Envoy with only the OpenAI transcoding routes, in front of workers.

No authentication, no rate limits, no budgets' identity, no model routing:
`POST /openai/v1/chat/completions` (and the surface's other paths) are
transcoded to `tokenmesh.openai.v1.OpenAIService` and sent round robin to the
workers over mTLS as the edge (the edge's certificate, each worker's SPIFFE
id checked), exactly as the full edge reaches them. What it costs is what
any OpenAI-compatible server in front of these workers would cost at the
least, so the peer benchmark (bench/peer.py) measures each gateway's added
latency against it, and LiteLLM uses it as its `openai/` backend.

Built from the edge's own pieces (gateway/envoy_config.py): the transcoder,
the OpenAI error filter and local replies, the worker cluster and its TLS.
Its local replies are the edge's for /openai/ paths, those Envoy sends before
it read the request's headers included (431, 400 over HTTP/1.1: one body in
both error shapes, `envoy_config.before_request_mappers`); without those a
client got Envoy's plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import admin, envoy_config, openai_edge, response_headers
from gateway.envoy_config import Endpoint

SERVICE = "tokenmesh.openai.v1.OpenAIService"
CLUSTER = "inference"
TYPE_PREFIX = "type.googleapis.com/envoy"
# The edge's response Lua (gateway/edge_lua.py) less what needs its other filters.
# A worker's error after the work started keeps its metadata (OpenAI's error JSON
# included) in the trailers, after the response headers it sent first so that Envoy
# does not retry it (services.inference.openai.servicer): lifted into the headers,
# the JSON becomes the body, as the edge does. So do a unary answer's headers (the
# request id), which ride its trailers (services.core.interceptors, HeadersAtEnd).
LUA_SOURCE = (
    response_headers.RESPONSE_LUA_FUNCTION
    + openai_edge.LUA_FUNCTION
    + """
function envoy_on_response(handle)
  local headers = handle:headers()
  if lift_response_headers(handle, headers) then
    headers = handle:headers()  -- it waited for the body: fetch them again
  end
  openai_error_body(handle, headers)
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the response filter: headers out of the trailers, OpenAI's error bodies."""
    return {
        "name": "tokenmesh.openai_errors",  # as before: its job grew, its name stays
        "typed_config": {
            "@type": f"{TYPE_PREFIX}.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }


def route_configuration() -> dict[str, Any]:
    """Builds the one route: every OpenAI-surface RPC to the workers, as a token stream."""
    return {
        "name": "openai_backend",
        "virtual_hosts": [
            {
                "name": "openai_backend",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": f"/{SERVICE}/"},
                        "route": {
                            "cluster": CLUSTER,
                            "timeout": "0s",
                            "idle_timeout": envoy_config.INFERENCE_IDLE_TIMEOUT,
                        },
                    }
                ],
            }
        ],
    }


def local_reply_config() -> dict[str, Any]:
    """Envoy's own error replies in OpenAI's shape, as the edge answers them on /openai/.

    The before-headers mappers go before the /openai/ ones, as at the edge:
    they match only replies without a `:path`, which no path filter can match.
    """
    return {"mappers": [*envoy_config.before_request_mappers(), *openai_edge.local_reply_mappers()]}


def http_connection_manager(descriptor_path: Path) -> dict[str, Any]:
    """Builds the listener's HTTP connection manager: errors, transcoder, router only."""
    return {
        "@type": f"{TYPE_PREFIX}.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "openai_backend",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "local_reply_config": local_reply_config(),
        "route_config": route_configuration(),
        "http_filters": [
            lua_filter(),
            envoy_config.transcoder_filter(descriptor_path, (SERVICE,)),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": f"{TYPE_PREFIX}.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }


def bootstrap(
    listen: Endpoint,
    admin_socket: Path,
    descriptor_path: Path,
    workers: Sequence[Endpoint],
    sds_dir: Path | None,
    health_check_interval_s: float = 1.0,
) -> dict[str, Any]:
    """Builds the Envoy bootstrap of a bare OpenAI backend listening at `listen`.

    Args:
        descriptor_path: the public API's descriptor set (gateway.protos).
        workers: the inference workers it sends every request to (round robin).
        sds_dir: the SDS files of the edge's certificate and the mesh CA
            (`envoy_config.sds_files`): mTLS to the workers; None: plaintext.
    """
    hcm = http_connection_manager(descriptor_path)
    # Its port is its own, as the edge's is (envoy_config.exclusive).
    listener = envoy_config.exclusive(
        {
            "name": "openai_backend",
            "address": {"socket_address": {"address": listen.host, "port_value": listen.port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": hcm,
                        }
                    ]
                }
            ],
        }
    )
    workers_cluster = envoy_config.cluster(CLUSTER, workers, health_check_interval_s, sds_dir)
    return {
        "node": {"id": f"openai-backend-{listen.port}", "cluster": "openai-backend"},
        "admin": {"address": admin.address(admin_socket)},
        "static_resources": {"listeners": [listener], "clusters": [workers_cluster]},
    }
