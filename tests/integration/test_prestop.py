"""The preStop hook's wait: a real worker's /metrics says when no sequence is in flight."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from services.inference import prestop
from services.inference.service import InferenceSettings
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc


def _in_flight() -> float:
    # The worker runs in this process: its /metrics is this registry.
    return prestop.in_flight(generate_latest().decode())


async def test_in_flight_counts_a_running_stream_and_drops_to_zero_after(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    assert _in_flight() == 0
    stream = stub.Generate(
        pb.GenerateRequest(model="deterministic-test", prompt="slow", max_output_tokens=200)
    )
    await stream.read()  # the first token: the sequence is running
    assert _in_flight() >= 1
    stream.cancel()
    async with asyncio.timeout(10):
        while _in_flight():
            await asyncio.sleep(0.02)


async def test_the_hook_returns_at_once_without_a_router_or_metrics_port():
    settings = InferenceSettings(router_address="", metrics_port=-1)
    async with asyncio.timeout(5):
        await prestop.run(settings)
