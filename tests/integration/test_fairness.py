"""Fair sharing between tenants on a real worker (deterministic test engine, two slots).

A heavy tenant opens more streams than the worker has slots; once its extra
streams wait, a light tenant sends one request. With tenant fairness the
light request takes the next free slot (its first token comes before those
of the heavy tenant's queued streams); first come, first served puts it behind
them. Asserted on the order of first tokens and on the v2 timing's queue_ms,
never on wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from prometheus_client import REGISTRY

from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
SLOTS = 2
HEAVY_STREAMS = 6  # four of them wait for a slot


async def _stream(
    stub: Any,
    tenant: str,
    name: str,
    max_tokens: int,
    first_tokens: list[str],
) -> float:
    """Streams one request; appends `name` to `first_tokens` at its first token.

    Returns the request's queue_ms (v2 timing).
    """
    request = pb.GenerateRequest(
        model=MODEL,
        prompt="hello mesh",
        max_output_tokens=max_tokens,
        sampling=resources.SamplingParams(seed=1),
        request_id=f"fair-{name}",
    )
    queue_ms = -1.0
    async for message in stub.Generate(request, metadata=(("x-tokenmesh-tenant", tenant),)):
        if message.token_ids and name not in first_tokens:
            first_tokens.append(name)
        if message.HasField("finish_reason"):
            queue_ms = message.timing.queue_ms
    return queue_ms


async def _occupancy(service: InferenceService, running: int, waiting: int) -> None:
    """Waits until the worker runs and queues that many sequences."""
    scheduler = service.registry.resolve(MODEL, "1").scheduler
    assert scheduler is not None
    async with asyncio.timeout(30):
        while (scheduler.stats()["running"], scheduler.stats()["waiting"]) != (running, waiting):
            await asyncio.sleep(0.01)


def _served_tokens(tenant: str) -> float:
    labels = {"model": MODEL, "version": "1", "tenant": tenant, "kind": "completion"}
    return REGISTRY.get_sample_value("tokenmesh_tenant_service_tokens_total", labels) or 0.0


async def _metrics_count(tokens: float) -> None:
    """Waits until the per-tenant service metric (published every 0.25 s) shows `tokens`."""
    async with asyncio.timeout(10):
        while _served_tokens("light") < tokens:
            await asyncio.sleep(0.05)


async def _heavy_then_light(
    service: InferenceService, channel: grpc.aio.Channel
) -> tuple[list[str], dict[str, float]]:
    stub = rpc.InferenceServiceStub(channel)
    first_tokens: list[str] = []
    # Different lengths, so the two running streams free their slots at different steps.
    heavy = {
        f"heavy{i}": asyncio.create_task(
            _stream(stub, "heavy", f"heavy{i}", 20 + 4 * i, first_tokens)
        )
        for i in range(HEAVY_STREAMS)
    }
    await _occupancy(service, SLOTS, HEAVY_STREAMS - SLOTS)
    light = asyncio.create_task(_stream(stub, "light", "light", 4, first_tokens))
    names = [*heavy, "light"]
    queue_ms = await asyncio.gather(*heavy.values(), light)
    return first_tokens, dict(zip(names, queue_ms, strict=True))


@pytest.mark.parametrize("fairness", ["tenant", "fifo"])
async def test_a_light_tenant_is_not_queued_behind_a_heavy_tenants_streams(
    tmp_path: Path, redis_url: str, fairness: str
) -> None:
    settings = inference_settings(
        tmp_path,
        redis_url,
        test_models=(f"{MODEL}:1",),
        test_engine_step_ms=20.0,
        max_sequences=SLOTS,
        scheduler_fairness=fairness,
    )
    served_before = _served_tokens("light")
    async with await start_inference(settings) as (service, channel):
        first_tokens, queue_ms = await _heavy_then_light(service, channel)
        await _metrics_count(served_before + 4)  # the light request's 4 tokens
    light_at = first_tokens.index("light")
    if fairness == "tenant":
        # The first slot to free goes to the light tenant: its first token comes right
        # after those of the two heavy streams that were running, before any queued one.
        assert light_at == SLOTS, first_tokens
        # The heavy streams served after it were queued before it, and waited longer.
        assert all(queue_ms["light"] < queue_ms[name] for name in first_tokens[light_at + 1 :])
    else:
        assert light_at == HEAVY_STREAMS, first_tokens  # first come, first served: last
