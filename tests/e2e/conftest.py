"""Helpers for calling the edge as an authenticated client."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import httpx
import pytest

from services.launcher.mesh import Mesh


def edge_hosts(mesh: Mesh, cluster: str) -> dict[str, dict[str, str]]:
    """Returns each host of an edge cluster with its `weight` and `health_flags`,
    as Envoy's admin lists them (what its load balancer picks from)."""
    listing = httpx.get(f"http://127.0.0.1:{mesh.admin_port}/clusters", timeout=5).text
    hosts: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        name, _, rest = line.partition("::")
        host, _, stat = rest.partition("::")
        key, _, value = stat.partition("::")
        if name == cluster and key in ("weight", "health_flags"):
            hosts.setdefault(host, {})[key] = value
    return hosts


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


@pytest.fixture(scope="session")
def admin_key(mesh) -> str:
    """The dev admin API key the auth service created on first start."""
    return str(mesh.dev_api_key())


@pytest.fixture(scope="module")
def channel(mesh, admin_key) -> Iterator[grpc.Channel]:
    """A gRPC channel to the edge that authenticates with the admin key."""
    with authed_channel(mesh.edge_address, [("x-api-key", admin_key)]) as channel:
        yield channel
