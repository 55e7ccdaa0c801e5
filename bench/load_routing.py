"""L1: load-aware endpoint weights vs equal weights, with one of two workers slowed down.

One mesh of two deterministic-test workers, one of them slowed (a longer
engine step: TOKENMESH_TEST_ENGINE_STEP_MS per worker, SLOW_STEP_MS against
FAST_STEP_MS), each with SLOTS running sequences, and two edges on the same
control plane that differ only in their endpoint weights: the mesh's edge
takes the weights the router derives from the workers' load reports
(services.router.load_weights), the other was started with
`EdgeConfig(load_aware=False)` and gets equal weights (the same per-edge
switch any operator has; TOKENMESH_ROUTER_LOAD_AWARE=false turns it off
mesh-wide).

Before measuring, traffic runs until the router has lowered the slowed
worker's weight (bounded). Then rounds alternate the two edges (order
flipped each round): CONCURRENCY clients back to back, v2 Generate SSE
streams of OUTPUT_TOKENS tokens with prompts of their own, for a window.
Measured at the client: time to the first streamed message (TTFT p50/p99),
completed requests/s, and the share of requests the slowed worker served
(x-tokenmesh-worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench.peer import pin_mesh
from bench.pinning import LOAD, pinned_self
from bench.rows import Context, Row, Spec
from bench.stats import percentile
from services.launcher.mesh import Mesh, MeshConfig
from services.launcher.processes import wait_for
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MODEL = "deterministic-test"
MODES = ("load_aware", "equal_weights")
FAST, SLOW = "inference-0", "inference-1"
FAST_STEP_MS, SLOW_STEP_MS = 2, 150
SLOTS = 4
CONCURRENCY = 8
OUTPUT_TOKENS = 8
SPEC = Spec(
    "L1",
    f"2 workers, one slowed ({SLOW_STEP_MS} vs {FAST_STEP_MS} ms engine steps, {SLOTS} slots"
    f" each, {CONCURRENCY} streams): load-aware endpoint weights vs equal weights, same"
    " workers, TTFT p99 and requests/s",
    "lower TTFT p99, higher requests/s",
)


@dataclass(frozen=True)
class Plan:
    """Plan bounds the scenario: rounds, window, warm-up and total time."""

    rounds: int
    window_s: float
    warm_up_s: float
    budget_s: float

    @classmethod
    def of(cls, quick: bool) -> Plan:
        # 7 s windows: L1 reads 11-18x with ~200 requests a round on the equal-weights
        # edge; 10 s took 12 s more of a `make bench` that must stay within 15 minutes.
        return cls(1, 4.0, 30.0, 60.0) if quick else cls(2, 7.0, 60.0, 150.0)

    def paced(self, scale: float) -> Plan:
        """The plan with its windows at `scale` (bench.rows.Context.scale)."""
        return replace(self, window_s=self.window_s * scale)


def mesh_config(state: Path) -> MeshConfig:
    """Returns the mesh: two test-engine workers, the second slowed down."""
    return MeshConfig(
        state_dir=state,
        workers=2,
        envoy_concurrency=1,
        edge_tls_port=None,
        service_env={
            "TOKENMESH_MODELS": "",
            "TOKENMESH_TEST_MODELS": f"{MODEL}:1",
            "TOKENMESH_MAX_SEQUENCES": str(SLOTS),
            "TOKENMESH_LOG_LEVEL": "WARNING",
            "TOKENMESH_RATELIMIT_DEFAULT_RPM": "10000000",
            "TOKENMESH_ROUTER_LEASE_SECONDS": "1.5",  # a heartbeat (load report) every 0.5 s
            "TOKENMESH_CACHE": "off",  # every request computes
        },
        child_env={
            FAST: {"TOKENMESH_TEST_ENGINE_STEP_MS": str(FAST_STEP_MS)},
            SLOW: {"TOKENMESH_TEST_ENGINE_STEP_MS": str(SLOW_STEP_MS)},
        },
    )


@dataclass
class Sample:
    """Sample is one finished request as the client saw it."""

    ttft_ms: float
    worker: str


async def _request(http: httpx.AsyncClient, url: str, prompt: str) -> Sample:
    body = {"prompt": prompt, "max_output_tokens": OUTPUT_TOKENS}
    started = time.perf_counter()
    first = 0.0
    async with http.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        worker = reply.headers.get("x-tokenmesh-worker", "")
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and not first:
                first = time.perf_counter() - started
    return Sample(first * 1000, worker)


async def _phase(
    http: httpx.AsyncClient, url: str, tag: str, window_s: float
) -> tuple[list[Sample], float]:
    """CONCURRENCY clients back to back for `window_s`; returns the samples and requests/s."""
    samples: list[Sample] = []
    counter = iter(range(1_000_000))
    started = time.perf_counter()
    stop = time.monotonic() + window_s

    async def client() -> None:
        while time.monotonic() < stop:
            samples.append(await _request(http, url, f"{tag} request {next(counter)} of L1"))

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return samples, len(samples) / (time.perf_counter() - started)


def _summary(samples: list[Sample], rates: list[float]) -> dict[str, Any]:
    ttft = [s.ttft_ms for s in samples]
    return {
        "requests": len(samples),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "rps": statistics.median(rates) if rates else 0.0,
        "rps_rounds": rates,
        "slow_share": sum(s.worker == SLOW for s in samples) / len(samples) if samples else 0.0,
    }


def _weights(mesh: Mesh) -> dict[str, int]:
    with mesh.channel("router") as channel:
        stub = router_rpc.WorkerRegistryServiceStub(channel)
        reply = stub.ListWorkers(router_pb.ListWorkersRequest(), timeout=10)
    return {w.id: w.weight for w in reply.workers}


async def _warm_up(http: httpx.AsyncClient, url: str, mesh: Mesh, limit_s: float) -> dict[str, Any]:
    """Sends traffic until the router lowered the slowed worker's weight (or `limit_s`)."""
    started = time.monotonic()
    weights = await asyncio.to_thread(_weights, mesh)
    while weights.get(SLOW, 100) > 50 and time.monotonic() - started < limit_s:
        await _phase(http, url, f"warm {time.monotonic():.3f}", 1.0)
        weights = await asyncio.to_thread(_weights, mesh)
    return {"weights": weights, "seconds": time.monotonic() - started}


async def _measure(edges: dict[str, str], key: str, mesh: Mesh, plan: Plan) -> dict[str, Any]:
    deadline = time.monotonic() + plan.budget_s
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    path = f"/v2/models/{MODEL}:generate"
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as http:
        warm = await _warm_up(http, edges["load_aware"] + path, mesh, plan.warm_up_s)
        for n in range(plan.rounds):
            for mode in MODES if n % 2 == 0 else MODES[::-1]:
                if time.monotonic() > deadline:
                    break
                print(f"  L1: round {n + 1}/{plan.rounds}, {mode}", flush=True)
                got, rate = await _phase(http, edges[mode] + path, f"{n}{mode}", plan.window_s)
                samples[mode] += got
                rates[mode].append(rate)
        weights = await asyncio.to_thread(_weights, mesh)
    results = {mode: _summary(samples[mode], rates[mode]) for mode in MODES}
    return {**results, "warm_up": warm, "weights_after": weights}


@contextlib.contextmanager
def _edges(ctx: Context) -> Iterator[tuple[dict[str, str], str, Mesh]]:
    """Runs the mesh and an equal-weights edge beside its own; yields both URLs, the key."""
    with Mesh(mesh_config(ctx.state / "mesh-load-routing")) as mesh:
        address = mesh.start_extra_edge("edge-equal-weights", load_aware=False)
        pin_mesh(mesh, ctx, "tokenmesh, 2 test-engine workers, one slowed (L1)")
        edges = {"load_aware": mesh.edge_url, "equal_weights": f"http://{address}"}
        key = mesh.dev_api_key()
        for mode, url in edges.items():
            wait_for(lambda url=url: _serves(url, key), 60, f"the {mode} edge to route {MODEL}")
        yield edges, key, mesh


def _serves(edge: str, key: str) -> bool:
    headers = {"authorization": f"Bearer {key}"}
    body = {"prompt": "Amen", "max_output_tokens": 1}
    try:
        url = f"{edge}/v2/models/{MODEL}:complete"
        return httpx.post(url, json=body, headers=headers, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def measure(ctx: Context) -> dict[str, Any]:
    """Runs L1; returns per mode the TTFT, requests/s and the slowed worker's share."""
    plan = Plan.of(ctx.quick).paced(ctx.scale)
    ctx.placement.record("bench + L1 client (httpx)", os.getpid(), LOAD, 1)
    with pinned_self(ctx.placement.layout.load), _edges(ctx) as (edges, key, mesh):
        results = asyncio.run(_measure(edges, key, mesh, plan))
    results["load"] = {
        "model": MODEL,
        "concurrency": CONCURRENCY,
        "output_tokens": OUTPUT_TOKENS,
        "slots": SLOTS,
        "step_ms": {FAST: FAST_STEP_MS, SLOW: SLOW_STEP_MS},
        "plan": plan.__dict__,
    }
    print(json.dumps({m: results[m] for m in MODES}), flush=True)
    return results


def judge(results: dict[str, Any]) -> list[Row]:
    """L1: load-aware TTFT p99 and requests/s against equal weights'."""
    aware, equal = results["load_aware"], results["equal_weights"]
    lower = equal["ttft_p99_ms"] / max(aware["ttft_p99_ms"], 1e-9)
    more = aware["rps"] / max(equal["rps"], 1e-9)
    weight = results.get("weights_after", {}).get(SLOW, "?")
    return [
        Row(
            SPEC.id,
            SPEC.what,
            SPEC.target,
            f"TTFT p99 {aware['ttft_p99_ms']:.0f} ms ({lower:.1f}x lower), p50"
            f" {aware['ttft_p50_ms']:.0f} ms; {aware['rps']:.1f} req/s ({more:.2f}x); slowed"
            f" worker served {aware['slow_share']:.0%} (weight {weight})",
            f"equal weights: TTFT p99 {equal['ttft_p99_ms']:.0f} ms, p50"
            f" {equal['ttft_p50_ms']:.0f} ms; {equal['rps']:.1f} req/s; slowed worker served"
            f" {equal['slow_share']:.0%}",
            passed=lower > 1 and more > 1,
        )
    ]
