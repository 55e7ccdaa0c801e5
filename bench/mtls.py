"""What mTLS costs on the hot path: the same worker over mTLS and over plaintext.

Two workers of one build and settings, each serving demo-lm (streams, as the
served benchmarks run it) and the zero-compute deterministic-test model
(unary Complete: the path, not compute). One requires mTLS and is called with
the edge's certificate, as the edge calls it; the other serves plaintext and
takes every caller for the edge (TOKENMESH_INSECURE_PEER_IDENTITY, benchmarks
only), so both authorize the same calls. Same client, same requests, on one
long-lived channel each (Envoy keeps its upstream connections: the handshake
is not on the hot path).

This VM's speed drifts by ~30% within a minute, so the two are measured in
interleaved rounds, and each ratio is the median of the rounds' ratios: in a
round, unary calls alternate between the two workers every 20 calls, then
each gets one 4 s window of 32 streams (the order flipped every round). The
bench does not pin cores: the workers and the client share the machine's
cores, as in every other scenario. CPU per call and per token comes from the
worker's /proc/<pid>/stat (utime + stime, in clock ticks) before and after
each measurement; the client's from this process's CPU time around each
block of calls. CPU time depends less on who else uses the machine than wall
time does, but on this VM it is not immune: time the hypervisor takes from
a running guest thread counts as that thread's.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.clients import run_streams
from bench.peers import Peer, bench_pki
from bench.pinning import cpu_seconds
from bench.servers import redis_server, service_pid, worker
from bench.serving import served_request
from bench.stats import percentile, summarize_streams
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

ROUNDS = 5
UNARY_CALLS = 1000  # per round and side: >= 20 clock ticks of worker CPU
BLOCK = 20  # unary calls to one side before switching to the other
STREAMS = 32  # the served benchmarks' concurrency
SIDES = ("mtls", "plaintext")
WORKER_ENV = {
    "TOKENMESH_TEST_MODELS": "deterministic-test:1",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "0",
}


WINDOW_S = 4.0  # of 32 streams per side and round


@contextlib.contextmanager
def demo_lm_worker(
    state: Path, redis_url: str, name: str, pki_dir: Path | None, **env: str
) -> Iterator[Peer]:
    """Runs a worker serving demo-lm with 32 sequences, as the served benchmarks use it."""
    with worker(
        state,
        redis_url,
        name,
        pki_dir=pki_dir,
        TOKENMESH_MODELS="demo-lm:1",
        TOKENMESH_MAX_SEQUENCES="32",
        **env,
    ) as target:
        yield target


def _unary(workers: dict[str, tuple[Peer, int]], calls: int = UNARY_CALLS) -> dict[str, Any]:
    """Sequential Complete calls, alternating between the sides every BLOCK calls (so both
    see the same machine speed): latency, and worker and client CPU per call, per side."""
    request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1)
    latencies: dict[str, list[float]] = {side: [] for side in SIDES}
    client_cpu = dict.fromkeys(SIDES, 0.0)
    with contextlib.ExitStack() as stack:
        stubs = {
            side: rpc.InferenceServiceStub(stack.enter_context(peer.channel()))
            for side, (peer, _) in workers.items()
        }
        for stub in stubs.values():
            for _ in range(50):  # the handshake and warm-up stay out of the figures
                stub.Complete(request, timeout=5)
        worker_cpu = {side: cpu_seconds(pid) for side, (_, pid) in workers.items()}
        for block in range(calls // BLOCK):
            for side in SIDES if block % 2 == 0 else SIDES[::-1]:
                # The process's CPU time (gRPC's own threads too) is the client's.
                cpu = time.process_time()
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    stubs[side].Complete(request, timeout=5)
                    latencies[side].append((time.perf_counter() - started) * 1000)
                client_cpu[side] += time.process_time() - cpu
        for side, (_, pid) in workers.items():
            worker_cpu[side] = cpu_seconds(pid) - worker_cpu[side]
    return {
        side: {
            "p50_ms": percentile(latencies[side], 50),
            "p99_ms": percentile(latencies[side], 99),
            "worker_cpu_us_per_call": worker_cpu[side] / calls * 1e6,
            "client_cpu_us_per_call": client_cpu[side] / calls * 1e6,
        }
        for side in SIDES
    }


def _streams(target: Peer, pid: int) -> dict[str, float]:
    """The served benchmarks' load at 32 streams for one window: tokens/s, worker CPU per token."""
    worker_cpu = cpu_seconds(pid)
    records = run_streams(
        target, STREAMS, 1000, served_request(), processes=1, budget_s=WINDOW_S, window=True
    )
    worker_cpu = cpu_seconds(pid) - worker_cpu
    summary = summarize_streams(records)
    tokens = max(summary.get("tokens", 0), 1)
    return {
        "tokens_per_s": summary.get("tokens_per_s", 0.0),
        "ttft_p50_ms": summary.get("ttft_p50_ms", 0.0),
        "errors": summary["errors"],
        "worker_cpu_us_per_token": worker_cpu / tokens * 1e6,
    }


@contextlib.contextmanager
def _workers(state: Path) -> Iterator[dict[str, tuple[Peer, int]]]:
    """Runs the mTLS and the plaintext worker; yields {side: (peer, pid)}."""
    pki_dir = bench_pki(state)
    names = {"mtls": "mtls-worker", "plaintext": "plaintext-worker"}
    with (
        redis_server(state) as redis_url,
        demo_lm_worker(state, redis_url, names["mtls"], pki_dir, **WORKER_ENV) as mtls,
        demo_lm_worker(state, redis_url, names["plaintext"], None, **WORKER_ENV) as plaintext,
    ):
        peers = {"mtls": mtls, "plaintext": plaintext}
        yield {side: (peers[side], service_pid(state, names[side])) for side in SIDES}


def _median_of(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Returns the median of every figure over the rounds, and each figure's rounds."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        out[key], out[f"{key}_rounds"] = statistics.median(values), values
    return out


def _ratios(rounds: dict[str, list[dict[str, float]]], key: str) -> dict[str, Any]:
    """Returns mTLS / plaintext for `key`: the median of the rounds' ratios, and each round's."""
    per_round = [
        m[key] / p[key] if p[key] else 0.0
        for m, p in zip(rounds["mtls"], rounds["plaintext"], strict=True)
    ]
    return {"median": statistics.median(per_round), "rounds": per_round}


def mtls_cost(state: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """Measures the same worker over mTLS and plaintext in interleaved rounds."""
    unary: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    streams: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    with _workers(state) as workers:
        for peer, _ in workers.values():
            run_streams(peer, 1, 2, served_request(), processes=1)  # warm-up
        for n in range(rounds):
            for side, figures in _unary(workers).items():
                unary[side].append(figures)
            for side in SIDES if n % 2 == 0 else SIDES[::-1]:
                streams[side].append(_streams(*workers[side]))
            print(
                f"  round {n + 1}/{rounds}: "
                + "  ".join(
                    f"{side} p50 {unary[side][-1]['p50_ms']:.2f} ms"
                    f" {streams[side][-1]['tokens_per_s']:.0f} tokens/s"
                    for side in SIDES
                ),
                flush=True,
            )
    result: dict[str, Any] = {
        "rounds": rounds,
        "streams_concurrency": STREAMS,
        "unary": {side: _median_of(unary[side]) for side in SIDES},
        "streams": {side: _median_of(streams[side]) for side in SIDES},
        "ratios": {
            "unary_p50": _ratios(unary, "p50_ms"),
            "unary_worker_cpu": _ratios(unary, "worker_cpu_us_per_call"),
            "unary_client_cpu": _ratios(unary, "client_cpu_us_per_call"),
            "tokens_per_s": _ratios(streams, "tokens_per_s"),
            "stream_worker_cpu": _ratios(streams, "worker_cpu_us_per_token"),
        },
    }
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    unary, streams, ratios = result["unary"], result["streams"], result["ratios"]
    for side in SIDES:
        u, s = unary[side], streams[side]
        print(
            f"  {side:>9}: Complete p50 {u['p50_ms']:.2f} ms p99 {u['p99_ms']:.2f} ms,"
            f" worker CPU {u['worker_cpu_us_per_call']:.0f} us/call,"
            f" client CPU {u['client_cpu_us_per_call']:.0f} us/call;"
            f" {STREAMS} streams {s['tokens_per_s']:.0f} tokens/s,"
            f" worker CPU {s['worker_cpu_us_per_token']:.0f} us/token",
            flush=True,
        )
    print(
        f"  mTLS / plaintext (median of {result['rounds']} rounds): unary p50"
        f" {ratios['unary_p50']['median']:.2f}x, worker CPU/call"
        f" {ratios['unary_worker_cpu']['median']:.2f}x, tokens/s"
        f" {ratios['tokens_per_s']['median']:.0%}, worker CPU/token"
        f" {ratios['stream_worker_cpu']['median']:.2f}x",
        flush=True,
    )
