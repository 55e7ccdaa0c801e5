"""Usage benchmarks: rate-limit decisions vs a bare grpc.aio echo, metering throughput."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from bench.peers import Peer, bench_pki
from bench.pinning import LOAD, SUT, CpuMeter, pinned_self
from bench.rows import Context
from bench.servers import bare_server_process, redis_server, service, service_pid
from bench.stats import percentile
from services.core import contract
from services.usage.meter import Meter, Retention
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.type.v1 import types_pb2

CONCURRENCY = 32
REQUESTS = 4000
ROUNDS = 5
SEQUENTIAL = 500
WARM_UP = 500
RLS_LOAD_CALLS = WARM_UP + REQUESTS + SEQUENTIAL  # what one rls_load sends


async def _sequential(call: Any, requests: int = SEQUENTIAL) -> dict[str, float]:
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


async def _load(call: Any, requests: int = REQUESTS) -> dict[str, float]:
    latencies: list[float] = []

    async def loop(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(loop(requests // CONCURRENCY) for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - started
    return {
        "rps": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def _rls_request(key_id: str) -> rls_pb2.RateLimitRequest:
    entries = [
        ratelimit_pb2.RateLimitDescriptor.Entry(key="key_id", value=key_id),
        ratelimit_pb2.RateLimitDescriptor.Entry(key="rpm", value="1000000000"),
    ]
    return rls_pb2.RateLimitRequest(
        domain="tokenmesh", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=entries)]
    )


async def rls_load(target: Peer) -> dict[str, Any]:
    """R1's limiter load: a warm-up, REQUESTS decisions at CONCURRENCY, then SEQUENTIAL
    one at a time (RLS_LOAD_CALLS in all); returns the rate and latencies."""
    async with target.aio_channel() as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        # Built once, like h2load's pre-serialised bodies: the client shares the
        # two cores with the limiter, so per-call request building would be
        # charged to the limiter (the echo client sends a prebuilt message too).
        requests = itertools.cycle([_rls_request(f"key_bench_{i}") for i in range(64)])

        async def call() -> None:
            await stub.ShouldRateLimit(next(requests), timeout=5)

        await _load(call, WARM_UP)
        return {**await _load(call), "sequential": await _sequential(call)}


async def _echo_load(target: Peer) -> dict[str, Any]:
    async with target.aio_channel() as channel:
        stub = rpc.InferenceServiceStub(channel)

        async def call() -> None:
            await stub.ListModels(pb.ListModelsRequest(), timeout=5)

        await _load(call, 500)
        return {**await _load(call), "sequential": await _sequential(call)}


def redis_env(redis_url: str, limits_url: str) -> dict[str, str]:
    """The usage service's environment for its durable and its limits Redis."""
    return {"REDIS_URL": redis_url, "TOKENMESH_RATELIMIT_REDIS_URL": limits_url}


def limiter(
    state: Path, name: str, redis_url: str, limits_url: str, prefix: list[str], **env: str
) -> contextlib.AbstractContextManager[Peer]:
    """Runs a usage service (the rate limiter) as R1 does: mTLS as `usage`, pinned by
    `prefix`; yields how to call it."""
    return service(
        state,
        name,
        "services.usage",
        30,
        pki_dir=bench_pki(state),
        identity=contract.USAGE,
        prefix=prefix,
        **redis_env(redis_url, limits_url),
        **env,
    )


def rate_limit_decisions(ctx: Context) -> dict[str, Any]:
    """Decisions/s and latency of the RateLimitService vs a bare grpc.aio echo.

    The bench's keys are far below their limits, so the default limiter admits
    most requests from window leases; the same limiter with leases off reads
    the windows in Redis for every decision, as every limiter does for a key
    above half its limit. Every call is mTLS as the edge (the limiter's one
    caller), the echo's too. Pinned: this process (the asyncio client) on the
    load core; the echo, both limiters and their Redis on the system-under-test
    core.
    """
    state, lay, placement = ctx.state, ctx.placement.layout, ctx.placement
    prefix = lay.taskset(SUT)
    out: dict[str, Any] = {}
    pki_dir = bench_pki(state)
    placement.record("bench + R1 client (asyncio)", os.getpid(), LOAD, 1)
    with (
        pinned_self(lay.load),
        bare_server_process(state, pki_dir, prefix) as (echo_target, echo_pid),
        redis_server(state, cores=lay.sut) as redis_url,
        redis_server(state, durable=False, name="redis-limits", cores=lay.sut) as limits_url,
        limiter(state, "usage", redis_url, limits_url, prefix) as leased,
        limiter(
            state,
            "usage-no-leases",
            redis_url,
            limits_url,
            prefix,
            TOKENMESH_RATELIMIT_LEASE_SIZE="0",
        ) as unleased,
    ):
        placement.record("bare grpc.aio echo (R1 baseline)", echo_pid, SUT)
        limiter_pids = {name: service_pid(state, name) for name in ("usage", "usage-no-leases")}
        for name, pid in limiter_pids.items():
            placement.record(f"rate limiter, {name} (R1)", pid, SUT)
        # Each load's CPU: its server's, and for a limiter the windows' Redis too
        # (a decision's whole cost; the echo has none). CPU per call does not
        # depend on what else ran on the machine, which decisions/s does.
        windows = {"redis-limits": redis_pid(limits_url)}
        measured = {
            "echo": {"echo": echo_pid},
            "rate_limit": {"usage": limiter_pids["usage"], **windows},
            "no_leases": {"usage-no-leases": limiter_pids["usage-no-leases"], **windows},
        }
        # Interleaved rounds (order flipped each round), median of each: this VM's
        # speed drifts by 30% within a minute, which one round of each would
        # charge to one side.
        loads = {
            "echo": lambda: _echo_load(echo_target),
            "rate_limit": lambda: rls_load(leased),
            "no_leases": lambda: rls_load(unleased),
        }
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in loads}
        for n in range(ROUNDS):
            for name in loads if n % 2 == 0 else list(loads)[::-1]:
                with CpuMeter(measured[name]) as meter:
                    figures = asyncio.run(loads[name]())
                figures["cpu_us_per_call"] = sum(meter.used.values()) / RLS_LOAD_CALLS * 1e6
                rounds[name].append(figures)
        for name, runs in rounds.items():
            out[name] = sorted(runs, key=lambda r: float(r["rps"]))[len(runs) // 2]
            out[name]["rps_rounds"] = [r["rps"] for r in runs]
            out[name]["cpu_us_per_call"] = statistics.median(r["cpu_us_per_call"] for r in runs)
            # One-at-a-time latency likewise: the median of the rounds' p50 and
            # p99 (a p99 of 500 calls moves by milliseconds when the VM stalls once).
            sequential: dict[str, Any] = {}
            for stat in ("p50_ms", "p99_ms"):
                per_round = sorted(r["sequential"][stat] for r in runs)
                sequential[stat], sequential[f"{stat}_rounds"] = (
                    per_round[len(runs) // 2],
                    per_round,
                )
            out[name] = {**out[name], "sequential": sequential}
        out["metering"] = asyncio.run(_metering(redis_url))
    for name in ("echo", "rate_limit", "no_leases"):
        s = out[name]
        seq = s["sequential"]
        print(
            f"  {name:>11}: {s['rps']:8.0f} req/s at {CONCURRENCY} concurrent (p99 {s['p99_ms']:.1f} ms);"
            f" one at a time p50 {seq['p50_ms']:.2f} ms p99 {seq['p99_ms']:.2f} ms;"
            f" {s['cpu_us_per_call']:.0f} µs CPU a call",
            flush=True,
        )
    print(f"     metering: {out['metering']['events_per_s']:8.0f} events/s", flush=True)
    return out


def redis_pid(url: str) -> int:
    """Returns the pid of the Redis at `url` (its INFO says)."""
    with redis.Redis.from_url(url) as client:
        return int(client.info("server")["process_id"])


async def _metering(redis_url: str, events: int = 5000) -> dict[str, float]:
    """Events/s one usage replica folds into buckets (idempotent Lua, per event)."""
    client = aioredis.from_url(redis_url)
    stream = f"bench:{uuid.uuid4().hex}"
    try:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(events):
                event = inference_pb2.UsageEvent(
                    request_id=f"bench-{i}",
                    key_id=f"key_{i % 50}",
                    tenant=f"t{i % 5}",
                    finish_reason="length",
                    model=types_pb2.ModelRef(name="demo-lm", version="1"),
                    usage=types_pb2.TokenUsage(
                        prompt_tokens=10, completion_tokens=20, total_tokens=30
                    ),
                    finish_unix_ms=int(time.time() * 1000),
                )
                pipe.xadd(
                    stream, {"request_id": event.request_id, "event": event.SerializeToString()}
                )
            await pipe.execute()
        meter = Meter(client, stream, "bench", "b", Retention())
        await meter.ensure_group()
        started = time.perf_counter()
        while await meter.run_once(block_ms=10):
            pass
        return {"events_per_s": meter.applied_total / (time.perf_counter() - started)}
    finally:
        await client.aclose()
