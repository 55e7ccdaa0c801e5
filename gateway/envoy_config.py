"""Builds the Envoy bootstrap for the edge from pure functions.

One listener serves REST (HTTP/1.1 and h2c, transcoded to gRPC) and native
gRPC. Each service is a cluster with active gRPC health checks; `/healthz`
answers from those health checks inside Envoy (no Python hop).

With a control plane (`EdgeConfig.xds`, the router service), inference
clusters, their endpoints and the route configuration come over ADS; the
router builds them with these same functions (`route_configuration`,
`grpc_health_check`, ...), so there is one place that knows each shape.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import (
    admin,
    edge_auth,
    edge_health,
    edge_lua,
    grpc_paths,
    handover,
    key_cache,
    model_routing,
    openai_edge,
    refusal_details,
    request_body,
    static_site,
    stats_listener,
)
from gateway.edge_auth import EdgeAuth
from services.core import contract, pki
from services.core.errors import TokenmeshError

# Upstream short name -> gRPC service names routed to it (by path prefix).
PUBLIC_ROUTES: Mapping[str, Sequence[str]] = {
    "auth": ("tokenmesh.auth.v1.AuthService",),
    "router": (
        "tokenmesh.router.v1.RouterService",
        # The router answers reflection for the whole public API.
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ),
    # Every API version of inference goes to the workers, which serve them side by side.
    "inference": (
        "tokenmesh.inference.v1.InferenceService",
        "tokenmesh.inference.v2.InferenceService",
        # The OpenAI-compatible surface (/openai/v1), served on v2.
        "tokenmesh.openai.v1.OpenAIService",
    ),
    "usage": ("tokenmesh.usage.v1.UsageService", "tokenmesh.usage.v2.UsageService"),
    "jobs": (
        "tokenmesh.jobs.v1.JobsService",
        # OpenAI's files and batches (/openai/v1/files, /openai/v1/batches) are jobs.
        "tokenmesh.openai.v1.OpenAIBatchService",
        # Prefer: respond-async (gateway/handover.py).
        "tokenmesh.jobs.v1.HandoverService",
    ),
}
# The health-check service name each cluster is probed with.
HEALTH_SERVICE: Mapping[str, str] = {
    "auth": "tokenmesh.auth.v1.AuthService",
    "router": "tokenmesh.router.v1.RouterService",
    "inference": "tokenmesh.inference.v1.InferenceService",
    "usage": "tokenmesh.usage.v1.UsageService",
    "jobs": "tokenmesh.jobs.v1.JobsService",
}
TRANSCODED_SERVICES = (
    "tokenmesh.auth.v1.AuthService",
    "tokenmesh.router.v1.RouterService",
    "tokenmesh.inference.v1.InferenceService",
    "tokenmesh.inference.v2.InferenceService",
    "tokenmesh.openai.v1.OpenAIService",
    "tokenmesh.usage.v1.UsageService",
    "tokenmesh.usage.v2.UsageService",
    "tokenmesh.jobs.v1.JobsService",
    "tokenmesh.openai.v1.OpenAIBatchService",
)
# Upstreams that decide request rates in-process, in the usage service's windows
# (services/inference/request_limits.py): their routes, and the per-model routes
# from the control plane, make no rate-limit call.
SELF_LIMITING_UPSTREAMS = frozenset({"inference"})
# Streaming routes get no total timeout (a long generation is fine), only an idle one.
STREAMING_UPSTREAMS = frozenset({"inference", "jobs"})  # jobs: progress events (SSE)
# The idle timeout of routes to workers: the longest a non-streamed answer may be
# silent, since its one message comes when the whole generation is done (a unary
# Complete, a REST /v1/complete, an OpenAI request without `stream`). It was 60 s,
# which cut any longer generation with a 504, as gateways with the same default did
# (LiteLLM's and Envoy AI Gateway's "504 for long non-streaming requests"). 600 s is
# the OpenAI SDK's own default timeout; a client that wants less sets its deadline.
INFERENCE_IDLE_TIMEOUT = "600s"
# The jobs service's routes: a `Prefer: wait=N` request is silent for up to 60 s
# (services/jobs/handover.py MAX_WAIT_S) before its answer; at 60 s the two raced.
STREAM_IDLE_TIMEOUT = "90s"
# What every edge removes from a client's request: only the edge may set them (Envoy
# sets the attempt count on each try itself: removed too, so that no client's copy
# reaches a worker, whose logs and retries' accounting may read it).
STRIPPED_HEADERS = (
    *edge_auth.IDENTITY_HEADERS,
    *model_routing.EDGE_ONLY_HEADERS,
    contract.ATTEMPT_COUNT_HEADER,
)
# A client's credentials: an API key (x-api-key, or a bearer `tm_` key) or a JWT.
# Only the auth service reads them past the edge (its admin RPCs authenticate
# their caller themselves); every other upstream gets the identity headers the
# edge derived from them, so a worker, or anything that reads its memory, never
# holds a key or token it could replay (a JWT was forwarded to every upstream).
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
CREDENTIAL_UPSTREAMS = frozenset({"auth"})
# The identity each upstream cluster's hosts must prove (their certificate's SPIFFE id).
UPSTREAM_IDENTITY: Mapping[str, str] = {
    "auth": contract.AUTH,
    "router": contract.ROUTER,
    "inference": contract.WORKER,
    "usage": contract.USAGE,
    "jobs": contract.JOBS,
    "xds": contract.ROUTER,
}
# SDS secret names: the edge's own certificate, the mesh CA it trusts, and the
# certificate it serves to clients on its TLS listener.
IDENTITY_SECRET = "tokenmesh-identity"
CA_SECRET = "tokenmesh-ca"
SERVING_SECRET = "tokenmesh-edge-serving"
# HTTPS responses tell browsers to keep to HTTPS for a year.
HSTS = "max-age=31536000; includeSubDomains"
# TLS 1.2 suites a modern client negotiates (TLS 1.3's are fixed and all strong).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
# HTTP status of a local reply -> the gRPC code REST clients see in the JSON body.
HTTP_TO_GRPC_CODE: Mapping[int, int] = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    405: 12,
    408: 4,
    413: 8,
    429: 8,
    # Request headers over max_request_headers_kb (or max_headers): too large, as 413.
    431: 8,
    500: 13,
    501: 12,
    502: 14,
    503: 14,
    504: 4,
}


RESOURCE_EXHAUSTED = 8
UNKNOWN = 2
UNAVAILABLE = 14
# What a caller reads when the edge could not get an answer from a service (any
# 503 of Envoy's own but "no healthy upstream"): Envoy's text names its internals.
UNAVAILABLE_MESSAGE = openai_edge.UNAVAILABLE_MESSAGE
# What a gRPC client reads when its request is larger than the edge buffers.
GRPC_TOO_LARGE_MESSAGE = refusal_details.GRPC_TOO_LARGE.message
# Local replies whose message is the edge's own, whichever filter answered: every
# 413 (Envoy's texts named its transcoder, or said only "Payload Too Large").
FIXED_MESSAGES: Mapping[int, str] = {413: request_body.TOO_LARGE_MESSAGE}
# The message Envoy (or the filter) gave its local reply.
LOCAL_REPLY_BODY = "%LOCAL_REPLY_BODY%"


@dataclass(frozen=True)
class Endpoint:
    """Endpoint is one upstream host:port (weight: its EDS load-balancing weight, if any)."""

    host: str
    port: int
    weight: int | None = None


@dataclass(frozen=True)
class EdgeTls:
    """EdgeTls is the edge's HTTPS / gRPC-over-TLS listener for clients.

    The certificate it serves is the SDS secret `SERVING_SECRET` (see
    `sds_files`): Envoy reloads it when its files are replaced.

    Attributes:
        port: the TLS listener's port.
        host: the address it binds (0.0.0.0 in a cluster; the plaintext
            listener stays on `EdgeConfig.listen_host`).
    """

    port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class EdgeLimits:
    """EdgeLimits are Envoy's own protections (the overload manager and buffers).

    A connection flood or a memory spike degrades into refused connections and
    503s instead of a dead or swapping edge.
    """

    max_connections: int = 10_000  # all listeners together; more are refused
    max_heap_bytes: int = 1 << 30  # the overload manager's heap budget
    connection_buffer_bytes: int = 1 << 20  # per connection (bodies the transcoder buffers)
    max_concurrent_streams: int = 128  # per HTTP/2 connection
    max_request_headers_kb: int = 60
    max_headers: int = 100
    # The whole request (headers and body) must arrive within this: no public RPC
    # streams its request, and the routes to workers allow 600 s of silence (for
    # their answers), which a client trickling a body could hold a stream with.
    # An upload of the largest file (gateway/handover.py, ~8 MiB) needs ~28 KB/s.
    request_timeout_s: float = 300.0
    request_headers_timeout_s: float = 10.0


@dataclass(frozen=True)
class EdgeConfig:
    """EdgeConfig is everything the edge bootstrap depends on."""

    listen_port: int
    # Envoy's admin API: a Unix socket, never a TCP port (gateway/admin.py).
    admin_socket: Path
    descriptor_path: Path
    upstreams: Mapping[str, Sequence[Endpoint]]
    listen_host: str = "127.0.0.1"
    health_check_interval_s: float = 1.0
    access_log_path: str = "/dev/stdout"
    otlp_endpoint: Endpoint | None = None
    extra_clusters: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    # Edge authentication (JWT, API keys, per-RPC scopes); None serves unauthenticated.
    auth: EdgeAuth | None = field(default_factory=EdgeAuth)
    # The router's ADS (model routing); None routes inference statically to `upstreams`.
    xds: Endpoint | None = None
    node_id: str = "edge-1"
    # Route inference by model and version (Lua reads the body); off sends every
    # inference request to any worker (benchmarks measure what routing costs).
    model_routing: bool = True
    # Model versions pick a worker by a hash of the prompt's head (when the
    # control plane's TOKENMESH_ROUTER_PREFIX_AFFINITY is on too); off: round
    # robin on this edge only (bench K1/K2 compare the two on the same workers).
    prefix_affinity: bool = True
    # Worker endpoints weigh what their load reports earned them (when the control
    # plane's TOKENMESH_ROUTER_LOAD_AWARE is on too); off: equal weights on this
    # edge only (bench L1 compares the two on the same workers).
    load_aware: bool = True
    # mTLS to every upstream: the directory of the SDS files (see `sds_files`)
    # that name the edge's certificate and the mesh CA. None: plaintext upstreams.
    sds_dir: Path | None = None
    # HTTPS and gRPC over TLS for clients (needs `sds_dir`); None: plaintext only.
    tls: EdgeTls | None = None
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    # A listener serving only GET /stats/prometheus (for Prometheus in a pod); None: none.
    stats: Endpoint | None = None
    # Bind every listener without SO_REUSEPORT (see `exclusive`): where two meshes can
    # share a network namespace (`make run`), a second one must fail, not split the
    # clients. False keeps Envoy's default, which spreads connections across its worker
    # threads more evenly: for a deployed edge, alone in its pod or container.
    exclusive_ports: bool = True


def _type(name: str) -> str:
    """Returns the Any type URL of an Envoy proto message, e.g. "config.trace.v3.X"."""
    return f"type.googleapis.com/envoy.{name}"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def cluster(
    name: str,
    endpoints: Sequence[Endpoint],
    health_check_interval_s: float,
    sds_dir: Path | None = None,
) -> dict[str, Any]:
    """Builds an HTTP/2 cluster with active gRPC health checks (mTLS when `sds_dir` is set)."""
    return with_upstream_tls(
        {
            "name": name,
            # Host names (Kubernetes headless services) resolve to every pod's address.
            "type": "STATIC" if all(is_ip(e.host) for e in endpoints) else "STRICT_DNS",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": h2_options(),
            "load_assignment": load_assignment(name, endpoints),
            "health_checks": [grpc_health_check(HEALTH_SERVICE[name], health_check_interval_s)],
            # Streams may be long; keepalives find dead upstream connections.
            "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 30}},
        },
        sds_dir,
        UPSTREAM_IDENTITY[name],
    )


def sds_secret(sds_dir: Path | str, name: str) -> dict[str, Any]:
    """Builds a reference to a file-based SDS secret (Envoy reloads it when files move in)."""
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": f"{sds_dir}/{name}.yaml",
                "watched_directory": {"path": str(sds_dir)},
            },
            "resource_api_version": "V3",
        },
    }


def sds_files(
    pki_dir: Path, identity: str, serving: tuple[Path, Path] | None = None
) -> dict[str, dict[str, Any]]:
    """Returns the SDS files (name -> content) for `identity`'s certificate and the CA.

    Each secret watches the directory its files live in: a file replaced there
    by an atomic rename (`services.core.pki`, cert-manager, SPIRE, an operator's
    `mv`) is picked up without a restart.

    Args:
        serving: (certificate, key) the TLS listener serves to clients; default:
            the identity's own leaf (signed by the local CA).
    """
    secret_type = _type("extensions.transport_sockets.tls.v3.Secret")
    files = pki.IdentityFiles.of(pki_dir, identity)
    watched = {"path": str(pki_dir)}
    certificate = {
        "name": IDENTITY_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": str(files.cert)},
            "private_key": {"filename": str(files.key)},
            "watched_directory": watched,
        },
    }
    ca = {
        "name": CA_SECRET,
        "validation_context": {
            "trusted_ca": {"filename": str(files.ca)},
            "watched_directory": watched,
        },
    }
    cert, key = serving or (files.cert, files.key)
    served = {
        "name": SERVING_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": str(cert)},
            "private_key": {"filename": str(key)},
            "watched_directory": {"path": str(cert.parent)},
        },
    }
    return {
        f"{name}.yaml": {"resources": [{"@type": secret_type, **secret}]}
        for name, secret in (
            (IDENTITY_SECRET, certificate),
            (CA_SECRET, ca),
            (SERVING_SECRET, served),
        )
    }


def downstream_tls(sds_dir: Path) -> dict[str, Any]:
    """Builds the TLS listener's transport socket: TLS 1.2+, modern suites, h2 and http/1.1."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _type("extensions.transport_sockets.tls.v3.DownstreamTlsContext"),
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "cipher_suites": list(TLS12_CIPHERS),
                },
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [sds_secret(sds_dir, SERVING_SECRET)],
            },
        },
    }


def upstream_tls(
    sds_dir: Path | str, peer_identity: str, worker_pools: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Builds mTLS to an upstream: the edge's certificate, and the peer's SPIFFE id
    verified (see `san_matchers` for `worker_pools`)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _type("extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [sds_secret(sds_dir, IDENTITY_SECRET)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": san_matchers(peer_identity, worker_pools)
                    },
                    "validation_context_sds_secret_config": sds_secret(sds_dir, CA_SECRET),
                },
            },
        },
    }


def san_matchers(
    peer_identity: str, worker_pools: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Returns the URI SAN matchers an upstream's certificate must meet (any one).

    A worker upstream is any worker identity (the shared `worker` one, or any
    pool's `worker-<pool>`) unless `worker_pools` names the pools of a placed
    model: then only those pools' identities.
    """
    if peer_identity != contract.WORKER:
        return [_uri_san({"exact": pki.spiffe_id(peer_identity)})]
    if worker_pools:
        return [
            _uri_san({"exact": pki.spiffe_id(contract.worker_identity(pool))})
            for pool in sorted(worker_pools)
        ]
    return [
        _uri_san({"exact": pki.spiffe_id(contract.WORKER)}),
        _uri_san({"prefix": pki.spiffe_id(contract.WORKER_POOL_PREFIX)}),
    ]


def _uri_san(matcher: dict[str, str]) -> dict[str, Any]:
    return {"san_type": "URI", "matcher": matcher}


def with_upstream_tls(
    cluster: dict[str, Any],
    sds_dir: Path | str | None,
    peer_identity: str,
    worker_pools: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Adds mTLS to `peer_identity` to a cluster when `sds_dir` is set; returns the cluster."""
    if sds_dir is not None:
        cluster["transport_socket"] = upstream_tls(sds_dir, peer_identity, worker_pools)
    return cluster


def grpc_health_check(service_name: str, interval_s: float) -> dict[str, Any]:
    """Builds an active gRPC health check of `service_name`."""
    interval = _duration(interval_s)
    return {
        "timeout": "1s",
        "interval": interval,
        "no_traffic_interval": interval,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {"service_name": service_name},
    }


def is_ip(host: str) -> bool:
    """Tells whether `host` is an IP literal (Envoy's static and EDS endpoints need one)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# HTTP/2 PINGs on upstream connections to tokenmesh's own gRPC servers. A peer that
# stops answering without a reset (a frozen process, a lost node, a partition) has
# its connection closed, and the streams open on it reset, ~15 s after it went quiet:
# without them a stream open on a hung worker waited for the route's idle timeout
# (600 s for inference streams), although health checks took the worker out in ~4 s.
# Our servers accept a ping every 5 s even with no call open (services.core.server).
UPSTREAM_PING = {"interval": "10s", "timeout": "5s"}


def h2_options(*, ping: bool = True) -> dict[str, Any]:
    """HTTP/2 upstream options; `ping=False` for servers that are not ours (a gRPC
    server's default policy answers pings on an idle connection more often than one
    per 2 hours with GOAWAY too_many_pings)."""
    http2: dict[str, Any] = {"connection_keepalive": dict(UPSTREAM_PING)} if ping else {}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _type("extensions.upstreams.http.v3.HttpProtocolOptions"),
            "explicit_http_config": {"http2_protocol_options": http2},
        }
    }


# A priority level counts as fully available while any of its hosts is (1000x, in
# percent): an aggregate cluster (a model's `fallback:` one) spills to its next level,
# the fallback model, only when the model has no healthy worker left. At Envoy's
# default (140%) a level counted as degraded below 72% healthy, and 1 of 2 workers
# down sent ~30% of the model's requests to the fallback model.
OVERPROVISIONING_FACTOR = 100_000


def load_assignment(name: str, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [_lb_endpoint(e) for e in endpoints]}],
        "policy": {"overprovisioning_factor": OVERPROVISIONING_FACTOR},
    }


def _lb_endpoint(endpoint: Endpoint) -> dict[str, Any]:
    found: dict[str, Any] = {"endpoint": {"address": _socket_address(endpoint)}}
    if endpoint.weight is not None:
        found["load_balancing_weight"] = endpoint.weight
    return found


def _socket_address(endpoint: Endpoint) -> dict[str, Any]:
    return {"socket_address": {"address": endpoint.host, "port_value": endpoint.port}}


def routes(ratelimit: bool = False) -> list[dict[str, Any]]:
    """Builds one prefix route per public gRPC service (REST arrives transcoded).

    ratelimit: ask the usage service's RateLimitService about each request,
    except on routes to upstreams that decide request rates themselves.
    """
    result = []
    for upstream, services in PUBLIC_ROUTES.items():
        for service in services:
            action: dict[str, Any] = {"cluster": upstream}
            if upstream in STREAMING_UPSTREAMS:
                idle = INFERENCE_IDLE_TIMEOUT if upstream == "inference" else STREAM_IDLE_TIMEOUT
                action.update(timeout="0s", idle_timeout=idle)
            else:
                action.update(timeout="30s")
            if ratelimit and upstream not in SELF_LIMITING_UPSTREAMS:
                action["rate_limits"] = edge_auth.rate_limits()
            result.append({"match": {"prefix": f"/{service}/"}, "route": action})
    return result


def route_configuration(
    auth: EdgeAuth | None, model_routes: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """Builds the edge's routes: static files and public RPCs, per-model routes, then one
    per service."""
    virtual_host: dict[str, Any] = {
        "name": "edge",
        "domains": ["*"],
        # x-envoy-attempt-count on every upstream try: a worker counts a request in
        # its rate-limit windows on the first try only (request_limits.py).
        "include_request_attempt_count": True,
        "response_headers_to_add": list(ANSWER_HEADERS),
        "routes": [
            *(edge_auth.public_routes() if auth else static_site.routes()),
            *handover.routes(),
            *(dict(r) for r in model_routes),
            *routes(ratelimit=bool(auth and auth.ratelimit)),
            # Last: a gRPC request no route above took (a REST path) is NOT_FOUND.
            grpc_paths.unrouted_grpc_route(auth_filters=auth is not None),
        ],
    }
    virtual_host["routes"] = [without_credentials(r) for r in virtual_host["routes"]]
    return {
        "name": "edge",
        "virtual_hosts": [virtual_host],
        # Envoy refuses direct_response bodies over this (4 KiB by default).
        "max_direct_response_body_size_bytes": static_site.MAX_BODY_BYTES,
    }


def without_credentials(route: Mapping[str, Any]) -> dict[str, Any]:
    """Returns `route`, removing the client's credentials from what it forwards unless
    its upstream reads them (CREDENTIAL_UPSTREAMS). The router filter removes them
    after every filter that checks them (JWT, key cache, ext_authz) has run."""
    action = route.get("route")
    if action is None or action.get("cluster") in CREDENTIAL_UPSTREAMS:
        return dict(route)
    removed = [*route.get("request_headers_to_remove", ()), *CREDENTIAL_HEADERS]
    return {**route, "request_headers_to_remove": removed}


# The largest unary answer the transcoder buffers (it transcodes one whole); without
# it the stream's buffer limit applies (1 MiB: the listener's, or Envoy's default),
# and a larger answer became a 500, which OpenAI's SDKs retry twice, each run billed.
# Sized to the largest unary answer a client may ask for, the embeddings of
# MAX_EMBED_INPUTS (256) inputs as JSON floats: ~21 B per dimension (a float32 as a
# double: sign, 17 digits, comma), 2.1 MB at 384 dimensions (all-minilm-l6-v2) and
# 5.5 MB at 1,024. A model with more dimensions answers 256 inputs as base64 (~4x
# smaller) or fewer inputs a call. Explicit, not unlimited: each stream holds at most
# this much (the overload manager's heap limit bounds them together). Server streams
# are not buffered whole: a non-streamed OpenAI chat or completion comes as several
# HttpBody messages of at most 256 KiB (services.inference.openai.servicer), and v2's
# Generate is the way to a v2 answer larger than this.
# NOTE: the transcoder raises the stream's buffer limit to this for the request too
# (measured on 1.40; its max_request_body_size does not lower it): a REST request
# body up to 8 MiB reaches the worker, whose validation refuses what is too long
# (400). The transcoder does not bound a larger one (it counts only the bytes its
# parser has not consumed): the edge refuses it, 413, before it is read
# (gateway/request_body.py, tests/e2e/test_request_body_limit.py).
MAX_TRANSCODED_RESPONSE_BYTES = 8 << 20


def transcoder_filter(
    descriptor_path: Path, services: Sequence[str] = TRANSCODED_SERVICES
) -> dict[str, Any]:
    """Builds the REST/SSE <-> gRPC transcoder for the public services (or `services`)."""
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": _type("extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"),
            "proto_descriptor": str(descriptor_path),
            "services": list(services),
            "convert_grpc_status": True,
            "max_response_body_size": MAX_TRANSCODED_RESPONSE_BYTES,
            "request_validation_options": {
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
                # A body field the path binds (`model` of /v2/models/{model}:complete)
                # is a 400: the body's won, so the model the URL (and the access log)
                # named was not the one that ran.
                "reject_binding_body_field_collisions": True,
            },
            "print_options": {
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
                "preserve_proto_field_names": True,
                "stream_sse_style_delimited": True,
            },
        },
    }


def health_filter(upstreams: Sequence[str]) -> dict[str, Any]:
    """Builds `GET /healthz`: 200 only while every upstream has a healthy host."""
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": _type("extensions.filters.http.health_check.v3.HealthCheck"),
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
            # Any healthy host is enough. Envoy truncates the percentage to an
            # integer, so 1 (not a tiny fraction) is the smallest that means
            # "at least one healthy host" (exact for clusters of up to 100 hosts).
            "cluster_min_healthy_percentages": {name: {"value": 1} for name in upstreams},
        },
    }


def local_reply_config() -> dict[str, Any]:
    """Makes Envoy's own error replies JSON shaped like transcoded gRPC errors."""
    no_healthy_worker: dict[str, Any] = {
        # No healthy worker (and no fallback): UNAVAILABLE, and when to try again.
        "filter": {"response_flag_filter": {"flags": ["UH"]}},
        "headers_to_add": [_RETRY_AFTER],
        "body_format_override": refusal_details.rest_reply(refusal_details.NO_HEALTHY_UPSTREAM),
    }
    unavailable = _unavailable()
    # Native gRPC requests first: their body is their grpc-message, so plain text
    # (413 with its own, 429 as RESOURCE_EXHAUSTED, no healthy worker and any
    # other 503 with when to retry). Then replies sent before any request header
    # was read, in both shapes; then /openai/ paths, which answer OpenAI's error shape.
    grpc_no_healthy_worker = _grpc_refusal(
        grpc_paths.native_grpc(no_healthy_worker["filter"]), refusal_details.NO_HEALTHY_UPSTREAM
    )
    grpc_unavailable = _grpc_refusal(
        grpc_paths.native_grpc(_UNAVAILABLE_STATUS), refusal_details.UPSTREAM_UNAVAILABLE
    )
    mappers = [
        _grpc_too_large(),
        refusal_details.malformed_grpc_mapper(),
        grpc_paths.rate_limited_mapper(),
        grpc_no_healthy_worker,
        grpc_unavailable,
        *refusal_details.grpc_mappers(),
        grpc_paths.local_reply_mapper(),
        *before_request_mappers(),
        *refusal_details.openai_mappers(),
        *openai_edge.local_reply_mappers(),
        no_healthy_worker,
        unavailable,
        *refusal_details.rest_mappers(),
    ]
    mappers += [
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "EQ",
                        "value": {"default_value": status, "runtime_key": f"tm.lr.{status}"},
                    }
                }
            },
            "body_format_override": _error_body(
                grpc_code, FIXED_MESSAGES.get(status, LOCAL_REPLY_BODY)
            ),
        }
        for status, grpc_code in HTTP_TO_GRPC_CODE.items()
    ]
    # Any other error status: UNKNOWN. Successful local replies (/healthz) keep their body.
    mappers.append(
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "GE",
                        "value": {"default_value": 400, "runtime_key": "tm.lr.any"},
                    }
                }
            },
            "body_format_override": _error_body(UNKNOWN),
        }
    )
    # The rest (`GET /healthz`, answered by the health-check filter before any route's
    # headers apply): its own body, and its request id.
    mappers.append(
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "GE",
                        "value": {"default_value": 0, "runtime_key": "tm.lr.rest"},
                    }
                }
            }
        }
    )
    # The first mapper that matches is the only one applied: each adds the answer headers.
    return {"mappers": [_with_answer_headers(mapper) for mapper in mappers]}


# Every answer names its request id (the one in the access log), as OpenAI's do and
# what its SDK shows as an error's `request_id`: a worker's answer names its own (the
# caller's `request_id`, else the edge's, which the worker adopts); an error a worker
# answered trailers-only, and the edge's own replies, named none.
REQUEST_ID_IN_ANSWER: dict[str, Any] = {
    "header": {"key": "x-request-id", "value": "%REQ(x-request-id)%"},
    "append_action": "ADD_IF_ABSENT",
}

# Every answer, the edge's own replies included: browsers never sniff one as HTML
# (error bodies quote the caller's path and query), and no cache keeps one (the
# credential is often x-api-key, which shared caches do not treat as Authorization:
# one tenant's answer could be served to another). A route's own (the static files'
# no-cache) and an event stream's (the response Lua's) win: ADD_IF_ABSENT.
ANSWER_HEADERS: tuple[dict[str, Any], ...] = (
    REQUEST_ID_IN_ANSWER,
    {
        "header": {"key": "x-content-type-options", "value": "nosniff"},
        "append_action": "ADD_IF_ABSENT",
    },
    {"header": {"key": "cache-control", "value": "no-store"}, "append_action": "ADD_IF_ABSENT"},
)


def _with_answer_headers(mapper: dict[str, Any]) -> dict[str, Any]:
    return {**mapper, "headers_to_add": [*mapper.get("headers_to_add", ()), *ANSWER_HEADERS]}


_RETRY_AFTER: dict[str, Any] = {
    "header": {"key": "retry-after", "value": str(refusal_details.RETRY_AFTER_S)},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}
_UNAVAILABLE_STATUS = grpc_paths.status_filter("EQ", 503, "tm.lr.unavailable")


def _unavailable() -> dict[str, Any]:
    """Any other 503 Envoy answers itself: UNAVAILABLE with a fixed message and retry-after.

    A worker that refused the connection or reset the call (its retries spent),
    a circuit breaker, an unreachable auth service: Envoy's own text named its
    internals ("upstream connect error or disconnect/reset before headers.
    retried and the latest reset reason: remote connection failure") and,
    unlike "no healthy upstream", carried no retry-after. `/healthz` (the
    health-check filter's 503) keeps its answer.
    """
    return {
        "filter": {
            "and_filter": {"filters": [_UNAVAILABLE_STATUS, {"not_health_check_filter": {}}]}
        },
        "headers_to_add": [_RETRY_AFTER],
        "body_format_override": refusal_details.rest_reply(refusal_details.UPSTREAM_UNAVAILABLE),
    }


def _grpc_refusal(condition: dict[str, Any], refusal: TokenmeshError) -> dict[str, Any]:
    """A native gRPC caller's Envoy 503: `refusal`'s message and details, and retry-after."""
    return {"filter": condition, **refusal_details.grpc_reply(refusal, _RETRY_AFTER)}


def before_request_mappers() -> list[dict[str, Any]]:
    """Envoy's replies sent before it read the request's headers, in both error shapes.

    The HTTP/1.1 codec answers 431 (headers over max_request_headers_kb or
    max_headers), 400 (a malformed request, a header name with "_") and the
    connection manager 408 (headers slower than request_headers_timeout)
    before any request header exists: no mapper can tell an /openai/ path
    from a REST one then, so these came out in the REST shape to OpenAI's
    SDKs too. The body is the REST shape with OpenAI's `error` object added:
    REST clients read `code`, `message` and `details` (the extra field is
    ignored, as `http_status` is), OpenAI's SDKs read `error` (they take a
    body's `error` when it has one). Over HTTP/2 Envoy resets the stream
    instead (no reply: docs/openai.md).
    """
    no_request_headers = {"header_filter": {"header": {"name": ":path", "present_match": False}}}

    def mapper(
        status_filter: dict[str, Any], grpc_code: int, error: dict[str, Any]
    ) -> dict[str, Any]:
        body = _error_body(grpc_code)
        body["json_format"]["error"] = error
        return {
            "filter": {"and_filter": {"filters": [no_request_headers, status_filter]}},
            "body_format_override": body,
        }

    statuses = sorted({*HTTP_TO_GRPC_CODE, *openai_edge.LOCAL_ERRORS})
    mappers = [
        mapper(
            grpc_paths.status_filter("EQ", status, f"tm.lr.early{status}"),
            HTTP_TO_GRPC_CODE.get(status, UNKNOWN),
            openai_edge.error_object(status),
        )
        for status in statuses
    ]
    # Any other: UNKNOWN, and OpenAI's generic type of the status's class.
    for lowest in (500, 400):
        any_status = grpc_paths.status_filter("GE", lowest, f"tm.lr.early{lowest // 100}xx")
        mappers.append(mapper(any_status, UNKNOWN, openai_edge.other_error_object(lowest)))
    return mappers


def _grpc_too_large() -> dict[str, Any]:
    """Maps a native gRPC request's 413 (body over the edge's buffer) to RESOURCE_EXHAUSTED.

    Envoy turns a local reply to a gRPC request into a trailers-only response
    whose grpc-status it derives from the HTTP status, and 413 has no mapping
    (UNKNOWN). A grpc-status set here is kept. REST requests carry
    x-envoy-original-path once transcoded (their content type is gRPC by
    then too) and keep the JSON 413.
    """
    return {
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "status_code_filter": {
                            "comparison": {
                                "op": "EQ",
                                "value": {"default_value": 413, "runtime_key": "tm.lr.grpc413"},
                            }
                        }
                    },
                    {
                        "header_filter": {
                            "header": {
                                "name": "content-type",
                                "string_match": {"prefix": "application/grpc"},
                            }
                        }
                    },
                    {
                        "header_filter": {
                            "header": {"name": "x-envoy-original-path", "present_match": False}
                        }
                    },
                ]
            }
        },
        **refusal_details.grpc_reply(
            refusal_details.GRPC_TOO_LARGE, grpc_paths.grpc_status_header(RESOURCE_EXHAUSTED)
        ),
    }


def _error_body(grpc_code: int, message: str = LOCAL_REPLY_BODY) -> dict[str, Any]:
    return refusal_details.rest_body(grpc_code, message, [])


# Where the edge keeps an upstream's trailers-only gRPC status for its access log.
ACCESS_LOG_METADATA = "tokenmesh.access_log"
# gRPC codes by number, named as Envoy's %GRPC_STATUS% names them (`Canceled`).
GRPC_STATUS_NAMES: Sequence[str] = (
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
)


def upstream_status_filter() -> dict[str, Any]:
    """Keeps an answer's `grpc-status` header in dynamic metadata for the access log.

    Placed on the upstream side of the transcoders: a worker refuses a request
    before any output with a trailers-only answer (grpc-status in its headers),
    which the transcoder turns into the HTTP status and then drops, so
    %GRPC_STATUS% fell back to Envoy's HTTP-to-gRPC mapping: every REST and
    OpenAI 400 logged `Internal`, a 404 `Unimplemented` (measured on 1.40;
    %RESP(grpc-status)% and %TRAILER(grpc-status)% were empty too). A native
    filter, one header lookup per answer: no Lua coroutine.
    """
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": _type("extensions.filters.http.header_to_metadata.v3.Config"),
            "response_rules": [
                {
                    "header": "grpc-status",
                    "on_header_present": {
                        "metadata_namespace": ACCESS_LOG_METADATA,
                        "key": "grpc_status",
                        "type": "STRING",
                    },
                }
            ],
        },
    }


def _grpc_status_expression() -> str:
    """Returns the CEL expression the access log's `grpc_status` is: the gRPC status
    the upstream answered, by name; null when no gRPC status was answered.

    In order: a trailers-only answer's status (upstream_status_filter; the
    transcoder dropped it from the headers), the trailers' (an answer with
    messages: the transcoder keeps them), the headers' (Envoy's own gRPC reply
    before that filter). Never derived from the HTTP status, as %GRPC_STATUS%
    is: Envoy's own refusal of a REST request logs null (its `status` and
    `flags` say what it was). A missing key is a CEL error, which logs null.
    %CEL% needs no `formatters` entry on 1.40 (Envoy warns that it is always on).
    """
    kept = f"metadata.filter_metadata['{ACCESS_LOG_METADATA}']"
    code = (
        f"('{ACCESS_LOG_METADATA}' in metadata.filter_metadata ? {kept}['grpc_status']"
        " : ('grpc-status' in response.trailers ? response.trailers['grpc-status']"
        " : response.headers['grpc-status']))"
    )
    names = "{" + ", ".join(f"'{n}': '{name}'" for n, name in enumerate(GRPC_STATUS_NAMES)) + "}"
    return f"{code} in {names} ? {names}[{code}] : {code}"  # an unknown code as its number


# Envoy's own log lines (not the access log) as one JSON object each, with the
# fields of the services' JSON logs (services/core/logs.py). spdlog's pattern: `%j`
# is the message JSON-escaped (Envoy's flag), `%z` the offset (local time, as Envoy
# logs it). The command line's, not the bootstrap's `application_log_config`, so
# the lines before the bootstrap is read are JSON too.
JSON_LOG_FORMAT = (
    '{"ts":"%Y-%m-%dT%T.%e%z","level":"%l","logger":"envoy.%n","msg":"%j","source":"%g:%#"}'
)


def log_args(log_format: str) -> list[str]:
    """Returns Envoy's command-line options for TOKENMESH_LOG_FORMAT `log_format`."""
    return ["--log-format", JSON_LOG_FORMAT] if log_format == "json" else []


def access_log(path: str) -> list[dict[str, Any]]:
    """Builds a JSON access log with the fields operators look for first."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _type("extensions.access_loggers.file.v3.FileAccessLog"),
                "path": path,
                "log_format": {
                    "json_format": {
                        "time": "%START_TIME%",
                        "method": "%REQ(:METHOD)%",
                        # Without its query: the transcoder reads fields from it, an
                        # API key (`/v1/auth/token?api_key=tm_...`) included.
                        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                        # Without it too: a request the transcoder did not rewrite
                        # (a wrong verb, an unknown parameter) keeps its REST query.
                        "grpc_path": "%REQ_WITHOUT_QUERY(:PATH)%",
                        "status": "%RESPONSE_CODE%",
                        "grpc_status": f"%CEL({_grpc_status_expression()})%",
                        "flags": "%RESPONSE_FLAGS%",
                        "duration_ms": "%DURATION%",
                        "upstream": "%UPSTREAM_CLUSTER%",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                    },
                    "formatters": [
                        {
                            "name": "envoy.formatter.req_without_query",
                            "typed_config": {
                                "@type": _type(
                                    "extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                                )
                            },
                        }
                    ],
                },
            },
        }
    ]


def tracing(otlp_cluster: str) -> dict[str, Any]:
    """Builds HCM tracing that exports Envoy's spans over OTLP/gRPC."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": _type("config.trace.v3.OpenTelemetryConfig"),
                "grpc_service": {"envoy_grpc": {"cluster_name": otlp_cluster}, "timeout": "1s"},
                "service_name": "tokenmesh-edge",
            },
        },
        # OpenTelemetry's GenAI conventions on the edge's span (the worker's span
        # adds the rest: services.inference.genai_spans). The model headers are
        # the Lua filter's and the chosen route's, never the client's.
        "custom_tags": [
            {"tag": "gen_ai.system", "literal": {"value": "tokenmesh"}},
            {
                "tag": "gen_ai.request.model",
                "request_header": {"name": model_routing.MODEL_HEADER, "default_value": ""},
            },
            {
                "tag": "tokenmesh.route.model",
                "request_header": {"name": model_routing.ROUTE_MODEL_HEADER, "default_value": ""},
            },
            {
                "tag": "tokenmesh.route.version",
                "request_header": {"name": model_routing.ROUTE_VERSION_HEADER, "default_value": ""},
            },
        ],
    }


def http_connection_manager(config: EdgeConfig, tls: bool = False) -> dict[str, Any]:
    """Builds the edge's HTTP connection manager (`tls`: the HTTPS listener's, with HSTS)."""
    limits = config.limits
    hcm: dict[str, Any] = {
        "@type": _type(
            "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        ),
        "stat_prefix": "edge_tls" if tls else "edge",
        "codec_type": "AUTO",
        # No HTTP/1.1 trailers (Envoy's default): nothing an HTTP/1.1 client calls
        # has any but gRPC's status, which a REST stream then ended with as chunked
        # trailers (`grpc-status: 0`) its client never asked for.
        "http_protocol_options": {"enable_trailers": False},
        "http2_protocol_options": {
            # NOTE: no smaller flow-control windows: the model-routing Lua filter
            # buffers a whole request body, and a 64 KiB stream window left
            # gRPC requests over it hanging (found by make fuzz).
            "max_concurrent_streams": limits.max_concurrent_streams,
        },
        "max_request_headers_kb": limits.max_request_headers_kb,
        "common_http_protocol_options": {
            "max_headers_count": limits.max_headers,
            # Header names with "_" could smuggle a twin of an identity header.
            "headers_with_underscores_action": "REJECT_REQUEST",
            # An idle client connection is closed after an hour.
            "idle_timeout": "3600s",
        },
        # Long token streams: no total request timeout, only idle ones.
        "stream_idle_timeout": "300s",
        "request_headers_timeout": _duration(limits.request_headers_timeout_s),
        # See EdgeLimits.request_timeout_s.
        "request_timeout": _duration(limits.request_timeout_s),
        "generate_request_id": True,
        "early_header_mutation_extensions": [untrusted_trace_context_removal()],
        # The edge faces clients: the peer address is the client's, and a
        # client-sent x-forwarded-for is not trusted.
        "use_remote_address": True,
        # NOTE: no `internal_address_config`, on purpose. Unset, Envoy (>= 1.36)
        # takes no address as internal, so it strips x-envoy-* control headers
        # (x-envoy-upstream-rq-timeout-ms, -retry-on, -max-retries, -internal,
        # -original-path...) from every client, 127.0.0.1 included. Set with no
        # cidr_ranges (`{}`, `cidr_ranges: []`) it falls back to RFC1918 and
        # loopback as internal: a client behind a private address (a load
        # balancer's) could set them. Nothing of ours needs to be internal (the
        # JWKS and /healthz self-calls read no x-envoy-* header).
        # tests/e2e/test_edge_envoy_headers.py holds it.
        "access_log": access_log(config.access_log_path),
        "local_reply_config": local_reply_config(),
        "http_filters": [
            *([hsts_filter()] if tls else []),
            *_strip_filters(config),
            # Drops header names gRPC cannot carry (they made every upstream call
            # fail), refuses a body declared too large (before auth reads it) and
            # gates gRPC Health/Check on /healthz: one Lua coroutine.
            edge_lua.request_filter(),
            # A REST body of undeclared size, bounded before anything reads it (the
            # request Lua refused one declared too large).
            *request_body.unsized_body_filters(),
            health_filter(sorted({*config.upstreams, "inference"})),
            # Before the transcoder: on the way back it sees the REST response
            # (OpenAI error bodies, REST error statuses: one Lua coroutine).
            edge_lua.response_filter(),
            # Prefer: respond-async only (a route turns it off for other Completes).
            handover.transcoder_filter(config.descriptor_path),
            transcoder_filter(config.descriptor_path),
            # Upstream of the transcoders: the worker's own status, for the access log.
            upstream_status_filter(),
            *_auth_filters(config),
            *([model_routing.lua_filter()] if config.xds and config.model_routing else []),
            *_ratelimit_filters(config),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _type("extensions.filters.http.router.v3.Router")},
            },
        ],
    }
    if config.xds is not None:
        hcm["rds"] = {
            "config_source": {"ads": {}, "resource_api_version": "V3"},
            "route_config_name": "edge",
        }
    else:
        hcm["route_config"] = route_configuration(config.auth)
    if config.otlp_endpoint is not None:
        hcm["tracing"] = tracing("otlp")
    return hcm


#: Trace context a client may send; the edge starts every trace itself.
CLIENT_TRACE_HEADERS = ("traceparent", "tracestate", "baggage", "x-client-trace-id")


def untrusted_trace_context_removal() -> dict[str, Any]:
    """Drops a client's trace context before the tracer reads it (early: before routing).

    Honoured, it let a caller pick its request's trace id (the audit log records
    it), put its spans into another request's trace, and switch tracing off for
    its own requests (a `-00` traceparent: not one span exported, by the edge or
    a service). Each request's trace now starts at the edge; the request id
    (`x-request-id`, also the edge's own) ties a client's report to it.
    """
    return {
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": _type(
                "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation"
            ),
            "mutations": [{"remove": name} for name in CLIENT_TRACE_HEADERS],
        },
    }


def hsts_filter() -> dict[str, Any]:
    """Adds Strict-Transport-Security to every HTTPS response."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _type("extensions.filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": {
                "response_mutations": [
                    {
                        "append": {
                            "header": {"key": "strict-transport-security", "value": HSTS},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ]
            },
        },
    }


def _strip_filters(config: EdgeConfig) -> list[dict[str, Any]]:
    """Removes headers only the edge may set, before anything can trust them, on every
    edge: one without auth too (its callers are anonymous: workers trust the edge's
    identity headers, so a client's copies named any key, tenant or scope, admin
    included; and a client's x-tokenmesh-shadow made its request an unmetered mirror)."""
    return [edge_auth.strip_headers_filter(STRIPPED_HEADERS)]


def _auth_filters(config: EdgeConfig) -> list[dict[str, Any]]:
    if config.auth is None:
        return []
    cache = config.auth.api_key_cache
    return [
        edge_auth.jwt_filter(config.auth, config.listen_port),
        *([key_cache.lua_filter(), edge_auth.jwt_key_check_filter()] if cache else []),
        edge_auth.ext_authz_filter(key_cache_on=cache),
        edge_auth.rbac_filter(),
    ]


def _ratelimit_filters(config: EdgeConfig) -> list[dict[str, Any]]:
    if config.auth is None or not config.auth.ratelimit:
        return []
    return [edge_auth.ratelimit_filter(config.auth.ratelimit_failure_mode_deny)]


def listeners(config: EdgeConfig) -> list[dict[str, Any]]:
    """Builds the plaintext listener and, when configured, the TLS one."""
    result = [_listener("edge", Endpoint(config.listen_host, config.listen_port), config)]
    if config.tls is not None:
        if config.sds_dir is None:
            raise ValueError("the edge's TLS listener needs sds_dir (its certificate's SDS file)")
        endpoint = Endpoint(config.tls.host, config.tls.port)
        result.append(_listener("edge_tls", endpoint, config, downstream_tls(config.sds_dir)))
    if config.stats is not None:
        result.append(stats_listener.stats_listener(config.stats.host, config.stats.port))
    if not config.exclusive_ports:
        return result
    return [exclusive(listener) for listener in result]


def exclusive(listener: dict[str, Any]) -> dict[str, Any]:
    """Returns `listener` bound without SO_REUSEPORT, so its port is this Envoy's alone.

    Envoy (1.40 on Linux) sets SO_REUSEPORT on listeners by default: a second
    Envoy, or any process setting it, then binds the same fixed port without an
    error and the kernel splits new connections between the two (a second `make
    run` answered half the clients of the first). Without it the second bind
    fails with "address in use". The cost: Envoy's worker threads then accept
    from one shared socket, and connections spread less evenly across them
    (with 4 workers the busiest took ~1.8x its share, against ~1.2x with
    SO_REUSEPORT), so a deployed edge, whose port nothing else can bind, keeps
    the default (`EdgeConfig.exclusive_ports`).
    """
    return {**listener, "enable_reuse_port": False}


def _listener(
    name: str, endpoint: Endpoint, config: EdgeConfig, transport: dict[str, Any] | None = None
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": http_connection_manager(config, tls=transport is not None),
            }
        ]
    }
    if transport is not None:
        chain["transport_socket"] = transport
    return {
        "name": name,
        "address": _socket_address(endpoint),
        "per_connection_buffer_limit_bytes": config.limits.connection_buffer_bytes,
        "filter_chains": [chain],
    }


def overload_manager(limits: EdgeLimits) -> dict[str, Any]:
    """Builds the overload manager: a global connection cap and heap thresholds that shed load."""
    heap = "envoy.resource_monitors.fixed_heap"

    def on_heap(action: str, threshold: float) -> dict[str, Any]:
        return {"name": action, "triggers": [{"name": heap, "threshold": {"value": threshold}}]}

    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _type(
                        "extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig"
                    ),
                    "max_active_downstream_connections": limits.max_connections,
                },
            },
            {
                "name": heap,
                "typed_config": {
                    "@type": _type("extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig"),
                    "max_heap_size_bytes": limits.max_heap_bytes,
                },
            },
        ],
        "actions": [
            on_heap("envoy.overload_actions.shrink_heap", 0.90),
            on_heap("envoy.overload_actions.disable_http_keepalive", 0.92),
            on_heap("envoy.overload_actions.stop_accepting_requests", 0.95),
        ],
    }


# How the edge's ADS stream reconnects to a router that went away: Envoy's default
# backoff (0.5 s, doubling to 30 s) resubscribed 7.6 and 10.5 s after the router was
# back from a 10 s outage, its routing changes (a rollback, say) unapplied there
# meanwhile; 3.1 and 3.7 s with this (tests/unit/test_edge_lua.py).
XDS_RECONNECT = {"retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}}


def auth_checks_cluster(config: EdgeConfig) -> dict[str, Any]:
    """The auth service's cluster again, under edge_auth.AUTH_CHECKS_CLUSTER: the edge's
    ext_authz callouts only, apart from clients' own requests to the auth service."""
    built = cluster(
        "auth", config.upstreams["auth"], config.health_check_interval_s, config.sds_dir
    )
    built["name"] = edge_auth.AUTH_CHECKS_CLUSTER
    built["load_assignment"]["cluster_name"] = edge_auth.AUTH_CHECKS_CLUSTER
    return built


def bootstrap(config: EdgeConfig) -> dict[str, Any]:
    """Builds the whole Envoy bootstrap for the edge."""
    clusters = [
        cluster(name, endpoints, config.health_check_interval_s, config.sds_dir)
        for name, endpoints in sorted(config.upstreams.items())
    ]
    if config.auth is not None and "auth" in config.upstreams:
        clusters.append(auth_checks_cluster(config))
    if config.otlp_endpoint is not None:
        clusters.append(single_host_cluster("otlp", config.otlp_endpoint, http2=True, ping=False))
    # The edge's own plaintext listener, wherever it is bound (an edge bound to one
    # address only, not to 127.0.0.1, could not fetch its JWKS: every JWT refused).
    own_listener = Endpoint(_loopback_or(config.listen_host), config.listen_port)
    if config.auth is not None:
        # jwt_authn fetches the JWKS through the edge's own listener.
        clusters.append(single_host_cluster("jwks", own_listener, http2=False))
    # gRPC health for service "" asks this edge's own /healthz (gateway/edge_health.py).
    clusters.append(single_host_cluster(edge_health.SELF_CLUSTER, own_listener, http2=False))
    clusters.extend(dict(c) for c in config.extra_clusters)
    if config.stats is not None:
        clusters.append(admin.cluster(stats_listener.ADMIN_CLUSTER, config.admin_socket))
    result: dict[str, Any] = {
        "node": {
            "id": config.node_id,
            "cluster": "edge",
            # The control plane builds this edge's routes from these flags.
            "metadata": {
                "tokenmesh_auth": config.auth is not None,
                "tokenmesh_ratelimit": bool(config.auth and config.auth.ratelimit),
                # Where this edge's SDS files are: its clusters from xDS use them too.
                "tokenmesh_sds_dir": str(config.sds_dir or ""),
                "tokenmesh_prefix_affinity": config.prefix_affinity,
                "tokenmesh_load_aware": config.load_aware,
            },
        },
        "admin": {"address": admin.address(config.admin_socket)},
        "static_resources": {"listeners": listeners(config), "clusters": clusters},
        "overload_manager": overload_manager(config.limits),
    }
    if config.xds is not None:
        # ADS must speak HTTP/2, else Envoy hangs silently at cluster-manager init.
        xds = single_host_cluster("xds", config.xds, http2=True)
        clusters.append(with_upstream_tls(xds, config.sds_dir, UPSTREAM_IDENTITY["xds"]))
        result["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {"envoy_grpc": {"cluster_name": "xds"}, "retry_policy": XDS_RECONNECT}
                ],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        }
    return result


def _loopback_or(listen_host: str) -> str:
    """Returns where the edge reaches its own plaintext listener bound to `listen_host`."""
    return "127.0.0.1" if listen_host in ("0.0.0.0", "::", "") else listen_host


def single_host_cluster(
    name: str, endpoint: Endpoint, *, http2: bool, ping: bool = True
) -> dict[str, Any]:
    """Builds a cluster of one host (an IP, or a DNS name resolved by Envoy); `ping`
    as in h2_options."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip(endpoint.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": load_assignment(name, [endpoint]),
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 30}},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = h2_options(ping=ping)
    return cluster
