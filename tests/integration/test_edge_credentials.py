"""The edge's routes forward a client's credentials to the auth service only.

A real Envoy runs the edge's route table (gateway.envoy_config.route_configuration)
in front of a real gRPC server that records what reaches it, standing in as every
upstream cluster: the routes' header rules are what is under test, not a service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from gateway import edge_lua, envoy_config
from gateway.edge_auth import EdgeAuth, strip_headers_filter
from gateway.envoy_config import Endpoint
from services.core.server import SERVER_OPTIONS
from services.launcher.processes import reserve_port
from tests.envoy_process import running_envoy

CREDENTIALS = [("authorization", "Bearer tm_" + "a" * 40), ("x-api-key", "tm_" + "b" * 40)]


class _Recorder(grpc.GenericRpcHandler):
    """Records each call's metadata by method; answers nothing (UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, str]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        metadata = handler_call_details.invocation_metadata
        self.seen[handler_call_details.method] = {k: str(v) for k, v in metadata}
        return None


def _bootstrap(
    listen: int, admin: int, upstream: int, filters: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    clusters = [
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": envoy_config.h2_options(),
            "load_assignment": envoy_config.load_assignment(
                name, [Endpoint("127.0.0.1", upstream)]
            ),
        }
        for name in envoy_config.UPSTREAM_IDENTITY
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "route_config": envoy_config.route_configuration(EdgeAuth()),
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
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
            ],
            "clusters": clusters,
        },
    }


@pytest.fixture
def edge_and_recorder(tmp_path: Path) -> Iterator[tuple[str, int, _Recorder]]:
    listen, admin, upstream = reserve_port(), reserve_port(), reserve_port()
    with running_envoy(_bootstrap(listen, admin, upstream), admin, tmp_path):
        yield f"127.0.0.1:{listen}", upstream, _Recorder()


async def _call_through(
    edge: str,
    upstream: int,
    recorder: _Recorder,
    methods: list[str],
    metadata: Sequence[tuple[str, str]] = tuple(CREDENTIALS),
) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)  # as ours: the edge pings it
    server.add_generic_rpc_handlers((recorder,))
    server.add_insecure_port(f"127.0.0.1:{upstream}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(edge) as channel:
            for method in methods:
                call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call(b"", metadata=metadata, timeout=10)
                assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


def test_only_the_auth_service_receives_a_clients_credentials(edge_and_recorder):
    edge, upstream, recorder = edge_and_recorder
    worker = "/tokenmesh.inference.v1.InferenceService/ListModels"
    jobs = "/tokenmesh.jobs.v1.JobsService/ListJobs"
    usage = "/tokenmesh.usage.v1.UsageService/GetUsage"
    auth = "/tokenmesh.auth.v1.AuthService/ListApiKeys"
    asyncio.run(_call_through(edge, upstream, recorder, [worker, jobs, usage, auth]))

    assert set(recorder.seen) == {worker, jobs, usage, auth}  # each reached an upstream
    for method in (worker, jobs, usage):
        assert "authorization" not in recorder.seen[method], method
        assert "x-api-key" not in recorder.seen[method], method
    # The auth service's admin RPCs authenticate their caller from the credential.
    assert recorder.seen[auth]["authorization"] == CREDENTIALS[0][1]
    assert recorder.seen[auth]["x-api-key"] == CREDENTIALS[1][1]


def test_every_route_to_another_upstream_removes_the_credentials():
    routes = envoy_config.route_configuration(EdgeAuth())["virtual_hosts"][0]["routes"]
    forwarding = [r for r in routes if "route" in r]
    assert forwarding
    for route in forwarding:
        removed = set(route.get("request_headers_to_remove", ()))
        if route["route"].get("cluster") in envoy_config.CREDENTIAL_UPSTREAMS:
            assert not removed & set(envoy_config.CREDENTIAL_HEADERS), route["match"]
        else:
            assert set(envoy_config.CREDENTIAL_HEADERS) <= removed, route["match"]


# A client's copies of headers only the edge sets: ones its first filter strips by
# name, and ones it does not name (a response header's, a name a later release adds).
INTERNAL = [
    ("x-tokenmesh-tenant", "victim"),
    ("x-tokenmesh-cache", "hit"),
    ("x-tokenmesh-fallback-from", "private-lm"),
    ("x-tokenmesh-anything-new", "1"),
]


def test_no_upstream_receives_a_clients_x_tokenmesh_headers(tmp_path: Path):
    # The edge removed a fixed list: the unnamed ones reached every service as if the
    # edge had set them (docs/security.md said every x-tokenmesh-* was removed).
    listen, admin, upstream = reserve_port(), reserve_port(), reserve_port()
    filters = [strip_headers_filter(envoy_config.STRIPPED_HEADERS), edge_lua.request_filter()]
    recorder = _Recorder()
    worker = "/tokenmesh.inference.v1.InferenceService/ListModels"
    with running_envoy(_bootstrap(listen, admin, upstream, filters), admin, tmp_path):
        asyncio.run(
            _call_through(
                f"127.0.0.1:{listen}",
                upstream,
                recorder,
                [worker],
                [*INTERNAL, ("x-other", "kept")],
            )
        )
    seen = recorder.seen[worker]
    assert not [name for name in seen if name.startswith("x-tokenmesh-")], seen
    assert seen["x-other"] == "kept"
