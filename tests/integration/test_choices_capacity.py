"""A request with more choices than its model version runs and queues at once.

With max_sequences=2 and max_queue=0, an n=3 request was refused QUEUE_FULL
(RESOURCE_EXHAUSTED, retry in 1 s) on an idle worker, every try: no wait makes room.
It is INVALID_ARGUMENT on `n` now, and no sibling choice starts first. A real worker.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.integration.conftest import inference_settings, start_inference
from tests.rpc_errors import violated_fields
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"


async def test_more_choices_than_slots_and_queue_is_refused_for_good(
    tmp_path: Path, redis_url: str
) -> None:
    settings = inference_settings(tmp_path, redis_url, max_sequences=2, max_queue=0)
    async with await start_inference(settings) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model=MODEL, prompt="hi", n=3, max_output_tokens=4)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(refused.value) == ["n"]
        scheduler = service.registry.resolve(MODEL, "").scheduler
        assert scheduler is not None and scheduler.stats()["running"] == 0  # none started
        fits = pb.CompleteRequest(model=MODEL, prompt="hi", n=2, max_output_tokens=4)
        assert len((await stub.Complete(fits)).choices) == 2


async def test_choices_the_kv_budget_never_runs_together_are_refused_for_good(
    tmp_path: Path, redis_url: str
) -> None:
    """Slots for both, but KV for one at a time and no queue: no wait makes room."""
    settings = inference_settings(
        tmp_path, redis_url, max_sequences=4, max_queue=0, max_kv_tokens=100
    )
    async with await start_inference(settings) as (_, channel):
        stub = rpc.InferenceServiceStub(channel)
        one = pb.CompleteRequest(model=MODEL, prompt="hi", n=1, max_output_tokens=80)
        assert len((await stub.Complete(one)).choices) == 1  # one alone runs
        two = pb.CompleteRequest(model=MODEL, prompt="hi", n=2, max_output_tokens=80)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(two)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
