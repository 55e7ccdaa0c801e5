"""F1's and J1's streams end at a deadline when a worker stops sending: the scenarios
check their own deadlines between calls only, so a stalled call would hang `make bench`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from bench import fairness, jobs_load
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc


class Stalled(rpc.InferenceServiceServicer):
    """A worker that accepts a Generate and never sends (a scheduler stall)."""

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield pb.GenerateResponse()


@pytest.fixture
async def stalled() -> AsyncIterator[Any]:
    server = grpc.aio.server()
    rpc.add_InferenceServiceServicer_to_server(Stalled(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield rpc.InferenceServiceStub(channel)
    finally:
        await server.stop(None)


async def test_an_f1_call_to_a_stalled_worker_ends_at_its_deadline(
    stalled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fairness, "CALL_TIMEOUT_S", 0.5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(fairness._request(stalled, "light", 8, 0), 10)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_j1_call_to_a_stalled_worker_ends_at_its_deadline(
    stalled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_load, "CALL_TIMEOUT_S", 0.5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(jobs_load._ttft(stalled, 0), 10)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_j1s_time_budget_follows_the_runs_pacing() -> None:
    full = jobs_load.Plan.of(quick=False)
    assert full.paced(0.6).budget_s == pytest.approx(full.budget_s * 0.6)
    assert full.paced(0.6).items == 2000  # the row's target is a 2,000-item job
    # Within a few times the seconds the run's pacing plans for it (registry: 50 s).
    from bench.registry import SCENARIOS

    planned = next(s.seconds for s in SCENARIOS if s.name == "jobs")
    assert full.budget_s <= 3 * planned
