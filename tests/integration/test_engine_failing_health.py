"""A version whose engine steps keep failing leaves service, and comes back when they work.

Its engine failed every step (every request INTERNAL) while its health entry
stayed SERVING, so the edge kept routing to it ahead of healthy workers and the
model's fallback (services/inference/step_health.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.inference import step_health
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

NAMES = (
    "tokenmesh.inference.v1.InferenceService/deterministic-test/1",
    "tokenmesh.inference.v2.InferenceService/deterministic-test/1",
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _statuses(channel: grpc.aio.Channel) -> list[Any]:
    health: Any = health_pb2_grpc.HealthStub(channel)
    return [
        (await health.Check(health_pb2.HealthCheckRequest(service=name))).status for name in NAMES
    ]


async def _wait_for(channel: grpc.aio.Channel, wanted: Sequence[Any]) -> None:
    async def reached() -> None:
        while await _statuses(channel) != list(wanted):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(reached(), 10)


async def test_a_version_whose_steps_keep_failing_is_not_serving_until_they_work(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_health, "FIRST_PAUSE_S", 0.5)
    settings = inference_settings(tmp_path, redis_url, test_models=("deterministic-test:1",))
    async with await start_inference(settings) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1)
        assert await _statuses(channel) == [SERVING, SERVING]
        engine = service.registry.resolve("deterministic-test", "1").scheduler.engine
        working = engine.forward

        def broken(items: Any) -> Any:
            raise RuntimeError("the device is gone")

        engine.forward = broken
        for _ in range(step_health.FAILING_AFTER):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Complete(request, timeout=10)
            assert failed.value.code() == grpc.StatusCode.INTERNAL
        await _wait_for(channel, [NOT_SERVING, NOT_SERVING])
        assert _failing_gauge() == 1
        # The rest of the worker serves on (other versions, the overall entry).
        overall: Any = health_pb2_grpc.HealthStub(channel)
        answer = await overall.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == SERVING
        # After its pause it is tried again (SERVING), still broken for the gauge until
        # a step works: it read 0 between pauses, never 1 for an alert's 2 minutes.
        await _wait_for(channel, [SERVING, SERVING])
        assert _failing_gauge() == 1
        engine.forward = working
        reply = await stub.Complete(request, timeout=10)
        assert reply.usage.completion_tokens == 1
        assert await _statuses(channel) == [SERVING, SERVING]
        assert _failing_gauge() == 0


def _failing_gauge() -> float | None:
    labels = {"model": "deterministic-test", "version": "1"}
    return REGISTRY.get_sample_value("tokenmesh_engine_failing", labels)


async def test_a_health_change_that_meets_an_unload_leaves_the_version_out(
    tmp_path: Path, redis_url: str
) -> None:
    # The engine thread's health change arrived as an unload began (it read the
    # version as loaded), and its task set the entries SERVING after the unload had
    # set them NOT_SERVING: the unloaded version's entries stayed SERVING for good.
    settings = inference_settings(tmp_path, redis_url, test_models=("deterministic-test:1",))
    async with await start_inference(settings) as (service, channel):
        model = service.registry.resolve("deterministic-test", "1")
        unload = asyncio.create_task(service.unload("deterministic-test", "1"))
        await asyncio.sleep(0)  # the unload's task is queued, the version not unloading yet
        assert not model.unloading
        service._engine_health_changed(model)
        await asyncio.wait_for(unload, 30)
        await asyncio.wait_for(asyncio.gather(*service._health_tasks), 10)
        assert await _statuses(channel) == [NOT_SERVING, NOT_SERVING]
