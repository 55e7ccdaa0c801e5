"""Edge benchmarks: unary latency and throughput through Envoy vs baselines.

Paths, all measured in this run on the same machine:
  direct   client -> inference worker
  edge     client -> full Envoy edge (health, transcoder, routing) -> worker
  envoy    client -> bare Envoy (router filter only) -> worker
  envoy-direct  client -> bare Envoy answering itself (direct_response): Envoy's own floor
  grpc     client -> bare grpc.aio server (the floor for a Python gRPC server)
Latency: sequential calls from one Python client (p50/p99). Throughput: h2load
(or ghz) with pre-serialised gRPC bodies when installed, else client processes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.servers import bare_server
from bench.stats import percentile
from gateway import envoy_config, protos
from gateway.edge_auth import EdgeAuth
from gateway.envoy_config import Endpoint
from services.launcher.mesh import Mesh, MeshConfig, envoy_binary
from services.launcher.processes import Child, clean_env, reserve_port, wait_for
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

METHOD = "/tokenmesh.inference.v1.InferenceService/ListModels"


def _call(stub: Any, metadata: list[tuple[str, str]]) -> None:
    try:
        stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
    except grpc.RpcError as error:
        # Envoy's direct_response answers without a message: a full round trip all the same.
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise


def _complete(stub: Any, metadata: list[tuple[str, str]]) -> None:
    """A call the edge routes by model (the model is in the body)."""
    request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1)
    stub.Complete(request, timeout=5, metadata=metadata)


def sequential_latency_ms(
    target: str,
    metadata: list[tuple[str, str]] | None = None,
    calls: int = 500,
    budget_s: float = 30.0,
    call: Callable[[Any, list[tuple[str, str]]], None] = _call,
) -> list[float]:
    """Returns per-call latencies (ms) of sequential unary calls."""
    latencies = []
    deadline = time.monotonic() + budget_s
    with grpc.insecure_channel(target) as channel:
        stub = rpc.InferenceServiceStub(channel)
        for _ in range(50):
            call(stub, metadata or [])
        for _ in range(calls):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            call(stub, metadata or [])
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def throughput_rps(
    target: str, state: Path, metadata: list[tuple[str, str]] | None = None, requests: int = 6000
) -> tuple[float, str]:
    """Returns unary requests/s under concurrency and the tool that measured it.

    ghz when it is on PATH, else h2load with a pre-serialised gRPC body, else
    an asyncio client.
    """
    metadata = metadata or []
    ghz = shutil.which("ghz")
    if ghz:
        command = [
            ghz,
            "--insecure",
            "--protoset",
            str(protos.build_descriptor_set()),
            "--call",
            METHOD.strip("/").replace("/", "."),
            "-n",
            str(requests),
            "-c",
            "32",
            "--format",
            "json",
            f"--metadata={json.dumps(dict(metadata))}",
            target,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if result.returncode == 0:
            return float(json.loads(result.stdout)["rps"]), "ghz"
    frame = pb.ListModelsRequest().SerializeToString()
    body = state / "listmodels.bin"
    body.write_bytes(b"\x00" + struct.pack(">I", len(frame)) + frame)
    h2load = shutil.which("h2load")
    if h2load:
        headers = [arg for key, value in metadata for arg in ("-H", f"{key}: {value}")]
        command = [
            h2load,
            "-n",
            str(requests),
            "-c",
            "4",
            "-m",
            "8",
            "-t",
            "1",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            *headers,
            f"http://{target}{METHOD}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout)
        if match:
            return float(match.group(1)), "h2load"
    return _python_rps(target, min(requests, 3000), metadata), "python"


def _python_rps(target: str, requests: int, metadata: list[tuple[str, str]]) -> float:
    import asyncio

    import grpc.aio

    async def run() -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = rpc.InferenceServiceStub(channel)

            async def worker(n: int) -> None:
                for _ in range(n):
                    await stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)

            started = time.perf_counter()
            await asyncio.gather(*(worker(requests // 32) for _ in range(32)))
            return (requests // 32 * 32) / (time.perf_counter() - started)

    return asyncio.run(run())


def _bare_envoy(state: Path, upstream_port: int, direct: bool = False) -> tuple[Child, str]:
    """Starts Envoy with only the router filter, proxying to one upstream
    (or, with `direct`, answering every request itself)."""
    port, admin = reserve_port(), reserve_port()
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bare",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "bare",
                                        "codec_type": "AUTO",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {
                                                                "cluster": "upstream",
                                                                "timeout": "30s",
                                                            },
                                                        }
                                                    ],
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
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": envoy_config.h2_options(),
                    "load_assignment": envoy_config.load_assignment(
                        "upstream", [Endpoint("127.0.0.1", upstream_port)]
                    ),
                }
            ],
        },
    }
    path = state / f"bare-envoy-{direct}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    child = Child(
        "bare-envoy",
        [
            str(envoy_binary()),
            "-c",
            str(path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        clean_env({}),
        state / "bare-envoy.log",
    )
    address = f"127.0.0.1:{port}"
    wait_for(lambda: _serves(address), 30, "bare Envoy", child)
    return child, address


def _serves(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            _call(rpc.InferenceServiceStub(channel), [])
        return True
    except grpc.RpcError:
        return False


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "calls": len(latencies),
    }


def _routing_cost(mesh: Mesh, metadata: list[tuple[str, str]]) -> dict[str, list[float]]:
    """Complete (model in the body) through the edge with model routing (Lua + per-version
    routes from xDS) and through a second, identical Envoy without it; interleaved rounds."""
    unrouted = mesh.start_extra_edge("edge-unrouted", model_routing=False)
    latencies: dict[str, list[float]] = {"routed": [], "unrouted": []}
    for _ in range(3):
        for name, address in (("routed", mesh.edge_address), ("unrouted", unrouted)):
            latencies[name] += sequential_latency_ms(address, metadata, 400, call=_complete)
    for name, values in latencies.items():
        print(
            f"  {'complete-' + name:>12}: p50 {percentile(values, 50):.2f} ms"
            f"  p99 {percentile(values, 99):.2f} ms",
            flush=True,
        )
    return latencies


def _issue_token(edge_url: str, api_key: str) -> str:
    import httpx

    reply = httpx.post(f"{edge_url}/v1/auth/token", json={"api_key": api_key}, timeout=10)
    reply.raise_for_status()
    return str(reply.json()["access_token"])


def edge_overhead(state: Path) -> dict[str, Any]:
    """Measures the four paths; returns latency summaries, raw latencies and throughput."""
    config = MeshConfig(
        state_dir=state / "mesh",
        workers=1,
        envoy_concurrency=1,
        service_env={
            "TOKENMESH_MODELS": "",
            "TOKENMESH_TEST_MODELS": "deterministic-test:1",
            "TOKENMESH_TEST_ENGINE_STEP_MS": "0",  # Complete measures the path, not compute
            "TOKENMESH_LOG_LEVEL": "WARNING",
            # The limiter runs on every call but must not throttle the load.
            "TOKENMESH_RATELIMIT_DEFAULT_RPM": "1000000000",
        },
    )
    latencies: dict[str, list[float]] = {}
    rps: dict[str, float] = {}
    tool = "python"

    def measure(name: str, target: str, metadata: list[tuple[str, str]] | None = None) -> None:
        nonlocal tool
        latencies[name] = sequential_latency_ms(target, metadata)
        rps[name], tool = throughput_rps(target, state, metadata)
        print(
            f"  {name:>12}: p50 {percentile(latencies[name], 50):.2f} ms  p99 {percentile(latencies[name], 99):.2f} ms"
            f"  {rps[name]:8.0f} req/s ({tool})",
            flush=True,
        )

    with Mesh(config) as mesh:
        key = [("x-api-key", mesh.dev_api_key())]
        token = _issue_token(mesh.edge_url, mesh.dev_api_key())
        measure("direct", mesh.address("inference-0"))
        measure("edge-jwt", mesh.edge_address, [("authorization", f"Bearer {token}")])
        measure("edge-api-key", mesh.edge_address, key)
        for direct in (False, True):
            envoy, address = _bare_envoy(state, mesh.ports["inference-0"], direct=direct)
            try:
                measure("envoy-direct" if direct else "envoy", address)
            finally:
                envoy.terminate()
                envoy.wait(10)
    # The same edge without the rate-limit filter (its Python callout is the
    # costliest hop on the JWT path).
    no_limits = dataclasses.replace(
        config, state_dir=state / "mesh-no-rl", edge_auth=EdgeAuth(ratelimit=False)
    )
    with Mesh(no_limits) as mesh:
        token = _issue_token(mesh.edge_url, mesh.dev_api_key())
        jwt = [("authorization", f"Bearer {token}")]
        measure("edge-jwt-no-ratelimit", mesh.edge_address, jwt)
        routing = _routing_cost(mesh, jwt)
    with bare_server(state) as target:
        measure("grpc", target)
    return {
        "routing": {name: _summary(values) for name, values in routing.items()},
        "latency": {name: _summary(values) for name, values in latencies.items()},
        "requests_per_s": rps,
        "throughput_tool": tool,
        "latencies_ms": latencies,
    }
