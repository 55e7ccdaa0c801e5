"""The jobs service reaches a worker only with the certificate of the pool its
registration named, as the edge does (docs/security.md, "Worker pools").

A real worker holding the shared `worker` certificate, and the jobs service's own
executor over real mTLS: a registry entry that says `gpu` for it (what a tampered
registry would hold) gets no connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.jobs.workers import Placement
from tests.integration.test_jobs_kept_answer import MODEL, _watched_worker


async def _health(executor: Any, placement: Placement) -> int:
    executor._stub(placement)  # the executor's channel for this placement
    health: Any = health_pb2_grpc.HealthStub(
        executor._channels[(placement.address, placement.pool)].get()
    )
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def test_a_job_reaches_a_worker_only_with_its_pools_certificate(
    tmp_path: Path, own_redis: str
):
    async with _watched_worker(tmp_path, own_redis, False, test_models=(f"{MODEL}:1",)) as jobs:
        (worker,) = await jobs.directory.workers()
        placed = await jobs.directory.pick((MODEL, "1"), "r")
        assert placed == Placement(worker.address, "1", "")
        assert await _health(jobs, placed) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(jobs, Placement(worker.address, "1", "gpu"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
