"""An embedding version's outcomes reach the router in the worker's heartbeat.

The load report skipped every version without a scheduler, so an embedding
version's rollout never saw a request and waited for good (its error gate
had nothing to read). A real worker serving all-minilm-l6-v2 over gRPC.
"""

from __future__ import annotations

from pathlib import Path

from services.inference.load_report import worker_load
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

EMBEDDINGS = "all-minilm-l6-v2"


async def test_an_embedding_versions_requests_are_in_the_load_report(
    tmp_path: Path, redis_url: str
) -> None:
    settings = inference_settings(tmp_path, redis_url, models=(f"{EMBEDDINGS}:1",), test_models=())
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        stub = v2_rpc.InferenceServiceStub(channel)
        for text in ("one", "two", "three"):
            await stub.Embed(v2.EmbedRequest(model=EMBEDDINGS, inputs=[text]))
        load = worker_load(service.registry.all())
        outcomes = {(v.model.name, v.model.version): v for v in load.versions}
        assert outcomes[(EMBEDDINGS, "1")].requests == 3
        assert outcomes[(EMBEDDINGS, "1")].errors == 0
        assert load.max_sequences == 0  # no generative capacity was invented for it
