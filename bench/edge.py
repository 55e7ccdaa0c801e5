"""Edge benchmarks: unary latency and throughput through Envoy vs baselines.

Paths, all measured in this run on the same machine:
  direct   client -> inference worker, over mTLS as the edge (what the edge does)
  edge     client -> full Envoy edge (health, transcoder, routing) -> worker, with a
           JWT or an API key; and the API key through an extra edge of the same mesh
           without the key cache (edge-api-key-no-cache)
  envoy    client -> bare Envoy (router filter only) -> worker
  envoy-direct  client -> bare Envoy answering itself (direct_response): Envoy's own floor
  grpc     client -> bare grpc.aio server, same mTLS (the floor for a Python gRPC server)
Envoy speaks mTLS to the worker as the edge identity on every Envoy path.
Latency (E1, E1k): sequential calls from one Python client (p50/p99), every path in
interleaved rounds. Throughput: h2load (or ghz) with pre-serialised gRPC bodies when
installed, else client processes; over mTLS, h2load presents the edge's certificate
through `h2load_cert.c`. E3 (ListModels) and E2 (demo-lm Complete) run their paths
in interleaved rounds and read each process's CPU around each path's run; the rows
take the medians of the rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import grpc
import grpc.aio
import yaml

from bench.peer import EDGE_PROCESSES, pin_mesh
from bench.peers import Peer, bench_pki
from bench.pinning import LOAD, SUT, CpuMeter, pin, pinned_self
from bench.rows import Context
from bench.servers import bare_server_process
from bench.stats import median_each, percentile
from gateway import admin as envoy_admin
from gateway import envoy_config, protos
from gateway.envoy_config import Endpoint
from services.core import contract, identity
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
    target: Peer,
    metadata: list[tuple[str, str]] | None = None,
    calls: int = 500,
    budget_s: float = 30.0,
    call: Callable[[Any, list[tuple[str, str]]], None] = _call,
) -> list[float]:
    """Returns per-call latencies (ms) of sequential unary calls."""
    latencies = []
    deadline = time.monotonic() + budget_s
    with target.channel() as channel:
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


class LoadFailed(RuntimeError):
    """LoadFailed: a throughput run's calls did not succeed (h2load and ghz count a
    gRPC error, an HTTP 200 with grpc-status in its trailers, as served)."""


OK = grpc.StatusCode.OK
#: DATA_SHARE: the share of the expected reply bytes an h2load run must receive. The
#: expectation is the probe call's reply times the requests, and sampled answers vary
#: (E2's demo-lm Completes: 146-213 bytes in 300 calls), so a large probe put a healthy
#: run under a 90% bar now and then; a trailers-only gRPC error sends no DATA at all, so
#: half tells the two apart.
DATA_SHARE = 0.5


def throughput_rps(
    target: Peer,
    state: Path,
    metadata: list[tuple[str, str]] | None = None,
    requests: int = 3000,
    method: str = METHOD,
    message: bytes | None = None,
    expect: grpc.StatusCode = OK,
    around: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[float, str]:
    """Returns unary requests/s under concurrency and the tool that measured it.

    requests: 3000 by default, 1-10 s a path here; the ListModels figures are
    reported, not judged (E1/E1k judge latency, E2 its Complete rounds), and
    6000 took the edge scenario ~25 s more on a slow VM.

    ghz when it is on PATH, else h2load with a pre-serialised gRPC body (over
    mTLS: with the edge's certificate, when `h2load_client_cert` can build
    its shim), else an asyncio client.

    Before and after the run, one call of the same bytes and metadata through a
    Python stub must end with `expect` (OK unless a path answers every call
    itself), and the tool's own counts must show every call so: else LoadFailed.
    around: entered for the tool's run only (a CpuMeter: the checks' calls stay out).
    """
    metadata = metadata or []
    frame = pb.ListModelsRequest().SerializeToString() if message is None else message
    reply = probe(target, metadata, method, frame, expect)
    with around or contextlib.nullcontext():
        rps, tool = _tool_rps(target, state, metadata, requests, method, frame, expect, reply)
    probe(target, metadata, method, frame, expect)
    return rps, tool


def probe(
    target: Peer,
    metadata: list[tuple[str, str]],
    method: str,
    frame: bytes,
    expect: grpc.StatusCode,
) -> bytes | None:
    """Sends `frame` once to `method` with `metadata` through a Python stub; returns the
    reply's bytes (None when `expect` is an error); raises LoadFailed on another status."""
    with target.channel() as channel:
        # No serializers: the run's very bytes go out, the reply's come back.
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        try:
            reply = call(frame, timeout=10, metadata=tuple(metadata))
            code, details = OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
    if code != expect:
        raise LoadFailed(
            f"{method} on {target.address} answered {code.name}"
            + (f" ({details})" if details else "")
            + f", expected {expect.name}: a load tool counts such calls as served"
        )
    return reply if code == OK else None


def _tool_rps(
    target: Peer,
    state: Path,
    metadata: list[tuple[str, str]],
    requests: int,
    method: str,
    frame: bytes,
    expect: grpc.StatusCode,
    reply: bytes | None,
) -> tuple[float, str]:
    """One run of the first load tool there is (see throughput_rps), checked."""
    ghz = shutil.which("ghz") if method == METHOD else None
    if ghz:
        command = [
            ghz,
            *_ghz_transport(target),
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
            target.address,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if result.returncode == 0:
            return ghz_rps(json.loads(result.stdout), requests, expect), "ghz"
    body = state / f"{method.rsplit('/', 1)[-1]}.bin"
    body.write_bytes(b"\x00" + struct.pack(">I", len(frame)) + frame)
    h2load = shutil.which("h2load")
    h2load_env = _h2load_env(target, state) if h2load else None
    why = "h2load is not installed" if h2load is None else "no client certificate for h2load"
    if h2load and h2load_env is not None:
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
            f"{'https' if target.tls else 'http'}://{target.address}{method}",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env=h2load_env
        )
        if re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout):
            return h2load_rps(result.stdout, requests, reply), "h2load"
        why = result.stderr[-300:]
    if method != METHOD:
        raise RuntimeError(f"h2load is needed for {method}: {why}")
    return _python_rps(target, min(requests, 3000), metadata, expect), "python"


def ghz_rps(report: dict[str, Any], requests: int, expect: grpc.StatusCode = OK) -> float:
    """Returns a ghz JSON report's requests/s; raises LoadFailed unless every one of the
    `requests` calls ended with `expect` (ghz's rps counts failed calls too)."""
    # ghz names codes as Go does: "OK", "Unimplemented", "PermissionDenied".
    name = "OK" if expect == OK else "".join(p.capitalize() for p in expect.name.split("_"))
    codes = report.get("statusCodeDistribution") or {}
    if codes != {name: requests}:
        raise LoadFailed(f"ghz: {requests} calls expected to end {name}, got {codes}")
    return float(report["rps"])


def h2load_rps(output: str, requests: int, reply: bytes | None) -> float:
    """Returns h2load's requests/s from its output; raises LoadFailed unless every request
    succeeded at the HTTP level and, when the calls answer `reply` (not None: OK is
    expected), the DATA received holds about `requests` such replies (h2load counts a
    gRPC error, trailers only, as succeeded; it carries no DATA)."""
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", output)
    if rate is None or done is None:
        raise LoadFailed(f"h2load: no summary in its output: {output[-300:]!r}")
    if int(done.group(1)) != requests:
        raise LoadFailed(f"h2load: {done.group(1)} of {requests} requests succeeded")
    if reply is not None:
        data = re.search(r"\((\d+)\) data", output)
        expected = requests * (5 + len(reply))  # each reply: one length-prefixed message
        if data is None or int(data.group(1)) < DATA_SHARE * expected:
            got = data.group(1) if data else "no"
            raise LoadFailed(
                f"h2load: {got} bytes of DATA for {requests} replies of {5 + len(reply)} bytes:"
                " calls failed with a gRPC status (trailers only)"
            )
    return float(rate.group(1))


def _ghz_transport(target: Peer) -> list[str]:
    """Returns ghz's options for reaching `target` (mTLS as the edge, or plaintext)."""
    if not target.tls:
        return ["--insecure"]
    files = target.caller_files()
    return [
        f"--cacert={files.ca}",
        f"--cert={files.cert}",
        f"--key={files.key}",
        f"--cname={identity.server_name(target.identity)}",
    ]


def _h2load_env(target: Peer, state: Path) -> dict[str, str] | None:
    """Returns h2load's environment for `target`; None when it cannot present a certificate."""
    if not target.tls:
        return dict(os.environ)
    shim = h2load_client_cert(state)
    if shim is None:
        return None
    files = target.caller_files()
    return {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "TOKENMESH_BENCH_CLIENT_CERT": str(files.cert),
        "TOKENMESH_BENCH_CLIENT_KEY": str(files.key),
    }


def h2load_client_cert(state: Path) -> Path | None:
    """Builds the shim that gives h2load a client certificate (see h2load_cert.c), once.

    Returns its path, or None without a C compiler (mTLS throughput then
    falls back to the Python client, and the report names the tool per row).
    """
    shim = state / "h2load_cert.so"
    if shim.exists():
        return shim
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = Path(__file__).resolve().parent / "h2load_cert.c"
    command = [compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(source), "-ldl"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        print(f"  h2load client-certificate shim did not build: {result.stderr.strip()}")
        return None
    return shim


def _python_rps(
    target: Peer, requests: int, metadata: list[tuple[str, str]], expect: grpc.StatusCode = OK
) -> float:
    import asyncio

    async def run() -> float:
        async with target.aio_channel() as channel:
            stub = rpc.InferenceServiceStub(channel)

            async def worker(n: int) -> None:
                for _ in range(n):
                    try:
                        await stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
                    except grpc.aio.AioRpcError as error:
                        # Envoy's direct_response answers without a message (as `_call`).
                        if error.code() != expect:
                            raise

            started = time.perf_counter()
            await asyncio.gather(*(worker(requests // 32) for _ in range(32)))
            return (requests // 32 * 32) / (time.perf_counter() - started)

    return asyncio.run(run())


#: What the bare Envoy's direct_response answers every call (a trailers-only error).
DIRECT_RESPONSE_STATUS = grpc.StatusCode.UNIMPLEMENTED


def bare_envoy(
    state: Path, upstream_port: int, sds_dir: Path, direct: bool = False
) -> tuple[Child, str]:
    """Starts Envoy with only the router filter, proxying to one worker over mTLS as
    the edge (the edge's SDS files in `sds_dir`), or, with `direct`, answering
    every request itself."""
    port = reserve_port()
    # A trailers-only gRPC answer (UNIMPLEMENTED, which the latency client accepts).
    grpc_headers = {
        "content-type": "application/grpc",
        "grpc-status": str(DIRECT_RESPONSE_STATUS.value[0]),
    }
    action: dict[str, Any] = (
        {
            "direct_response": {"status": 200},
            "response_headers_to_add": [
                {"header": {"key": k, "value": v}} for k, v in grpc_headers.items()
            ],
        }
        if direct
        else {"route": {"cluster": "upstream", "timeout": "30s"}}
    )
    bootstrap = {
        "node": {"id": "bare-envoy", "cluster": "bench"},  # file-based SDS needs both
        "admin": {
            "address": envoy_admin.address(
                state / f"bare-envoy-{'direct' if direct else 'proxy'}.sock"
            )
        },
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
                                                        {"match": {"prefix": "/"}, **action}
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
                envoy_config.with_upstream_tls(
                    {
                        "name": "upstream",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "typed_extension_protocol_options": envoy_config.h2_options(),
                        "load_assignment": envoy_config.load_assignment(
                            "upstream", [Endpoint("127.0.0.1", upstream_port)]
                        ),
                    },
                    sds_dir,
                    contract.WORKER,
                )
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
        with Peer(address).channel() as channel:
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


def pin_child(mesh: Mesh, ctx: Context, name: str, role: str) -> int:
    """Pins `mesh`'s child `name`, started after pin_mesh, to the system-under-test core
    (it inherited this process's load core) and records it as `role`; returns its pid."""
    child = next(c for c in mesh.children if c.name == name and not c.stopping)
    pin(child.pid, ctx.placement.layout.sut)
    ctx.placement.record(role, child.pid, SUT)
    return child.pid


def _routing_cost(
    mesh: Mesh, ctx: Context, metadata: list[tuple[str, str]]
) -> dict[str, list[float]]:
    """Complete (model in the body) through the edge with model routing (Lua + per-version
    routes from xDS) and through a second, identical Envoy without it, on the same
    core; interleaved rounds."""
    unrouted = mesh.start_extra_edge("edge-unrouted", model_routing=False)
    pin_child(mesh, ctx, "edge-unrouted", "extra Envoy without model routing (routing cost)")
    latencies: dict[str, list[float]] = {"routed": [], "unrouted": []}
    for _ in range(3):
        for name, address in (("routed", mesh.edge_address), ("unrouted", unrouted)):
            latencies[name] += sequential_latency_ms(Peer(address), metadata, 400, call=_complete)
    for name, values in latencies.items():
        print(
            f"  {'complete-' + name:>12}: p50 {percentile(values, 50):.2f} ms"
            f"  p99 {percentile(values, 99):.2f} ms",
            flush=True,
        )
    return latencies


def issue_token(edge_url: str, api_key: str) -> str:
    """Exchanges an API key for a JWT at the edge (`/v1/auth/token`)."""
    import httpx

    reply = httpx.post(f"{edge_url}/v1/auth/token", json={"api_key": api_key}, timeout=10)
    reply.raise_for_status()
    return str(reply.json()["access_token"])


# E2's call: demo-lm Complete, 16 tokens, 32 concurrent (h2load: 4 connections x 8 streams).
REALISTIC = pb.CompleteRequest(model="demo-lm", prompt="The edge of the mesh", max_tokens=16)
COMPLETE = "/tokenmesh.inference.v1.InferenceService/Complete"
ROUNDS = 5  # E2: three paths, interleaved; ~3 s a path and round at ~150 req/s
COMPLETES = 500  # E2: per path and round (600 took ~6 s at the ~100 req/s of a slow VM)


def complete_throughput(
    mesh: Mesh,
    state: Path,
    paths: dict[str, tuple[Peer, list[tuple[str, str]]]],
    bare_envoy_pid: int,
    rounds: int = ROUNDS,
    requests: int = COMPLETES,
) -> dict[str, Any]:
    """demo-lm Complete (16 tokens) at 32 concurrent on each path; interleaved rounds.

    Returns each path's req/s per round and the median CPU µs per request of
    every mesh process and the bare Envoy (from /proc over each round): where
    an edge request's extra cost goes, beside the worker's own. The bare
    Envoy proxy's path is E2's floor: no edge can add less than a proxy.
    """
    rps_rounds: dict[str, list[float]] = {name: [] for name in paths}
    cpu_rounds: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    body = REALISTIC.SerializeToString()
    pids = {c.name: c.pid for c in mesh.children if not c.stopping}
    pids["bare-envoy"] = bare_envoy_pid
    for n in range(rounds):
        # Order flipped every round: no path always runs right after another.
        for name, (target, metadata) in list(paths.items())[:: 1 if n % 2 == 0 else -1]:
            meter = CpuMeter(pids)
            rps, _ = throughput_rps(target, state, metadata, requests, COMPLETE, body, around=meter)
            rps_rounds[name].append(rps)
            cpu_rounds[name].append({p: used * 1e6 / requests for p, used in meter.used.items()})
    cpu = {name: median_each(per_round) for name, per_round in cpu_rounds.items()}
    print(f"  complete 16 tokens x32: {rps_rounds}", flush=True)
    for name, per in cpu.items():
        print(f"  {name:>12}: CPU µs/Complete {json.dumps({k: round(v) for k, v in per.items()})}")
    return {**rps_rounds, "cpu_us_per_request": cpu}


def rotated(names: Sequence[str], n: int) -> list[str]:
    """Round `n`'s order of `names`: turned by one place a round, so that over any
    len(names) rounds in a row each name runs first once (and at every other place once)."""
    turn = n % len(names)
    return [*names[turn:], *names[:turn]]


#: ListModels per path and round (h2load): E3's CPU and the paths' req/s. 5 paths x 5
#: rounds x 1000 take ~32 s at this VM's rates (~2,000 req/s direct, ~700 through the
#: edge, ~500 without the key cache), as the single runs of 3000 they replaced did; a
#: round's CPU reads in 10 µs steps (/proc counts 10 ms ticks).
LISTMODELS_REQUESTS = 1000
#: The extra edge without the API-key cache (E1k), on the scenario's mesh.
UNCACHED = "edge-no-key-cache"


def listmodels_rounds(
    state: Path,
    paths: dict[str, tuple[Peer, list[tuple[str, str]]]],
    pids: dict[str, dict[str, int]],
    requests: int = LISTMODELS_REQUESTS,
) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]], dict[str, str]]:
    """ListModels at 32 concurrent (throughput_rps) on every path, in one round per path,
    the order rotated (each path first once): one window of the VM's speed moves every
    path alike instead of one path's single sample.

    Returns each path's req/s per round, the CPU µs per request of each of the path's
    processes (`pids[path]`, read from /proc around the load tool's run) per round, and
    each path's load tool. The medians are the judge's (cpu_medians)."""
    rps: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    tools: dict[str, str] = {}
    for n in range(len(paths)):
        for name in rotated(list(paths), n):
            target, metadata = paths[name]
            meter = CpuMeter(pids[name])
            got, tools[name] = throughput_rps(target, state, metadata, requests, around=meter)
            rps[name].append(got)
            cpu[name].append({p: used * 1e6 / requests for p, used in meter.used.items()})
        print(
            f"  ListModels round {n + 1}: req/s"
            f" {json.dumps({k: round(v[-1]) for k, v in rps.items()})}",
            flush=True,
        )
    for name, per in cpu_medians(cpu).items():
        print(f"  {name:>12}: CPU µs/request {json.dumps({k: round(v) for k, v in per.items()})}")
    return rps, cpu, tools


def edge_total(per: Mapping[str, float]) -> float:
    """The edge's CPU in one path's figures: its Envoy, callouts and rate-limit Redis
    (bench.peer.EDGE_PROCESSES, as P1 counts tokenmesh's gateway)."""
    return sum(per.get(name, 0.0) for name in EDGE_PROCESSES)


def cpu_medians(
    rounds: Mapping[str, Sequence[Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Each path's median over its rounds of every process's CPU µs per request, and
    "edge": the median of the rounds' edge totals (edge_total), not a sum of medians."""
    return {
        path: median_each([{**per, "edge": edge_total(per)} for per in per_round])
        for path, per_round in rounds.items()
    }


def _path_pids(mesh: Mesh, uncached: int, bare_proxy: int) -> dict[str, dict[str, int]]:
    """The processes each ListModels path goes through, by path; "envoy" is the Envoy
    of the path (the extra edge's on the no-cache path), so edge_total reads every
    edge path alike."""
    running = {c.name: c.pid for c in mesh.children if not c.stopping}
    edge = {name: running[name] for name in (*EDGE_PROCESSES, "inference-0")}
    return {
        "direct": {"inference-0": running["inference-0"]},
        "edge-jwt": edge,
        "edge-api-key": edge,
        "edge-api-key-no-cache": {**edge, "envoy": uncached},
        "envoy": {"bare-envoy": bare_proxy, "inference-0": running["inference-0"]},
    }


LATENCY_CALLS = 200  # per path and round


def mesh_config(state: Path, **changes: Any) -> MeshConfig:
    """The edge scenario's mesh (E1-E3): one worker serving demo-lm (E2's call) and
    the zero-compute test model, one Envoy thread, limits that never throttle."""
    return MeshConfig(
        state_dir=state / "mesh",
        workers=1,
        envoy_concurrency=1,
        service_env={
            "TOKENMESH_MODELS": "demo-lm:1",  # E2's realistic call
            "TOKENMESH_ENGINE": "onnxruntime",
            "TOKENMESH_TEST_MODELS": "deterministic-test:1",
            "TOKENMESH_TEST_ENGINE_STEP_MS": "0",  # Complete measures the path, not compute
            "TOKENMESH_LOG_LEVEL": "WARNING",
            # The limiter runs on every call but must not throttle the load.
            "TOKENMESH_RATELIMIT_DEFAULT_RPM": "1000000000",
        },
        **changes,
    )


def edge_overhead(ctx: Context) -> dict[str, Any]:
    """Measures the paths; returns latency summaries (with E1's and E1k's ratios per
    interleaved round), raw latencies, CPU per request and throughput per round.

    One mesh; beside its edge, an extra Envoy on the same control plane without the
    API-key cache (E1k's "without the key cache": every API-key request asks the auth
    service, as the edge did before gateway/key_cache.py), so that it runs in the same
    rounds as the JWT path it is divided by. Pinned as every scenario: this process
    and its load generators (h2load, the Python clients) on the load core; the mesh,
    the extra and bare Envoys and the bare grpc.aio server on the system-under-test core.
    """
    state = ctx.state
    config = mesh_config(state)
    sut = ctx.placement.layout.sut
    ctx.placement.record("bench + edge clients (Python, h2load)", os.getpid(), LOAD, 1)
    with pinned_self(ctx.placement.layout.load), Mesh(config) as mesh:
        pin_mesh(mesh, ctx, "tokenmesh edge (E1-E3)")
        key = [("x-api-key", mesh.dev_api_key())]
        token = issue_token(mesh.edge_url, mesh.dev_api_key())
        jwt = [("authorization", f"Bearer {token}")]
        edge = Peer(mesh.edge_address)  # clients reach the edge's plaintext listener
        worker = Peer(mesh.address("inference-0"), contract.WORKER, mesh.pki_dir)
        no_cache = dataclasses.replace(config.edge_auth, api_key_cache=False)
        uncached = Peer(mesh.start_extra_edge(UNCACHED, auth=no_cache))
        uncached_pid = pin_child(mesh, ctx, UNCACHED, "extra Envoy without the API-key cache")
        envoys = [
            bare_envoy(state, mesh.ports["inference-0"], mesh.sds_dir, direct=d)
            for d in (False, True)
        ]
        try:
            for child, _ in envoys:
                pin(child.pid, sut)
                ctx.placement.record(f"bare Envoy ({child.name})", child.pid, SUT)
            (proxy, proxy_address), (_, direct_address) = envoys
            paths: dict[str, tuple[Peer, list[tuple[str, str]]]] = {
                "direct": (worker, []),
                "edge-jwt": (edge, jwt),
                "edge-api-key": (edge, key),
                "edge-api-key-no-cache": (uncached, key),
                "envoy": (Peer(proxy_address), []),
                "envoy-direct": (Peer(direct_address), []),
            }
            latencies, per_round = interleaved_latency(paths)
            metered = {name: paths[name] for name in paths if name != "envoy-direct"}
            rps, cpu, tools = listmodels_rounds(
                state, metered, _path_pids(mesh, uncached_pid, proxy.pid)
            )
            # Envoy answering itself: its req/s only (~60,000, a fraction of a second).
            floor, tools["envoy-direct"] = throughput_rps(
                Peer(direct_address), state, expect=DIRECT_RESPONSE_STATUS
            )
            rps["envoy-direct"] = [floor]
            for name, (target, _) in paths.items():
                _print_path(name, latencies[name], median(rps[name]), tools[name], target.tls)
            # E2 and the routing cost run without it: an idle Envoy's timers cost the
            # core ~25-35 µs per Complete (bench/edge_split.py).
            mesh.terminate(UNCACHED)
            mesh.wait_exit(UNCACHED)
            realistic = complete_throughput(
                mesh,
                state,
                {
                    "direct": (worker, []),
                    "edge-jwt": (edge, jwt),
                    "envoy": (Peer(proxy_address), []),
                },
                proxy.pid,
                requests=round(ctx.scaled(COMPLETES)),
            )
        finally:
            for child, _ in envoys:
                child.terminate()
                child.wait(10)
        routing = _routing_cost(mesh, ctx, jwt)
    with (
        pinned_self(ctx.placement.layout.load),
        bare_server_process(state, bench_pki(state), ctx.placement.layout.taskset(SUT)) as (
            target,
            pid,
        ),
    ):
        ctx.placement.record("bare grpc.aio server", pid, SUT)
        latencies["grpc"] = sequential_latency_ms(target)
        got, tools["grpc"] = throughput_rps(target, state)
        rps["grpc"] = [got]
        _print_path("grpc", latencies["grpc"], got, tools["grpc"], target.tls)
    return {
        # Per path, each round's CPU µs per request of every process it went through.
        "cpu_us_per_request": cpu,
        "complete_rps": realistic,
        "routing": {name: _summary(values) for name, values in routing.items()},
        "latency": {name: _summary(values) for name, values in latencies.items()},
        "latency_rounds": per_round,
        "requests_per_s": rps,  # per path, each round's
        # One tool for every row, else each row's (a ratio across tools is not like for like).
        "throughput_tool": tools["direct"] if len(set(tools.values())) == 1 else tools,
        "latencies_ms": latencies,
    }


def interleaved_latency(
    paths: dict[str, tuple[Peer, list[tuple[str, str]]]],
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Sequential-call latency of every path in interleaved rounds, one per path, the
    order rotated (each path first once): this VM's speed drifts within a minute, so a
    ratio is only taken between paths of the same round. Returns every call's latency
    per path, and each round's p50 per path."""
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    per_round: list[dict[str, float]] = []
    for n in range(len(paths)):
        p50s = {}
        for name in rotated(list(paths), n):
            target, metadata = paths[name]
            got = sequential_latency_ms(target, metadata, LATENCY_CALLS)
            latencies[name] += got
            p50s[name] = percentile(got, 50)
        per_round.append(p50s)
        print(
            f"  latency round {n + 1}: p50 ms {json.dumps({k: round(v, 2) for k, v in p50s.items()})}",
            flush=True,
        )
    return latencies, per_round


def _print_path(name: str, latencies: list[float], rps: float, tool: str, tls: bool) -> None:
    print(
        f"  {name:>12}: p50 {percentile(latencies, 50):.2f} ms  p99 {percentile(latencies, 99):.2f} ms"
        f"  {rps:8.0f} req/s ({tool}{', mTLS' if tls else ''})",
        flush=True,
    )
