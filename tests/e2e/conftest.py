"""Helpers for calling the edge as an authenticated client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import pytest

from services.launcher.mesh import Mesh
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc


def edge_hosts(mesh: Mesh, cluster: str) -> dict[str, dict[str, str]]:
    """Returns each host of an edge cluster with its `weight` and `health_flags`,
    as Envoy's admin lists them (what its load balancer picks from)."""
    listing = mesh.admin("/clusters")
    hosts: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        name, _, rest = line.partition("::")
        host, _, stat = rest.partition("::")
        key, _, value = stat.partition("::")
        if name == cluster and key in ("weight", "health_flags"):
            hosts.setdefault(host, {})[key] = value
    return hosts


T = TypeVar("T")


def wait_for_healthy_hosts(mesh: Mesh, clusters: Sequence[str], count: int) -> None:
    """Waits until each of the edge's `clusters` has `count` healthy hosts (a started
    worker takes traffic only once the edge's own health check of it passed)."""

    def healthy(cluster: str) -> int:
        hosts = edge_hosts(mesh, cluster).values()
        return sum(host.get("health_flags") == "healthy" for host in hosts)

    deadline = time.monotonic() + 30
    while not all(healthy(cluster) == count for cluster in clusters):
        assert time.monotonic() < deadline, {c: edge_hosts(mesh, c) for c in clusters}
        time.sleep(0.1)


def _sends_to(route: dict[str, Any], cluster: str) -> bool:
    """Whether a route sends to `cluster` ("model:<name>:<version>"), or through its
    fallback's aggregate cluster ("fallback:<name>:<version>")."""
    action = route.get("route", {})
    names = {action.get("cluster")} | {
        target.get("name") for target in action.get("weighted_clusters", {}).get("clusters", [])
    }
    return cluster in names or f"fallback:{cluster.removeprefix('model:')}" in names


def edge_routes(mesh: Mesh, edge: str = "envoy") -> list[dict[str, Any]]:
    """Every route of an edge's dynamic route configuration, as its Envoy applied it."""
    dump = json.loads(mesh.admin("/config_dump?resource=dynamic_route_configs", name=edge))
    return [
        route
        for config in dump.get("configs", [])
        for host in config.get("route_config", {}).get("virtual_hosts", [])
        for route in host.get("routes", [])
    ]


def edge_placement(mesh: Mesh, cluster: str) -> tuple[dict[str, Any], list[Any]]:
    """What decides where the edge sends a prompt head of `cluster`: its hosts (weights,
    health) and the metadata of the routes to it (the router's pins of hot heads to
    workers and the turns of unseen heads: gateway/model_routing.lua)."""
    routes = edge_routes(mesh)
    metadata = [route.get("metadata", {}) for route in routes if _sends_to(route, cluster)]
    return edge_hosts(mesh, cluster), metadata


def stable_round(mesh: Mesh, cluster: str, round_: Callable[[], T], timeout_s: float = 30) -> T:
    """Runs `round_` until where the edge sends a prompt head of `cluster`
    (`edge_placement`) stayed the same throughout, and returns its result.

    Maglev picks a worker by the hosts' weights and health, unless the router
    pinned the head to one. Load-aware weights move with the workers' TTFT, and
    pins with the heads' heat (other tests' traffic moves both; a round's own heads
    are pinned once hot, and a lone head is pinned while others' heat dwarfs it and
    unpinned once it is most of it), so a round during which they changed proves
    nothing about where a hash key lands. Pins move only past a noise bound, so
    the rounds settle; tried until `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    rounds = 0
    while True:
        placement = edge_placement(mesh, cluster)
        assert placement[0], f"the edge has no cluster {cluster}"
        result = round_()
        rounds += 1
        after = edge_placement(mesh, cluster)
        if after == placement:
            return result
        if time.monotonic() > deadline:
            changed = [
                part
                for part, a, b in zip(("hosts", "routes"), placement, after, strict=True)
                if a != b
            ]
            raise AssertionError(
                f"where {cluster}'s heads go ({' and '.join(changed)}) changed during each"
                f" of {rounds} rounds in {timeout_s:.0f} s; the last: {placement} -> {after}"
            )


#: Requests that make every Envoy thread of an edge see a prompt head, with new
#: connections (each lands on one of the edge's 2 threads, as the kernel picks):
#: a thread that never got one is 2 * 2**-16 likely.
SEE_HEAD_REQUESTS = 16


def seen_by_the_edge(send: Callable[[], object], requests: int = SEE_HEAD_REQUESTS) -> None:
    """Sends a prompt head through the edge until each of its Envoy threads has seen it.

    A thread sends a head it has not seen where the route's next turn says (a head
    nobody sent is cached nowhere; gateway/model_routing.lua), and the head's later
    requests where the routes' hash points: tests of where a head goes send it first.
    """
    for _ in range(requests):
        send()


def spread_of(
    mesh: Mesh, cluster: str, worker_of: Callable[[str], str], timeout_s: float = 30.0
) -> set[str]:
    """Returns the workers that requests of distinct prompt heads ("0 ", "1 ", ...)
    reached, drawing heads until every host of `cluster` was seen (or 30 s).

    Every head hashes on its own, but a fixed number of heads can miss a worker
    by chance (its weight far below its peer's), and a worker the edge has just
    marked healthy takes its first requests a moment later (the edge applies
    health changes in 0.25 s batches).
    """
    hosts = edge_hosts(mesh, cluster)
    assert all(host["health_flags"] == "healthy" for host in hosts.values()), hosts
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    for n in range(1000):
        seen.add(worker_of(f"{n} "))
        if len(seen) == len(hosts) or time.monotonic() > deadline:
            break
    return seen


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (credentials) to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = list(metadata)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def authed_channel(address: str, metadata: Sequence[tuple[str, str]]) -> grpc.Channel:
    """Returns a channel that sends `metadata` (e.g. x-api-key) on every call."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _Metadata(metadata))


def model_limited_key_channel(
    mesh: Mesh, admin: grpc.Channel, name: str, allowed_models: Sequence[str]
) -> grpc.Channel:
    """Returns a channel to the edge as a new key of tenant "acme" (`models:read`,
    `inference:generate`) that may use only `allowed_models`; `admin` creates it."""
    created = auth_service_pb2_grpc.AuthServiceStub(admin).CreateApiKey(
        auth_service_pb2.CreateApiKeyRequest(
            tenant="acme",
            name=name,
            scopes=["models:read", "inference:generate"],
            allowed_models=list(allowed_models),
            limits=auth_pb2.KeyLimits(),
        ),
        timeout=10,
    )
    return authed_channel(mesh.edge_address, [("x-api-key", created.secret)])


@pytest.fixture(scope="session")
def admin_key(mesh) -> str:
    """The dev admin API key the auth service created on first start."""
    return str(mesh.dev_api_key())


@pytest.fixture(scope="module")
def channel(mesh, admin_key) -> Iterator[grpc.Channel]:
    """A gRPC channel to the edge that authenticates with the admin key."""
    with authed_channel(mesh.edge_address, [("x-api-key", admin_key)]) as channel:
        yield channel
