"""F1: a light tenant's TTFT while a heavy tenant keeps more streams open than there are slots.

Two workers of one build, each serving the deterministic test engine (10 ms a
step, so a request's time is its queue and its tokens, not this VM's speed)
with 4 slots: one schedules with tenant fairness (the default), the other
first come, first served (TOKENMESH_SCHEDULER_FAIRNESS=fifo). Against each in
turn (rounds alternate, order flipped each round), the heavy tenant keeps 32
streams of 24-40 tokens open (a new one as soon as one ends: 28 always wait
for a slot) while the light tenant sends one 8-token request at a time. Measured
at the client: the light tenant's time to first token (p50, p99) and the
heavy tenant's; beside them the worker's queue_ms (v2 timing) of the light
requests.

With FIFO the light request waits behind every queued heavy stream
(~ 28 / 4 heavy requests' durations); with fairness it takes the next slot
that frees (no preemption: up to one heavy request's duration, since the
slot its previous request freed went to a waiting heavy stream before its
next request arrived). Target: fair p99 <= 1/3 of FIFO's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.peers import Peer, bench_pki
from bench.pinning import LOAD, SUT, pinned_self
from bench.rows import Context, Row
from bench.servers import redis_server, service_pid, worker
from bench.stats import percentile
from services.core.contract import TENANT_HEADER
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
MODES = ("tenant", "fifo")
SLOTS = 4
STEP_MS = 10
HEAVY_STREAMS = 32
HEAVY_TOKENS = (24, 40)  # varied, so the heavy streams do not free their slots in step
LIGHT_TOKENS = 8
#: CALL_TIMEOUT_S: each call's deadline. The scenario's deadlines are checked between
#: calls only, so a worker that stops sending would hang `make bench` without it;
#: a heavy call under FIFO waits ~3 s.
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Plan:
    """Plan bounds the scenario: rounds, light calls per round and mode, and time."""

    rounds: int
    light_calls: int
    budget_s: float

    @classmethod
    def of(cls, quick: bool) -> Plan:
        # 8 light calls a round: FIFO's take ~3.2 s each, and F1 read 0.10-0.11x of
        # FIFO over every run at 12 (the p99 of 16 or 24 calls is their slowest).
        return cls(1, 8, 60.0) if quick else cls(2, 8, 240.0)


@dataclass
class Sample:
    """Sample is one finished request as the client saw it."""

    ttft_ms: float
    queue_ms: float


async def _request(stub: Any, tenant: str, tokens: int, n: int) -> Sample:
    request = pb.GenerateRequest(
        model=MODEL,
        prompt="hello mesh",
        max_output_tokens=tokens,
        sampling=resources.SamplingParams(seed=n),
    )
    started = time.perf_counter()
    ttft = queue_ms = 0.0
    call = stub.Generate(request, metadata=((TENANT_HEADER, tenant),), timeout=CALL_TIMEOUT_S)
    async for message in call:
        if message.token_ids and not ttft:
            ttft = (time.perf_counter() - started) * 1000
        if message.HasField("finish_reason"):
            queue_ms = message.timing.queue_ms
    return Sample(ttft, queue_ms)


async def _heavy_stream(stub: Any, samples: list[Sample], deadline: float) -> None:
    """One of the heavy tenant's streams: a new request as soon as the last one ends."""
    n = 0
    while time.monotonic() < deadline:
        low, high = HEAVY_TOKENS
        samples.append(await _request(stub, "heavy", low + (n * 7) % (high - low + 1), n))
        n += 1


async def _phase(peer: Peer, plan: Plan, deadline: float) -> dict[str, list[Sample]]:
    """Light calls one at a time against one worker while the heavy tenant saturates it."""
    heavy: list[Sample] = []
    light: list[Sample] = []
    async with peer.aio_channel() as channel:
        stub = rpc.InferenceServiceStub(channel)
        tasks = [
            asyncio.create_task(_heavy_stream(stub, heavy, deadline)) for _ in range(HEAVY_STREAMS)
        ]
        try:
            # The heavy streams are queued once a slot's worth of them has finished once.
            while len(heavy) < SLOTS and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for n in range(plan.light_calls):
                if time.monotonic() >= deadline:
                    break
                light.append(await _request(stub, "light", LIGHT_TOKENS, n))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"heavy": heavy, "light": light}


def _summary(samples: list[Sample]) -> dict[str, float]:
    ttft = [s.ttft_ms for s in samples]
    queue = [s.queue_ms for s in samples]
    return {
        "requests": len(samples),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "queue_p50_ms": percentile(queue, 50),
        "queue_p99_ms": percentile(queue, 99),
    }


async def _rounds(peers: dict[str, Peer], plan: Plan) -> dict[str, Any]:
    deadline = time.monotonic() + plan.budget_s
    collected: dict[str, dict[str, list[Sample]]] = {
        mode: {"heavy": [], "light": []} for mode in MODES
    }
    for n in range(plan.rounds):
        order = MODES if n % 2 == 0 else MODES[::-1]
        for mode in order:
            phase_deadline = min(deadline, time.monotonic() + plan.budget_s / plan.rounds / 2)
            print(f"  F1: round {n + 1}/{plan.rounds}, {mode}", flush=True)
            got = await _phase(peers[mode], plan, phase_deadline)
            for tenant, samples in got.items():
                collected[mode][tenant] += samples
    results: dict[str, Any] = {
        mode: {tenant: _summary(samples) for tenant, samples in by_tenant.items()}
        for mode, by_tenant in collected.items()
    }
    results["light_ttft_ms"] = {  # in call order, for a look at the outliers
        mode: [round(s.ttft_ms, 1) for s in by_tenant["light"]]
        for mode, by_tenant in collected.items()
    }
    return results


@contextlib.contextmanager
def _workers(ctx: Context) -> Iterator[dict[str, Peer]]:
    lay, state = ctx.placement.layout, ctx.state
    pki_dir = bench_pki(state)
    env = {
        "TOKENMESH_MODELS": "",
        "TOKENMESH_TEST_MODELS": f"{MODEL}:1",
        "TOKENMESH_TEST_ENGINE_STEP_MS": str(STEP_MS),
        "TOKENMESH_MAX_SEQUENCES": str(SLOTS),
        "TOKENMESH_MAX_QUEUE": str(4 * HEAVY_STREAMS),
    }
    with (
        redis_server(state, name="redis-f") as redis_url,
        worker(
            state,
            redis_url,
            "f-tenant",
            pki_dir=pki_dir,
            prefix=lay.taskset(SUT),
            TOKENMESH_SCHEDULER_FAIRNESS="tenant",
            **env,
        ) as fair,
        worker(
            state,
            redis_url,
            "f-fifo",
            pki_dir=pki_dir,
            prefix=lay.taskset(SUT),
            TOKENMESH_SCHEDULER_FAIRNESS="fifo",
            **env,
        ) as fifo,
    ):
        for name, mode in (("f-tenant", "tenant"), ("f-fifo", "fifo")):
            ctx.placement.record(f"worker, {mode} scheduling (F1)", service_pid(state, name), SUT)
        yield {"tenant": fair, "fifo": fifo}


def measure(ctx: Context) -> dict[str, Any]:
    """Runs F1; returns per mode and tenant the TTFT and queue figures."""
    plan = Plan.of(ctx.quick)
    ctx.placement.record("bench + F1 client (both tenants)", os.getpid(), LOAD, 1)
    with pinned_self(ctx.placement.layout.load), _workers(ctx) as peers:
        results = asyncio.run(_rounds(peers, plan))
    results["plan"] = plan.__dict__
    results["load"] = {
        "slots": SLOTS,
        "step_ms": STEP_MS,
        "heavy_streams": HEAVY_STREAMS,
        "heavy_tokens": list(HEAVY_TOKENS),
        "light_tokens": LIGHT_TOKENS,
    }
    return results


def judge(results: dict[str, Any]) -> list[Row]:
    fair, fifo = results["tenant"], results["fifo"]
    light, light_fifo = fair["light"]["ttft_p99_ms"], fifo["light"]["ttft_p99_ms"]
    ratio = light / max(light_fifo, 1e-9)
    return [
        Row(
            "F1",
            f"light tenant's TTFT p99 while a heavy tenant keeps {HEAVY_STREAMS} streams open"
            f" on {SLOTS} slots (test engine, {STEP_MS} ms a step): fair vs FIFO, same run",
            "<= 1/3 of FIFO's",
            f"{light:.0f} ms ({ratio:.2f}x; p50 {fair['light']['ttft_p50_ms']:.0f} ms, worker"
            f" queue p99 {fair['light']['queue_p99_ms']:.0f} ms; heavy TTFT p50"
            f" {fair['heavy']['ttft_p50_ms']:.0f} ms; {fair['light']['requests']} light calls)",
            f"FIFO {light_fifo:.0f} ms (p50 {fifo['light']['ttft_p50_ms']:.0f} ms; heavy TTFT"
            f" p50 {fifo['heavy']['ttft_p50_ms']:.0f} ms)",
            passed=fair["light"]["requests"] > 0 and ratio <= 1 / 3,
        )
    ]
