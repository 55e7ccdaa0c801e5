"""Batch-priority requests stay out of the TTFTs that price a worker and gate a rollout.

A job item (or a v2 PRIORITY_BATCH request) waits behind every interactive
request by design, so its time to first token is mostly queue time. Counted
in, a worker that ran a job's backlog read as slow in its load report (its
weight fell, live traffic pushed off it) and a canary that received job
items read as slower than its stable version. A real worker over gRPC.
"""

from __future__ import annotations

from pathlib import Path

from services.inference.load_report import worker_load
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

MODEL = "deterministic-test"


async def test_batch_requests_are_counted_apart_from_the_ttft_samples(
    tmp_path: Path, redis_url: str
) -> None:
    settings = inference_settings(tmp_path, redis_url, test_models=(f"{MODEL}:1",))
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        stub = v2_rpc.InferenceServiceStub(channel)
        for _ in range(2):
            await stub.Complete(v2.CompleteRequest(model=MODEL, prompt="hi", max_output_tokens=2))
        for _ in range(3):
            batch = v2.CompleteRequest(
                model=MODEL, prompt="hi", max_output_tokens=2, priority=resources.PRIORITY_BATCH
            )
            await stub.Complete(batch)
        load = worker_load(service.registry.all())
        (outcomes,) = [v for v in load.versions if v.model.name == MODEL]
        assert (outcomes.requests, outcomes.errors) == (5, 0)
        assert (outcomes.batch_requests, outcomes.batch_errors) == (3, 0)
        assert sum(outcomes.ttft_bucket_counts) == 2
        assert load.ttft_samples == 2
