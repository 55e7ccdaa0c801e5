"""J1: interactive TTFT while a 2,000-item job runs, against the same worker without one.

One worker serves the deterministic test engine (10 ms a step, 8 slots: a
request's time is its queue and its tokens, not this VM's speed); the jobs
service (its own process, as in the mesh) finds it in the worker registry
and runs a job of 2,000 Complete items (4 tokens each) at batch priority
(on the load generator's core: in a deployment it has hosts of its own),
at most 4 at a time for the tenant (TOKENMESH_JOBS_TENANT_CONCURRENCY's
default). Meanwhile an interactive tenant sends one 8-token Generate at a
time straight to the worker, as the edge does, and the client times its
first token. Without the job: the same calls, half before the job is
submitted and half after it ended (so drift on a shared VM hits both).

Target: the interactive TTFT p99 with the job <= 1.5x its p99 without. The
job's own figures (items/s, wall time) are reported beside it. `--quick`
runs 300 items instead of 2,000 (a smoke run, said so in the row).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import redis

from bench.peers import Peer, bench_pki
from bench.pinning import LOAD, SUT, pinned_self
from bench.rows import Context, Row, row
from bench.servers import redis_server, service, service_pid, worker
from bench.stats import percentile
from services.core import contract
from services.router.registry import WORKERS_KEY, WorkerEntry
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb
from tokenmesh.jobs.v1 import jobs_service_pb2_grpc as jobs_rpc

MODEL = "deterministic-test"
SLOTS = 8
STEP_MS = 10
ITEM_TOKENS = 4
LIGHT_TOKENS = 8
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
#: CALL_TIMEOUT_S: each interactive call's deadline (an 8-token call takes ~0.1 s; the
#: budget is checked between calls only, so a stalled worker would hang the run).
CALL_TIMEOUT_S = 30.0
# The job's owner, as the edge would vouch for it.
OWNER = (
    (contract.KEY_ID_HEADER, "bench-jobs-key"),
    (contract.TENANT_HEADER, "batch"),
    (contract.SCOPES_HEADER, "inference:generate jobs"),
)


@dataclass(frozen=True)
class Plan:
    """Plan bounds the scenario: job items, calls without the job, and time."""

    items: int
    baseline_calls: int
    budget_s: float

    @classmethod
    def of(cls, quick: bool) -> Plan:
        # The job of 2,000 items took 25-35 s, the scenario ~50 s (its registry seconds):
        # 120 s leaves a slow VM room and keeps `make bench` within its bound.
        return cls(300, 20, 60.0) if quick else cls(2000, 200, 120.0)

    def paced(self, scale: float) -> Plan:
        """The plan with its time budget at `scale` (bench.rows.Context.scale); the job
        keeps its items (the row's target is a 2,000-item job)."""
        return replace(self, budget_s=self.budget_s * scale)


async def _ttft(stub: Any, n: int) -> float:
    request = pb.GenerateRequest(
        model=MODEL,
        prompt="hello mesh",
        max_output_tokens=LIGHT_TOKENS,
        sampling=resources.SamplingParams(seed=n),
    )
    started = time.perf_counter()
    ttft = 0.0
    metadata = ((contract.TENANT_HEADER, "light"),)
    async for message in stub.Generate(request, metadata=metadata, timeout=CALL_TIMEOUT_S):
        if message.token_ids and not ttft:
            ttft = (time.perf_counter() - started) * 1000
    return ttft


def _job_request(items: int) -> jobs_pb.CreateJobRequest:
    return jobs_pb.CreateJobRequest(
        items=[
            jobs_pb2.JobItem(
                complete=pb.CompleteRequest(
                    model=MODEL,
                    prompt=f"item {i}",
                    max_output_tokens=ITEM_TOKENS,
                    sampling=resources.SamplingParams(seed=i),
                )
            )
            for i in range(items)
        ]
    )


async def _measure(worker_peer: Peer, jobs_peer: Peer, plan: Plan) -> dict[str, Any]:
    deadline = time.monotonic() + plan.budget_s
    half = plan.baseline_calls // 2
    async with worker_peer.aio_channel() as wc, jobs_peer.aio_channel() as jc:
        stub, jobs = rpc.InferenceServiceStub(wc), jobs_rpc.JobsServiceStub(jc)
        for n in range(3):  # warm-up: channels, the worker's first requests
            await _ttft(stub, 10_000 + n)
        without = [await _ttft(stub, n) for n in range(half)]
        submitted = time.monotonic()
        job = await jobs.CreateJob(_job_request(plan.items), metadata=OWNER, timeout=60)
        with_job: list[float] = []
        while job.status not in FINAL and time.monotonic() < deadline:
            with_job.append(await _ttft(stub, len(with_job)))
            job = await jobs.GetJob(jobs_pb.GetJobRequest(id=job.id), metadata=OWNER, timeout=10)
        job_s = time.monotonic() - submitted
        if job.status not in FINAL:
            await jobs.CancelJob(jobs_pb.CancelJobRequest(id=job.id), metadata=OWNER, timeout=10)
        without += [await _ttft(stub, half + n) for n in range(plan.baseline_calls - half)]
    done = job.counts.succeeded + job.counts.failed
    return {
        "without_job": _summary(without),
        "with_job": _summary(with_job),
        "job": {
            "status": job.status,
            "items": plan.items,
            "succeeded": job.counts.succeeded,
            "failed": job.counts.failed,
            "wall_s": round(job_s, 2),
            "items_per_s": round(done / max(job_s, 1e-9), 1),
        },
    }


def _summary(ttft: list[float]) -> dict[str, float]:
    return {
        "requests": len(ttft),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
    }


def _register(redis_url: str, peer: Peer) -> None:
    """Puts the worker in the registry the jobs service reads (no router in this scenario)."""
    host, port = peer.address.rsplit(":", 1)
    entry = WorkerEntry("j1-worker", host, int(port), ((MODEL, "1"),))
    entry = WorkerEntry(**{**entry.__dict__, "lease_expires_at": time.time() + 3600})
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(WORKERS_KEY, entry.worker_id, entry.to_json())
    finally:
        client.close()


@contextlib.contextmanager
def _mesh(ctx: Context) -> Iterator[tuple[Peer, Peer]]:
    lay, state = ctx.placement.layout, ctx.state
    pki_dir = bench_pki(state)
    with (
        redis_server(state, name="redis-j") as redis_url,
        worker(
            state,
            redis_url,
            "j-worker",
            pki_dir=pki_dir,
            prefix=lay.taskset(SUT),
            TOKENMESH_MODELS="",
            TOKENMESH_TEST_MODELS=f"{MODEL}:1",
            TOKENMESH_TEST_ENGINE_STEP_MS=str(STEP_MS),
            TOKENMESH_MAX_SEQUENCES=str(SLOTS),
        ) as worker_peer,
    ):
        _register(redis_url, worker_peer)
        with service(
            state,
            "j-jobs",
            "services.jobs",
            60,
            pki_dir=pki_dir,
            identity=contract.JOBS,
            # Its own host in a deployment: here beside the client, off the worker's core.
            prefix=lay.taskset(LOAD),
            REDIS_URL=redis_url,
            TOKENMESH_JOBS_CONSUMER="j1",
        ) as jobs_peer:
            ctx.placement.record("worker (J1)", service_pid(state, "j-worker"), SUT)
            ctx.placement.record("jobs service (J1)", service_pid(state, "j-jobs"), LOAD)
            yield worker_peer, jobs_peer


def measure(ctx: Context) -> dict[str, Any]:
    """Runs J1; returns the interactive TTFT with and without the job, and the job's figures."""
    plan = Plan.of(ctx.quick).paced(ctx.scale)
    ctx.placement.record(
        "bench + J1 client (interactive calls, the job's owner)", os.getpid(), LOAD, 1
    )
    with pinned_self(ctx.placement.layout.load), _mesh(ctx) as (worker_peer, jobs_peer):
        results = asyncio.run(_measure(worker_peer, jobs_peer, plan))
    results["plan"] = plan.__dict__
    results["load"] = {"slots": SLOTS, "step_ms": STEP_MS, "item_tokens": ITEM_TOKENS}
    return results


def judge(results: dict[str, Any]) -> list[Row]:
    without, with_job, job = results["without_job"], results["with_job"], results["job"]
    ratio = with_job["ttft_p99_ms"] / max(without["ttft_p99_ms"], 1e-9)
    scaled = "" if job["items"] == 2000 else f" (--quick: {job['items']} items, not 2,000)"
    return [
        row(
            "J1",
            f"{ratio:.2f}x: p99 {with_job['ttft_p99_ms']:.1f} ms (p50"
            f" {with_job['ttft_p50_ms']:.1f} ms, {with_job['requests']} calls) while the job ran"
            f"{scaled}; job {job['status']} {job['succeeded']}/{job['items']} in"
            f" {job['wall_s']:.0f} s ({job['items_per_s']:.0f} items/s)",
            job["status"] == "SUCCEEDED" and with_job["requests"] > 0 and ratio <= 1.5,
            baseline=f"without the job: p99 {without['ttft_p99_ms']:.1f} ms (p50"
            f" {without['ttft_p50_ms']:.1f} ms, {without['requests']} calls)",
        )
    ]
