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
        # The rest of the worker serves on (other versions, the overall entry).
        overall: Any = health_pb2_grpc.HealthStub(channel)
        answer = await overall.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == SERVING
        # After its pause it is tried again; the step works now, and it stays in.
        engine.forward = working
        await _wait_for(channel, [SERVING, SERVING])
        reply = await stub.Complete(request, timeout=10)
        assert reply.usage.completion_tokens == 1
        assert await _statuses(channel) == [SERVING, SERVING]
