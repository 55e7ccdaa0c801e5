"""S1-S3: serving tokens over gRPC, against in-process and bare baselines, pinned.

Placement (bench.pinning): this process and the streaming client processes
run on the load core; the worker, its Redis, the bare grpc.aio streamer and
the in-process engine ceiling run on the system-under-test core, the
ceiling with the worker's engine thread count. Only one of them is under
load at a time.

S1  served demo-lm tokens/s at 32 streams vs the engine ceiling at batch 32
    (the raw ONNX Runtime engine, greedy decode, no server). Beside it, each
    round: S1's requests in-process (bench.offline: the worker's scheduler and
    engine, no server), which splits S1's gap into what the server costs and
    what serving requests costs the engine (prefill, sampling, a continuous batch).
S2  TTFT p99 at 32 streams (the steady state: each stream's first call, the
    opening burst, is reported apart) vs a bare grpc.aio streamer's under the
    same load: the same client, 32 streams of the same requests, paced to the
    served window's messages/s with its tokens per message (measured right
    after it, each round). Reported beside it: the bare streamer unpaced, whose
    ~7x calls saturate the one client process (its TTFT p99 is the client's
    backlog, not the server's).
S3  worker CPU per stream message with token batching off
    (TOKENMESH_MESSAGES_PER_STEP=0) and the deterministic engine sleeping 1 ms
    a step (zero compute), vs the bare streamer's CPU per message paced to that
    window's messages/s (a server's CPU per message falls as its rate rises);
    beside it the bare streamer unpaced, and the same worker with batching on
    (the default): tokens/s and CPU per token.

Every window records its client's cores (client CPU / wall). A judged window
whose client used more than CLIENT_HEADROOM of its one core measured the
client: the row says it is no valid baseline and does not pass.

Every figure is the median over interleaved rounds (order flipped each
round): this VM's speed drifts by ~30% within a minute. CPU per unit of work
(/proc/<pid>/stat before and after each window) is the robust figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.ceiling import DECODE_STEPS
from bench.clients import StreamRecord, run_streams, run_streams_measured
from bench.peers import Peer, bench_pki
from bench.pinning import LOAD, SUT, CpuMeter, pin, pinned_self
from bench.rows import Context, Row, row
from bench.servers import PACE_KEY, TOKENS_KEY, bare_server_process, service_pid, worker
from bench.stats import summarize_streams
from services.launcher.mesh import REPO_ROOT, spawn_redis
from tokenmesh.inference.v1 import inference_service_pb2 as pb

STREAMS = 32
LEVELS = (1, 8, 32)  # streams, for the throughput-vs-concurrency plot
ZERO_COMPUTE_TOKENS = 256  # per S3 call: long streams, few call set-ups


@dataclass(frozen=True)
class Plan:
    """Plan sizes the scenario: `--quick` is a smoke run, not a measurement."""

    rounds: int
    window_s: float
    levels: tuple[int, ...]

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(1, 3.0, (1, STREAMS)) if quick else cls(3, 4.0, LEVELS)

    def paced(self, scale: float) -> Plan:
        """The plan with its windows at `scale` (bench.rows.Context.scale)."""
        return replace(self, window_s=self.window_s * scale)


def served_request() -> pb.GenerateRequest:
    """Returns S1/S2's request: demo-lm, 64 tokens (+-16 per call), a 15-token prompt."""
    return pb.GenerateRequest(
        model="demo-lm",
        prompt="And it came to pass in those days, that there went out a decree",
        max_tokens=DECODE_STEPS,
        temperature=0.8,
        seed=1,
    )


def zero_compute_request() -> pb.GenerateRequest:
    """Returns S3's request: the deterministic engine, 256 tokens a call."""
    return pb.GenerateRequest(
        model="deterministic-test", prompt="go", max_tokens=ZERO_COMPUTE_TOKENS, seed=1
    )


@dataclass(frozen=True)
class Target:
    """Target is one server a round loads: how to call it and which pids its CPU is."""

    name: str
    peer: Peer
    pids: dict[str, int]


def measure(ctx: Context) -> dict[str, Any]:
    """Runs S1-S3; returns their figures, every round's, and raw records for the plots."""
    plan = Plan.of(ctx.quick).paced(ctx.scale)
    lay = ctx.placement.layout
    with pinned_self(lay.load):
        ctx.placement.record("bench + streaming clients", os.getpid(), LOAD, 1)
        out: dict[str, Any] = {"plan": plan.__dict__}
        with _servers(ctx) as servers:
            print("  S1/S2: engine ceiling per batch (pinned to the worker's core)", flush=True)
            out["ceiling_levels"] = _ceiling(ctx, plan.levels, min_seconds=1.0)
            out["levels"], out["_records"] = _levels(ctx, servers["served"], plan)
            print("  S1/S2: interleaved rounds at 32 streams", flush=True)
            out["s1_s2"] = _served_rounds(ctx, servers, plan, out["_records"])
            print("  S3: CPU per stream message, zero-compute engine", flush=True)
            out["s3"] = _cpu_rounds(ctx, servers, plan)
    return out


@contextlib.contextmanager
def _servers(ctx: Context) -> Iterator[dict[str, Target]]:
    """Runs Redis, the demo-lm worker, two zero-compute workers and the bare streamer on
    the system-under-test core; yields them by name."""
    lay, state, placement = ctx.placement.layout, ctx.state, ctx.placement
    pki_dir = bench_pki(state)
    prefix = lay.taskset(SUT)
    threads = str(lay.threads(SUT))
    redis, redis_url = spawn_redis(state / "redis-s", state / "redis-s.log")
    try:
        pin(redis.pid, lay.sut)
        placement.record("redis (the workers' usage events)", redis.pid, SUT)
        zero = {
            "TOKENMESH_MODELS": "",
            "TOKENMESH_TEST_MODELS": "deterministic-test:1",
            "TOKENMESH_TEST_ENGINE_STEP_MS": "1",
            "TOKENMESH_MAX_SEQUENCES": str(STREAMS),
        }
        with (
            worker(
                state,
                redis_url,
                "s-worker",
                pki_dir=pki_dir,
                prefix=prefix,
                TOKENMESH_MODELS="demo-lm:1",
                **served_env(threads),
            ) as served,
            worker(
                state,
                redis_url,
                "s-zero-unbatched",
                pki_dir=pki_dir,
                prefix=prefix,
                TOKENMESH_MESSAGES_PER_STEP="0",
                **zero,
            ) as unbatched,
            worker(
                state, redis_url, "s-zero-batched", pki_dir=pki_dir, prefix=prefix, **zero
            ) as batched,
            bare_server_process(state, pki_dir, prefix) as (bare, bare_pid),
        ):
            pids = {
                name: service_pid(state, name)
                for name in ("s-worker", "s-zero-unbatched", "s-zero-batched")
            }
            placement.record("worker, demo-lm (S1, S2)", pids["s-worker"], SUT, f"engine {threads}")
            placement.record(
                "worker, zero-compute, batching off (S3)", pids["s-zero-unbatched"], SUT
            )
            placement.record("worker, zero-compute, batching on (S3)", pids["s-zero-batched"], SUT)
            placement.record("bare grpc.aio streamer (S2, S3 baseline)", bare_pid, SUT)
            yield {
                "served": Target(
                    "served", served, {"worker": pids["s-worker"], "redis": redis.pid}
                ),
                "unbatched": Target(
                    "unbatched", unbatched, {"worker": pids["s-zero-unbatched"], "redis": redis.pid}
                ),
                "batched": Target(
                    "batched", batched, {"worker": pids["s-zero-batched"], "redis": redis.pid}
                ),
                "bare": Target("bare", bare, {"worker": bare_pid}),
            }
    finally:
        redis.terminate()
        redis.wait(10)


def served_env(threads: str) -> dict[str, str]:
    """The S1 worker's settings beyond bench.servers.worker's (the offline run's too)."""
    return {"TOKENMESH_MAX_SEQUENCES": str(STREAMS), "TOKENMESH_ENGINE_THREADS": threads}


def _offline(ctx: Context, seconds: float) -> dict[str, float]:
    """Runs S1's requests in-process (bench.offline) on the worker's core, in the worker's
    environment: its scheduler and engine, no server."""
    env = {
        **os.environ,
        **served_env(str(ctx.placement.layout.threads(SUT))),
        "TOKENMESH_MODEL_REPOSITORY": str(REPO_ROOT / "models"),
        "TOKENMESH_ENGINE": "onnxruntime",
        "TOKENMESH_LOG_LEVEL": "WARNING",
    }
    label = "S1's requests in-process (worker's scheduler and engine, no server)"
    result: dict[str, float] = _run_on_sut(ctx, label, ["bench.offline", str(seconds)], env)
    return result


def _ceiling(
    ctx: Context, batches: tuple[int, ...], min_seconds: float = 0.0
) -> dict[str, dict[str, float]]:
    """Runs the in-process engine ceiling in a process of its own on the worker's core,
    with the worker's engine thread count."""
    threads = str(ctx.placement.layout.threads(SUT))
    module = ["bench.ceiling", threads, str(min_seconds), *(str(b) for b in batches)]
    label = "engine ceiling (in-process ONNX Runtime, demo-lm)"
    result: dict[str, dict[str, float]] = _run_on_sut(ctx, label, module, None)
    return result


def _run_on_sut(ctx: Context, label: str, module: list[str], env: dict[str, str] | None) -> Any:
    """Runs `python -m module...` pinned to the worker's core; returns the JSON of its last
    line (and records it in the placement: one process per round)."""
    lay = ctx.placement.layout
    command = [*lay.taskset(SUT), sys.executable, "-m", *module]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True, env=env)
    ctx.placement.record(label, "one per round", SUT, f"engine {lay.threads(SUT)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load(
    ctx: Context,
    target: Target,
    request: pb.GenerateRequest,
    window_s: float,
    metadata: tuple[tuple[str, str], ...] = (),
    streams: int = STREAMS,
) -> tuple[dict[str, float], list[StreamRecord]]:
    """One window of `streams` streams against `target`: its summary with CPU per unit
    of work."""
    with CpuMeter(target.pids) as meter:
        records, client_cpu = run_streams_measured(
            target.peer,
            streams,
            1000,
            request,
            processes=1,
            budget_s=window_s,
            window=True,
            metadata=metadata,
            cores=ctx.placement.layout.load,
        )
    summary = summarize_streams(records)
    tokens, messages = max(summary.get("tokens", 0), 1), max(summary.get("messages", 0), 1)
    summary["client_cpu_us_per_token"] = client_cpu / tokens * 1e6
    summary["client_cpu_us_per_message"] = client_cpu / messages * 1e6
    # The one client process has one core: near it, the window measures the client.
    summary["client_cores"] = client_cpu / summary.get("wall_s", window_s)
    for name, used in meter.used.items():
        summary[f"{name}_cpu_us_per_token"] = used / tokens * 1e6
        summary[f"{name}_cpu_us_per_message"] = used / messages * 1e6
        summary[f"{name}_cpu_cores"] = used / summary.get("wall_s", window_s)
    return summary, records


def _levels(
    ctx: Context, served: Target, plan: Plan
) -> tuple[dict[str, Any], dict[str, list[StreamRecord]]]:
    """Served tokens/s and latency per concurrency (the plots' curves)."""
    run_streams(served.peer, 1, 2, served_request(), processes=1)  # warm-up
    levels: dict[str, Any] = {}
    raw: dict[str, list[StreamRecord]] = {}
    for concurrency in plan.levels:
        s, records = _load(ctx, served, served_request(), plan.window_s, streams=concurrency)
        raw[f"served {concurrency}"] = records
        levels[str(concurrency)] = s
        print(
            f"    served {concurrency:>2} streams: {s['tokens_per_s']:7.0f} tokens/s"
            f"  TTFT p50 {s['ttft_p50_ms']:.1f} p99 {s['ttft_p99_ms']:.1f} ms"
            f"  ITL p50 {s['itl_p50_ms']:.1f} p99 {s['itl_p99_ms']:.1f} ms",
            flush=True,
        )
    return levels, raw


def _paced(served: dict[str, float]) -> tuple[tuple[str, str], ...]:
    """Returns the metadata that paces the bare streamer to `served`'s load: its
    messages/s over the STREAMS streams, its tokens per message."""
    pace_us = STREAMS / max(served.get("messages_per_s", 0.0), 1.0) * 1e6
    per_message = max(served.get("tokens_per_message", 1.0), 1.0)
    return ((PACE_KEY, f"{pace_us:.0f}"), (TOKENS_KEY, f"{per_message:.3f}"))


def _window(
    ctx: Context,
    servers: dict[str, Target],
    name: str,
    request: pb.GenerateRequest,
    window_s: float,
    compared: dict[str, float] | None,
) -> tuple[dict[str, float], list[StreamRecord]]:
    """One window of target `name`; "bare_paced" is the bare streamer at the load of
    `compared` (the window it is the baseline of, measured just before)."""
    if name != "bare_paced":
        return _load(ctx, servers[name], request, window_s)
    assert compared is not None, "the paced baseline runs after the window it paces to"
    return _load(ctx, servers["bare"], request, window_s, _paced(compared))


def _served_rounds(
    ctx: Context, servers: dict[str, Target], plan: Plan, raw: dict[str, list[StreamRecord]]
) -> dict[str, Any]:
    """S1 and S2 in interleaved rounds: ceiling, served, bare paced to the served
    window's load right after it, bare unpaced (the last round's bare records go into
    `raw`, for the CDF plots)."""
    rounds: list[dict[str, Any]] = []
    run_streams(servers["bare"].peer, 2, 1, served_request(), processes=1)  # warm-up
    for n in range(plan.rounds):
        ceiling = _ceiling(ctx, (STREAMS,), plan.window_s)[str(STREAMS)]
        figures: dict[str, Any] = {"ceiling": ceiling, "offline": _offline(ctx, plan.window_s)}
        # The paced window follows the served one in either order: it needs its load.
        order = ("served", "bare_paced", "bare") if n % 2 == 0 else ("bare", "served", "bare_paced")
        for name in order:
            figures[name], raw[f"{name.replace('_', ' ')} 32"] = _window(
                ctx, servers, name, served_request(), plan.window_s, figures.get("served")
            )
        rounds.append(figures)
        c, s, b, p = (figures[k] for k in ("ceiling", "served", "bare", "bare_paced"))
        o = figures["offline"]
        print(
            f"    round {n + 1}/{plan.rounds}: ceiling {c['tokens_per_s']:.0f} tokens/s,"
            f" in-process {o['tokens_per_s']:.0f},"
            f" served {s['tokens_per_s']:.0f} ({s['tokens_per_s'] / c['tokens_per_s']:.0%});"
            f" TTFT p99 served {s['ttft_p99_ms']:.1f} ms, bare paced {p['ttft_p99_ms']:.1f} ms"
            f" ({p['messages_per_s']:.0f} of {s['messages_per_s']:.0f} messages/s),"
            f" bare unpaced {b['ttft_p99_ms']:.1f} ms; client cores served"
            f" {s['client_cores']:.2f}, paced {p['client_cores']:.2f}, unpaced"
            f" {b['client_cores']:.2f}; worker CPU {s['worker_cpu_us_per_token']:.0f}"
            f" us/token (ceiling {c['cpu_us_per_token']:.0f})",
            flush=True,
        )
    return served_summary(rounds)


def served_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """S1's and S2's figures from their rounds (medians of per-round ratios)."""
    return {
        "rounds": rounds,
        "s1_ratio": _median(
            r["served"]["tokens_per_s"] / r["ceiling"]["tokens_per_s"] for r in rounds
        ),
        # Beside S1: served over the same requests in-process (what the server costs),
        # and in-process over the ceiling (what serving requests costs the engine).
        "server_ratio": _median(
            r["served"]["tokens_per_s"] / r["offline"]["tokens_per_s"] for r in rounds
        ),
        "server_cpu_ratio": _median(
            r["offline"]["cpu_us_per_token"] / r["served"]["worker_cpu_us_per_token"]
            for r in rounds
        ),
        "offline_ratio": _median(
            r["offline"]["tokens_per_s"] / r["ceiling"]["tokens_per_s"] for r in rounds
        ),
        # The robust twin of S1: tokens per CPU second, served over the ceiling's.
        # Both saturate the same core, so on a quiet machine this is the
        # tokens/s ratio; unlike it, it does not depend on who else used the
        # core meanwhile (a ceiling slowed by other load passes S1 by wall time).
        "s1_cpu_ratio": _median(
            r["ceiling"]["cpu_us_per_token"] / r["served"]["worker_cpu_us_per_token"]
            for r in rounds
        ),
        # S2's baseline is the bare streamer at the served window's load (messages/s,
        # tokens a message): unpaced, it answers ~7x the calls and its one client
        # process saturates the load core, so its TTFT p99 is the client's backlog.
        "s2_ratio": _median(
            r["served"]["ttft_p99_ms"] / max(r["bare_paced"]["ttft_p99_ms"], 1e-9) for r in rounds
        ),
        # TTFT p99 is of the calls after each stream's first (the opening burst):
        # a window too short for a stream's second call has none to judge by.
        "s2_steady": all(
            r[name].get("requests", 0) > STREAMS
            for r in rounds
            for name in ("served", "bare_paced")
        ),
        "s2_saturated": saturated(rounds, ("served", "bare_paced")),
        "s2_unpaced_ratio": _median(
            r["served"]["ttft_p99_ms"] / max(r["bare"]["ttft_p99_ms"], 1e-9) for r in rounds
        ),
        "median": _medians(rounds),
    }


#: A window whose client process used more of its core than this measured the client.
CLIENT_HEADROOM = 0.8


def saturated(rounds: list[dict[str, Any]], names: tuple[str, ...]) -> list[str]:
    """Returns each of the `names` windows whose client had no headroom, as
    "round N name (C cores)": such a window is no valid baseline."""
    return [
        f"round {n + 1} {name.replace('_', ' ')} ({r[name].get('client_cores', 0.0):.2f} cores)"
        for n, r in enumerate(rounds)
        for name in names
        if r[name].get("client_cores", 0.0) > CLIENT_HEADROOM
    ]


def _cpu_rounds(ctx: Context, servers: dict[str, Target], plan: Plan) -> dict[str, Any]:
    """S3 in interleaved rounds: bare unpaced, batching off, then the bare streamer
    paced to that window's messages/s, batching on (order flipped every round)."""
    for name in ("bare", "unbatched", "batched"):
        run_streams(servers[name].peer, 2, 1, zero_compute_request(), processes=1)  # warm-up
    names = ("bare", "unbatched", "bare_paced", "batched")
    rounds: list[dict[str, Any]] = []
    for n in range(plan.rounds):
        figures: dict[str, Any] = {}
        # The paced window follows the unbatched one in either order: it needs its rate.
        for name in names if n % 2 == 0 else ("batched", "unbatched", "bare_paced", "bare"):
            figures[name] = _window(
                ctx, servers, name, zero_compute_request(), plan.window_s, figures.get("unbatched")
            )[0]
        rounds.append(figures)
        print(
            f"    round {n + 1}/{plan.rounds}: "
            + "; ".join(
                f"{name} {figures[name]['worker_cpu_us_per_message']:.0f} us/message"
                f" ({figures[name]['messages_per_s']:.0f} messages/s,"
                f" {figures[name]['tokens_per_s']:.0f} tokens/s,"
                f" client {figures[name]['client_cores']:.2f} cores)"
                for name in names
            ),
            flush=True,
        )
    return cpu_summary(rounds)


def cpu_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """S3's figures from its rounds (medians of per-round ratios)."""

    def ratio(r: dict[str, Any], bare: str) -> float:
        per = r["unbatched"]["worker_cpu_us_per_message"]
        return float(per / max(r[bare]["worker_cpu_us_per_message"], 1e-9))

    return {
        "rounds": rounds,
        # A grpc.aio server's CPU per message falls as its rate rises (wake-ups and
        # writes amortised): the baseline runs at the unbatched worker's rate.
        "s3_ratio": _median(ratio(r, "bare_paced") for r in rounds),
        "s3_saturated": saturated(rounds, ("unbatched", "bare_paced")),
        "s3_unpaced_ratio": _median(ratio(r, "bare") for r in rounds),
        "median": _medians(rounds),
    }


def _median(values: Any) -> float:
    return float(statistics.median(list(values)))


def _medians(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Returns each target's every figure, median over the rounds."""
    return {
        name: {
            key: _median(r[name][key] for r in rounds)
            for key, value in rounds[0][name].items()
            if isinstance(value, int | float)
        }
        for name in rounds[0]
    }


def judge(results: dict[str, Any]) -> list[Row]:
    """Returns the S1, S2 and S3 rows."""
    s12, s3 = results["s1_s2"], results["s3"]
    m = s12["median"]
    served, ceiling = m["served"], m["ceiling"]
    rounds = f"median of {len(s12['rounds'])} interleaved rounds"
    return [
        row(
            "S1",
            f"{s12['s1_ratio']:.0%} by tokens/s, {s12['s1_cpu_ratio']:.0%} by CPU per token"
            f" (both must pass; {served['tokens_per_s']:.0f} tokens/s; {rounds}); vs the same"
            f" requests in-process (scheduler and engine, no server): {s12['server_ratio']:.0%},"
            f" by CPU {s12['server_cpu_ratio']:.0%}",
            min(s12["s1_ratio"], s12["s1_cpu_ratio"]) >= 0.85,
            baseline=f"engine ceiling {ceiling['tokens_per_s']:.0f} tokens/s (in-process"
            f" requests: {m['offline']['tokens_per_s']:.0f}, {s12['offline_ratio']:.0%} of it)",
            cpu=f"worker {served['worker_cpu_us_per_token']:.0f} µs/token"
            f" ({served['worker_cpu_cores']:.2f} cores), in-process"
            f" {m['offline']['cpu_us_per_token']:.0f}, ceiling"
            f" {ceiling['cpu_us_per_token']:.0f} µs/token; client"
            f" {served['client_cpu_us_per_token']:.0f} µs/token",
        ),
        _s2_row(s12, rounds),
        _s3_row(s3),
    ]


def _invalid(windows: list[str]) -> str:
    """The note that opens a row judged on a window whose client had no headroom."""
    if not windows:
        return ""
    return (
        f"NOT A VALID BASELINE, client above {CLIENT_HEADROOM:.0%} of its core in "
        + ", ".join(windows)
        + ": "
    )


def _s2_row(s12: dict[str, Any], rounds: str) -> Row:
    m = s12["median"]
    served, bare, paced = m["served"], m["bare"], m["bare_paced"]
    invalid = s12.get("s2_saturated", [])
    return row(
        "S2",
        ("" if s12["s2_steady"] else "no steady-state calls in a round (window too short): ")
        + _invalid(invalid)
        + f"{s12['s2_ratio']:.2f}x (served TTFT p99 {served['ttft_p99_ms']:.1f} ms,"
        f" p50 {served['ttft_p50_ms']:.1f} ms; {rounds}; vs the bare streamer unpaced,"
        f" its client at {bare['client_cores']:.2f} cores: {s12['s2_unpaced_ratio']:.2f}x)",
        s12["s2_steady"] and not invalid and s12["s2_ratio"] <= 1.5,
        baseline=f"bare grpc.aio paced to the worker's {served['messages_per_s']:.0f}"
        f" messages/s, {served['tokens_per_message']:.1f} tokens/message"
        f" (reached {paced['messages_per_s']:.0f}): TTFT p99 {paced['ttft_p99_ms']:.1f} ms"
        f" (unpaced: {bare['ttft_p99_ms']:.1f} ms)",
        cpu=f"worker {served['worker_cpu_us_per_message']:.0f} µs/message, bare paced"
        f" {paced['worker_cpu_us_per_message']:.0f} µs/message; client cores: served"
        f" {served['client_cores']:.2f}, bare paced {paced['client_cores']:.2f}, unpaced"
        f" {bare['client_cores']:.2f}",
    )


def _s3_row(s3: dict[str, Any]) -> Row:
    z = s3["median"]
    unbatched, paced, bare = z["unbatched"], z["bare_paced"], z["bare"]
    invalid = s3.get("s3_saturated", [])
    return row(
        "S3",
        _invalid(invalid) + f"{s3['s3_ratio']:.2f}x ({unbatched['worker_cpu_us_per_message']:.0f}"
        f" µs/message, {unbatched['messages_per_s']:.0f} messages/s,"
        f" {unbatched['tokens_per_message']:.1f} tokens/message; batching on:"
        f" {z['batched']['tokens_per_s']:.0f} tokens/s,"
        f" {z['batched']['worker_cpu_us_per_token']:.0f} µs/token; vs the bare streamer"
        f" unpaced: {s3['s3_unpaced_ratio']:.2f}x)",
        not invalid and s3["s3_ratio"] <= 1.5,
        baseline=f"bare grpc.aio paced to the worker's {unbatched['messages_per_s']:.0f}"
        f" messages/s: {paced['worker_cpu_us_per_message']:.0f} µs/message (reached"
        f" {paced['messages_per_s']:.0f}; unpaced {bare['worker_cpu_us_per_message']:.0f} µs/message at"
        f" {bare['messages_per_s']:.0f})",
        cpu=f"worker {unbatched['worker_cpu_us_per_token']:.0f} µs/token batching off,"
        f" {z['batched']['worker_cpu_us_per_token']:.0f} batching on; redis"
        f" {unbatched['redis_cpu_us_per_message']:.1f} µs/message; client cores: batching off"
        f" {unbatched['client_cores']:.2f}, bare paced {paced['client_cores']:.2f}, unpaced"
        f" {bare['client_cores']:.2f}",
    )


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Throughput vs concurrency (served and ceiling) and the TTFT/ITL CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bench.report import save_figure

    paths = []
    levels, ceiling = results["levels"], results["ceiling_levels"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted(levels, key=int)
    cs = sorted(ceiling, key=int)
    curves = (
        ("served over gRPC", xs, [levels[x]["tokens_per_s"] for x in xs], "o-"),
        ("engine ceiling", cs, [ceiling[x]["tokens_per_s"] for x in cs], "s-"),
        # Tokens per CPU second of the core's owner: what each reaches with the
        # core to itself, whoever else used it during the run.
        (
            "served, per worker CPU second",
            xs,
            [1e6 / max(levels[x]["worker_cpu_us_per_token"], 1e-9) for x in xs],
            "o:",
        ),
        (
            "ceiling, per CPU second",
            cs,
            [1e6 / max(ceiling[x]["cpu_us_per_token"], 1e-9) for x in cs],
            "s:",
        ),
    )
    for label, x_values, y_values, style in curves:
        ax.plot([int(x) for x in x_values], y_values, style, label=label)
    ax.set(
        title="Throughput vs concurrency (demo-lm, pinned)",
        xlabel="concurrent streams",
        ylabel="tokens/s",
        xscale="log",
    )
    ax.legend()
    paths.append(save_figure(fig, out / "throughput.png"))
    fig, (ttft_ax, itl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in results["_records"].items():
        ttft = np.sort([r.ttft * 1000 for r in records if r.ok and not r.opening])
        gaps = np.sort([g * 1000 for r in records if r.ok for g in r.gaps])
        if len(ttft):
            ttft_ax.plot(ttft, np.linspace(0, 1, len(ttft)), label=label)
        if len(gaps):
            itl_ax.plot(gaps, np.linspace(0, 1, len(gaps)), label=label)
    ttft_ax.set(
        title="Time to first token (CDF, steady state)",
        xlabel="ms",
        ylabel="fraction",
        xscale="log",
    )
    itl_ax.set(title="Inter-token latency (CDF)", xlabel="ms", xscale="log")
    ttft_ax.legend()
    itl_ax.legend()
    paths.append(save_figure(fig, out / "ttft_itl_cdf.png"))
    return paths
