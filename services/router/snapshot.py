"""Pure functions from (catalogue, workers, time) to the Envoy resources the edge routes by.

- one EDS cluster per model version (`model:NAME:VERSION`), with gRPC health
  checks of that version's readiness, outlier detection and circuit breakers;
- an aggregate cluster (`fallback:NAME:VERSION`) in front of it when the
  model has a fallback: Envoy fails over to the fallback model's primary
  version when the version has no healthy worker;
- `inference`: every serving worker (ListModels, GetModel, unknown models);
- the route configuration: per model, exact-version routes (versions and
  aliases), then a weighted split (or the pin) for requests without one.

The Lua filter at the edge copies a request's model and version (from the
protobuf body, so REST and gRPC alike) into `x-tokenmesh-model` and
`x-model-version`; routes match those headers and tell the worker what to
serve in `x-tokenmesh-route-*` headers. Nothing here does I/O: the same
inputs always give the same resources and versions.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import edge_auth, envoy_config, grpc_paths, model_routing
from gateway.envoy_config import Endpoint
from gateway.model_routing import (
    FALLBACK_MODEL_HEADER,
    FALLBACK_VERSION_HEADER,
    INFERENCE_ROUTE_PREFIX,
    MODEL_HEADER,
    PREFIX_HEADER,
    ROUTE_MODEL_HEADER,
    ROUTE_VERSION_HEADER,
    VERSION_HEADER,
    model_health_name,
)
from services.core import contract
from services.router import prefix_pins, shadow
from services.router.catalog import ModelEntry, retired_model_text, version_sunset_text
from services.router.load_weights import NEUTRAL_WEIGHT
from services.router.registry import WorkerEntry

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
INFERENCE_CLUSTER = "inference"


@dataclass(frozen=True)
class EdgeFlags:
    """EdgeFlags are the parts of an edge's setup its routes depend on (node metadata)."""

    auth: bool = True
    ratelimit: bool = True
    # The edge's SDS directory: its worker clusters speak mTLS ("" = plaintext).
    sds_dir: str = ""
    # False: this edge routes model versions round robin even where the control
    # plane hashes prompt heads (an edge of its own for comparing the two).
    prefix_affinity: bool = True
    # False: this edge's endpoints all weigh the same, whatever the workers' load
    # (an edge of its own for comparing the two: bench L1).
    load_aware: bool = True

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> EdgeFlags:
        """Reads the flags an edge put in its bootstrap's node metadata."""
        return cls(
            auth=bool(metadata.get("tokenmesh_auth", True)),
            ratelimit=bool(metadata.get("tokenmesh_ratelimit", True)),
            sds_dir=str(metadata.get("tokenmesh_sds_dir", "")),
            prefix_affinity=bool(metadata.get("tokenmesh_prefix_affinity", True)),
            load_aware=bool(metadata.get("tokenmesh_load_aware", True)),
        )


@dataclass(frozen=True)
class ClusterOptions:
    """ClusterOptions tune the clusters the control plane hands out.

    Attributes:
        health_check_interval_s: how often each edge checks each worker.
        prefix_affinity: model-version clusters pick a worker by a hash of the
            prompt's head (Maglev, bounded load): prompts that start the same
            way reach the same worker's prefix cache. Off: round robin.
        load_aware: endpoints weigh what the workers' load reports earned them
            (services.router.load_weights). Off: every endpoint weighs the same.
    """

    health_check_interval_s: float = 1.0
    prefix_affinity: bool = True
    load_aware: bool = True


# With prefix affinity, no worker takes more than this share (in %) of the
# average active requests: a hot prompt spills over instead of piling up. The
# router's pins leave a head past it to the hash (prefix_pins owns the number).
HASH_BALANCE_FACTOR = prefix_pins.HASH_BALANCE_FACTOR


#: Per model version, hot prompt heads pinned to a worker: head -> address.
Pins = Mapping[tuple[str, str], Mapping[str, str]]


@dataclass(frozen=True)
class Placement:
    """Placement is what the edge's Lua filter reads from a route to place a prompt head.

    Per (model, version): `pins`, the hot heads pinned to a worker (`version_pins`), and
    `workers`, one cycle of weighted turns (override addresses, `spread_workers`) for a
    head the edge has not seen lately (a head nobody has sent is cached nowhere: its
    place is chosen by load, not by hash; from its next request on, the hash keeps it
    on one worker).
    """

    pins: Pins = field(default_factory=dict)
    workers: Mapping[tuple[str, str], Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    """Resources is one consistent set of xDS resources (as JSON-shaped dicts) by type URL
    (`pins`: the prefix pins its routes carry, the next build's starting point)."""

    by_type: Mapping[str, Mapping[str, dict[str, Any]]]
    pins: Pins = field(default_factory=dict)

    def version(self, type_url: str) -> str:
        """Returns a content hash of one type's resources (same content, same version)."""
        blob = json.dumps(self.by_type.get(type_url, {}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def versions(self) -> dict[str, str]:
        """Returns the version of every type."""
        return {type_url: self.version(type_url) for type_url in self.by_type}


def model_cluster(model: str, version: str) -> str:
    """Returns the cluster name of one model version."""
    return f"model:{model}:{version}"


def fallback_cluster(model: str, version: str) -> str:
    """Returns the aggregate (version, then fallback) cluster name of one model version."""
    return f"fallback:{model}:{version}"


def build(
    catalog: Mapping[str, ModelEntry],
    workers: Sequence[WorkerEntry],
    now: float,
    flags: EdgeFlags,
    options: ClusterOptions,
    ended_after: float | None = None,
    last_pins: Pins | None = None,
) -> Resources:
    """Builds every resource one edge needs (see `WorkerEntry.routable` for `ended_after`;
    `last_pins`: the previous build's, see services.router.prefix_pins)."""
    routable = [w for w in workers if w.routable(now, ended_after)]
    served = _served_versions(catalog, now)
    affinity = options.prefix_affinity and flags.prefix_affinity
    weighted = options.load_aware and flags.load_aware
    clusters = {
        INFERENCE_CLUSTER: eds_cluster(
            INFERENCE_CLUSTER, envoy_config.HEALTH_SERVICE[INFERENCE_CLUSTER], options, flags
        )
    }
    endpoints = {INFERENCE_CLUSTER: load_assignment(INFERENCE_CLUSTER, routable, weighted)}
    pins: dict[tuple[str, str], dict[str, str]] = {}
    spread: dict[tuple[str, str], list[str]] = {}
    for model, version in served:
        name = model_cluster(model, version)
        placement = catalog.get(model)
        pools = placement.worker_pools if placement is not None else frozenset()
        clusters[name] = eds_cluster(
            name, model_health_name(model, version), options, flags, affinity, pools
        )
        hosts = [w for w in routable if w.serves(model, version, placement)]
        # Each worker weighs what it earned in this cluster, next to this cluster's
        # workers only (WorkerEntry.weight_in), in its endpoints, pins and turns alike.
        endpoints[name] = load_assignment(name, hosts, weighted, (model, version))
        if affinity:
            last = (last_pins or {}).get((model, version), {})
            pins[(model, version)] = version_pins(model, version, hosts, now, weighted, last)
            spread[(model, version)] = spread_workers(hosts, weighted, (model, version))
    for entry in catalog.values():
        fallback = _fallback_target(entry, catalog, now)
        if fallback is None:
            continue
        for serving in entry.versions:
            if not serving.sunset(now):
                name = fallback_cluster(entry.name, serving.version)
                clusters[name] = aggregate_cluster(
                    name, [model_cluster(entry.name, serving.version), model_cluster(*fallback)]
                )
    return Resources(
        {
            CLUSTER_TYPE: clusters,
            ENDPOINT_TYPE: endpoints,
            ROUTE_TYPE: {
                "edge": route_configuration(catalog, now, flags, affinity, Placement(pins, spread))
            },
        },
        pins,
    )


def _served_versions(catalog: Mapping[str, ModelEntry], now: float) -> list[tuple[str, str]]:
    """Every (model, version) not sunset gets a cluster, even with no worker yet (so
    routes and fallbacks stay valid while workers come and go)."""
    return sorted(
        (entry.name, v.version)
        for entry in catalog.values()
        for v in entry.versions
        if not v.sunset(now)
    )


def _fallback_target(
    entry: ModelEntry, catalog: Mapping[str, ModelEntry], now: float
) -> tuple[str, str] | None:
    fallback = catalog.get(entry.fallback) if entry.fallback else None
    if fallback is None:
        return None
    version = fallback.primary_version(now)
    return (fallback.name, version) if version else None


UPDATE_MERGE_WINDOW = "0.25s"

# Ejection only on what Envoy itself sees fail: connect failures, resets and
# timeouts (local-origin errors). A status a live worker answers is not such
# evidence: Envoy reads gRPC statuses as HTTP codes (UNIMPLEMENTED 501,
# DEADLINE_EXCEEDED 504, UNAVAILABLE 503), so counting them let any caller
# eject a healthy worker with a few refused requests (a retired API version, a
# deadline too short to meet), and shed load onto the rest by ejecting the
# worker that refused for overload. A worker that cannot serve says so in its
# health check (NOT_SERVING), which takes it out.
OUTLIER_DETECTION: dict[str, Any] = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 2,
    "enforcing_consecutive_5xx": 0,
    "enforcing_consecutive_gateway_failure": 0,
    "enforcing_success_rate": 0,
    "interval": "1s",
    "base_ejection_time": "10s",
    "max_ejection_percent": 50,
}


def eds_cluster(
    name: str,
    health_service: str,
    options: ClusterOptions,
    flags: EdgeFlags,
    hashed: bool = False,
    worker_pools: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Builds an HTTP/2 EDS cluster of workers, with health checks and resilience settings.

    Over mTLS (when the edge named its SDS directory), verifying each worker's identity:
    one of `worker_pools`' for a model placed on pools, else any worker's.
    hashed: pick the worker by the route's hash policy (Maglev, bounded load).
    """
    lb_config: dict[str, Any] = {
        "healthy_panic_threshold": {"value": 0},
        # Envoy applies health and weight changes to its load balancer in
        # batches, 1 s by default: a worker that turned healthy took its first
        # request ~1 s after its health check passed, and one that failed
        # kept its share as long. A handful of workers per cluster changes
        # rarely enough for 0.25 s batches.
        "update_merge_window": UPDATE_MERGE_WINDOW,
    }
    if hashed:
        lb_config["consistent_hashing_lb_config"] = {"hash_balance_factor": HASH_BALANCE_FACTOR}
    cluster = {
        "name": name,
        "lb_policy": "MAGLEV" if hashed else "ROUND_ROBIN",
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        "connect_timeout": "1s",
        "typed_extension_protocol_options": envoy_config.h2_options(),
        "health_checks": [
            envoy_config.grpc_health_check(health_service, options.health_check_interval_s)
        ],
        # A worker the router took out (drain, lease expiry) leaves the load
        # balancer at once. By default Envoy keeps a removed host that still
        # passes its health check, flagged pending_dynamic_removal, so a
        # draining worker took new requests (and pins, turns and the hash
        # could still pick it) until it stopped and failed two checks. Its
        # open streams finish: Envoy drains the removed host's connections.
        "ignore_health_on_host_removal": True,
        # No panic routing to unhealthy workers: fail over (aggregate) or answer 503.
        "common_lb_config": lb_config,
        "outlier_detection": OUTLIER_DETECTION,
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 4096,
                    "max_pending_requests": 1024,
                    # Long token streams each hold a request: allow many.
                    "max_requests": 8192,
                    "max_retries": 64,
                }
            ]
        },
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 30}},
    }
    return envoy_config.with_upstream_tls(
        cluster, flags.sds_dir or None, contract.WORKER, worker_pools
    )


def aggregate_cluster(name: str, clusters: Sequence[str]) -> dict[str, Any]:
    """Builds a cluster that uses the first of `clusters` with a healthy host."""
    return {
        "name": name,
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": list(clusters),
            },
        },
    }


def load_assignment(
    cluster: str,
    workers: Sequence[WorkerEntry],
    weighted: bool = True,
    version: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Builds one cluster's endpoints, weighted by the workers' load (load_weights) unless
    `weighted` is off (then all weigh NEUTRAL_WEIGHT): in model `version`'s cluster, by
    their weights there; elsewhere (None) by their own."""
    return envoy_config.load_assignment(
        cluster, [Endpoint(w.host, w.port, _weight(w, version, weighted)) for w in workers]
    )


def _weight(worker: WorkerEntry, version: tuple[str, str] | None, weighted: bool) -> int:
    """A worker's endpoint weight in model `version`'s cluster (None: its own weight)."""
    if not weighted:
        return NEUTRAL_WEIGHT
    return (worker.weight if version is None else worker.weight_in(*version)).weight


def version_pins(
    model: str,
    version: str,
    hosts: Sequence[WorkerEntry],
    now: float,
    weighted: bool = True,
    last: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Pins the version's hottest prompt heads to its workers (services.router.prefix_pins)."""
    holders = []
    for w in hosts:
        counts = [c for c in w.outcomes if (c.model, c.version) == (model, version)]
        heads = [h for c in counts for h in c.hot_prefixes if now - h.seen_at <= HOT_PREFIX_STALE_S]
        holders.append(
            prefix_pins.Holder(
                override_address(w.host, w.port),
                _weight(w, (model, version), weighted),
                {h.prefix: (h.requests, max(0.0, now - h.seen_at)) for h in heads},
                {h.prefix: h.prompt_tokens for h in heads if h.prompt_tokens},
                max((c.prefix_cache_tokens for c in counts), default=0),
            )
        )
    return prefix_pins.pins(holders, last)


#: Heads whose latest request is older than this are left out of the pins: workers
#: report only heads seen within 3 s (PREFIX_IDLE_S), so an older one is a report
#: that stopped being refreshed (mid-upgrade, routers of an earlier version take
#: some heartbeats and write the heads elsewhere), its count frozen.
HOT_PREFIX_STALE_S = 10.0


#: In one cycle of turns for unseen heads, the worker at the version's top weight
#: takes this many; every other worker its weight's share of it, rounded.
SPREAD_TURNS = 4


def spread_workers(
    hosts: Sequence[WorkerEntry], weighted: bool = True, version: tuple[str, str] | None = None
) -> list[str]:
    """One cycle of turns for heads the edge has not seen: each worker's override
    address as often as its load-aware weight earns (SPREAD_TURNS at the top), in
    smooth weighted round-robin order; none when the weights are off. The weights
    are those of model `version`'s cluster (None: the workers' own).

    The edge takes the turns in order, so unseen heads go where a weighted round
    robin would send them, and a worker the weights hold back (slow, saturated)
    takes few or none. Without load-aware weights the only load signal is the
    hash's bound on active requests, so unseen heads keep the hash (by equal
    turns, a slow worker took half of them: bench L1's equal-weights edge, 32 ->
    6.5 requests/s). Weights are rounded to SPREAD_TURNS levels so that the routes
    (one large resource) change only when a worker's level does, not with each
    weight move.
    """
    weights = {override_address(w.host, w.port): _weight(w, version, True) for w in hosts}
    top = max(weights.values(), default=0)
    if not weighted or top <= 0:
        return []
    turns = {address: round(SPREAD_TURNS * weight / top) for address, weight in weights.items()}
    return smooth_round_robin({address: n for address, n in turns.items() if n > 0})


def smooth_round_robin(turns: Mapping[str, int]) -> list[str]:
    """One cycle of weighted round robin with each name's turns spread out (nginx's
    smooth order): {"a": 2, "b": 1} -> ["a", "b", "a"]. Deterministic: ties go to the
    first name in sorted order."""
    total = sum(turns.values())
    credit = dict.fromkeys(sorted(turns), 0)
    order: list[str] = []
    for _ in range(total):
        for name in credit:
            credit[name] += turns[name]
        chosen = max(credit, key=lambda name: credit[name])
        credit[chosen] -= total
        order.append(chosen)
    return order


def override_address(host: str, port: int) -> str:
    """A worker's address as Envoy names its hosts (what an override host must match)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _header(
    name: str, value: str, append_action: str = "OVERWRITE_IF_EXISTS_OR_ADD"
) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": append_action}


def _match(model: str, version: str | None) -> dict[str, Any]:
    headers: list[dict[str, Any]] = [{"name": MODEL_HEADER, "string_match": {"exact": model}}]
    if version is not None:
        headers.append({"name": VERSION_HEADER, "string_match": {"exact": version}})
    return {"prefix": INFERENCE_ROUTE_PREFIX, "headers": headers}


def _streaming_action(affinity: bool = False, **target: Any) -> dict[str, Any]:
    """A route action for token streams: no total timeout, retries only before a response.

    affinity: hash the prompt's head (set by the Lua filter) to pick the worker;
    a request without one (no prompt) gets a random worker.
    """
    hashing = {"hash_policy": [{"header": {"header_name": PREFIX_HEADER}}]} if affinity else {}
    return {
        **target,
        **hashing,
        "timeout": "0s",
        # A non-streamed answer is silent until it is done (envoy_config).
        "idle_timeout": envoy_config.INFERENCE_IDLE_TIMEOUT,
        "retry_policy": {
            # Before the first response byte only (Envoy never retries after
            # it forwarded response headers): a dead or draining worker costs
            # the client nothing. A call a stopping worker took but never
            # started ends with a bare status, seen as CANCELLED in a drain
            # under load: no response byte went out, so it is retried too.
            "retry_on": "connect-failure,refused-stream,unavailable,cancelled,reset",
            "num_retries": 2,
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host"
                        ".previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            # How many picks a retry gets to find a host it has not tried. The
            # routes hash (Maglev): each re-pick is a perturbed hash, a draw
            # weighted by the workers' load-aware weights (5 to 100). Even, 3
            # picks put a retry back on the dead worker 1 time in 8, and a drain
            # under load failed requests that way; 10 picks made that 1 in 1,000,
            # but at 100 to 5 a pick finds the live worker 1 time in 21, and 10
            # picks missed it 6 times in 10. 100 picks: 1 in 130 a retry, and a
            # request gets two (a pick costs a table lookup).
            "host_selection_retry_max_attempts": 100,
        },
    }


def _weighted_target(
    entry: ModelEntry,
    version: str,
    weight: int,
    fallback: tuple[str, str] | None,
) -> dict[str, Any]:
    """One version as a weighted-cluster entry: where it goes, what the worker is told."""
    request_headers = [
        _header(ROUTE_MODEL_HEADER, entry.name),
        _header(ROUTE_VERSION_HEADER, version),
    ]
    if fallback is not None:
        request_headers += [
            _header(FALLBACK_MODEL_HEADER, fallback[0]),
            _header(FALLBACK_VERSION_HEADER, fallback[1]),
        ]
    target: dict[str, Any] = {
        "name": fallback_cluster(entry.name, version)
        if fallback
        else model_cluster(entry.name, version),
        "weight": weight,
        "request_headers_to_add": request_headers,
    }
    deprecation = _deprecation_headers(entry, version)
    if deprecation:
        target["response_headers_to_add"] = deprecation
    return target


def _deprecation_headers(entry: ModelEntry, version: str) -> list[dict[str, Any]]:
    """RFC 9745 Deprecation and RFC 8594 Sunset headers of a deprecated version.

    Added beside the answer's own: a deprecated API version's service sends them
    too, and the edge's response filter keeps the earliest of each
    (gateway/response_headers.py). Replacing them told a v1 client the model
    version's sunset when v1's came first.
    """
    found = entry.version(version)
    if found is None or found.deprecated_at is None:
        return []
    added = "APPEND_IF_EXISTS_OR_ADD"
    headers = [_header("deprecation", f"@{int(found.deprecated_at)}", added)]
    if found.sunset_at is not None:
        sunset = email.utils.formatdate(found.sunset_at, usegmt=True)
        headers.append(_header("sunset", sunset, added))
    return headers


def model_routes(
    entry: ModelEntry,
    catalog: Mapping[str, ModelEntry],
    now: float,
    affinity: bool = False,
    placement: Placement | None = None,
) -> list[dict[str, Any]]:
    """Routes of one model: explicit versions and aliases first, then the split.

    affinity: version routes hash the prompt's head (see `_streaming_action`).
    placement: pinned heads and the workers to spread unseen heads over, carried in
    the routes' metadata for the edge's Lua filter.
    """
    placed = placement or Placement()
    fallback = _fallback_target(entry, catalog, now)
    routes: list[dict[str, Any]] = []
    labels = [(v.version, v.version) for v in entry.versions]
    labels += sorted(entry.aliases.items())
    latest = entry.latest_version(now)
    if latest is not None and "latest" not in entry.aliases and entry.version("latest") is None:
        labels.append(("latest", latest))  # unless set explicitly
    for label, version in labels:
        found = entry.version(version)
        if found is None:
            continue
        if found.sunset(now):
            routes += _sunset_routes(entry.name, label, found.sunset_at or now)
            continue
        target = _weighted_target(entry, version, 1, fallback)
        route = {
            "match": _match(entry.name, label),
            "route": _streaming_action(affinity, weighted_clusters={"clusters": [target]}),
            **_placement_metadata(placed, entry.name, [version]),
        }
        routes += _shadowed(route, entry, now, frozenset({version}))
    # A version the catalogue does not know: any worker answers (NOT_FOUND, or the
    # version if a worker loaded it outside the catalogue), never another version.
    unknown_version = _match(entry.name, None)
    unknown_version["headers"].append({"name": VERSION_HEADER, "present_match": True})
    if entry.worker_pools:
        # A placed model's requests reach its pools only; `inference` holds every worker.
        routes += _not_found_routes(unknown_version, unknown_version_text(entry.name))
    else:
        routes.append(
            {"match": unknown_version, "route": _streaming_action(cluster=INFERENCE_CLUSTER)}
        )
    weights = entry.effective_weights(now)
    if weights:
        targets = [_weighted_target(entry, v, w, fallback) for v, w in sorted(weights.items())]
        route = {
            "match": _match(entry.name, None),
            "route": _streaming_action(affinity, weighted_clusters={"clusters": targets}),
            **_placement_metadata(placed, entry.name, sorted(weights)),
        }
        routes += _shadowed(route, entry, now, frozenset(weights))
    elif entry.versions:
        # Every version was sunset. Without a route of its own, a request naming
        # no version fell through to `inference`, and a worker that still loads
        # a retired version served it (without its Deprecation or Sunset).
        routes += _retired_model_routes(entry, now)
    return routes


def _placement_metadata(
    placement: Placement, model: str, versions: Sequence[str]
) -> dict[str, Any]:
    """Route metadata with the placement of the versions a route splits over ({} if none).

    A head pinned in two versions keeps the first's. When the split picks the
    other version, the override still applies if that worker serves it too;
    if not, the non-strict override falls back to the hash. The same holds for
    an unseen head sent to a worker of the version the split did not pick.
    """
    merged: dict[str, Any] = {}
    for version in versions:
        for head, address in placement.pins.get((model, version), {}).items():
            merged.setdefault(head, address)
    workers = [a for v in versions for a in placement.workers.get((model, v), ())]
    if len(set(workers)) > 1:  # one worker: the hash picks it anyway
        merged[model_routing.SPREAD_KEY] = workers
    if not merged:
        return {}
    return {"metadata": {"filter_metadata": {model_routing.LUA_FILTER_NAME: merged}}}


def _shadowed(
    route: dict[str, Any], entry: ModelEntry, now: float, serves: frozenset[str]
) -> list[dict[str, Any]]:
    """Adds the model's shadow traffic (services.router.shadow) to one of its routes: the
    route, or its unmirrored lookup routes and then it, mirrored."""
    return shadow.with_shadow(
        route, entry, now, model_cluster(entry.name, entry.shadow_version), serves
    )


def _sunset_routes(model: str, label: str, sunset_at: float) -> list[dict[str, Any]]:
    """The edge answers a request for a sunset version (or an alias of one) itself."""
    return _not_found_routes(_match(model, label), version_sunset_text(model, label, sunset_at))


def _retired_model_routes(entry: ModelEntry, now: float) -> list[dict[str, Any]]:
    """The edge answers a request naming no version of a model whose versions were all
    sunset, as it answers one naming a sunset version."""
    last = max((v.sunset_at or now for v in entry.versions), default=now)
    return _not_found_routes(_match(entry.name, None), retired_model_text(entry.name, last))


def unknown_version_text(model: str) -> str:
    """The NOT_FOUND text the edge answers for a version of a placed model that the
    catalogue does not know."""
    return f"model {model!r} has no version of that name in the catalogue"


def _not_found_routes(match: dict[str, Any], message: str) -> list[dict[str, Any]]:
    """Routes the edge answers 404 with `message` itself: native gRPC gets NOT_FOUND with
    `message` as its grpc-message (the edge's local-reply mapper keeps the body as plain
    text), REST the JSON error (code 5).

    The status of a native gRPC request is set on a route of its own: without one,
    Envoy derives UNIMPLEMENTED from the 404 ("no such RPC"), and a REST reply given
    one showed it as a `grpc-status` header.
    """
    native = {**match, "headers": [*match["headers"], *grpc_paths.native_grpc_request()]}
    body = {"status": 404, "body": {"inline_string": message}}
    return [
        {
            "match": native,
            "direct_response": body,
            "response_headers_to_add": [grpc_paths.grpc_status_header(grpc_paths.NOT_FOUND)],
        },
        {"match": match, "direct_response": body},
    ]


def route_configuration(
    catalog: Mapping[str, ModelEntry],
    now: float,
    flags: EdgeFlags,
    affinity: bool = False,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Builds the edge's whole route configuration (affinity, placement: see `model_routes`)."""
    per_model = [
        r
        for name in sorted(catalog)
        for r in model_routes(catalog[name], catalog, now, affinity, placement)
    ]
    auth = edge_auth.EdgeAuth(ratelimit=flags.ratelimit) if flags.auth else None
    return envoy_config.route_configuration(auth, per_model)
