"""An embedding input another request computed while this one read the cache is not
computed again.

A request reads the response cache for its inputs, then joins the computations
pending on this worker for the ones it missed. A read sent before another
request's store landed, and back only after that request stopped listing its
inputs as pending, found them in neither place: the inputs were computed twice
(seen in CI's e2e test of ten concurrent embeds sharing four inputs: 18 inputs
computed instead of 14). A real worker with the embedding model and a real
Redis; the second request's cache read is held until the first one's
computation has stored and let go of its inputs, which widens the window the
race needs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.inference.pipeline.cache import ResponseCache
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "all-minilm-l6-v2"


def _computed() -> float:
    labels = {"model": MODEL, "result": "computed"}
    return REGISTRY.get_sample_value("tokenmesh_embedding_inputs_total", labels) or 0.0


async def test_an_input_stored_during_a_cache_read_is_read_again_not_computed(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(tmp_path, redis_url, models=(f"{MODEL}:1",), test_models=())
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService) and service.cache is not None
        inputs = service.cache.embedding_inputs
        real_get_many = ResponseCache.get_many
        reads = 0

        async def get_many(self: ResponseCache, keys: Sequence[str]) -> list[bytes | None]:
            nonlocal reads
            reads += 1
            mine = reads
            entries = await real_get_many(self, keys)  # sent before any store
            if mine == 2:  # the other request's read: back once the first request's
                async with asyncio.timeout(10):  # computation stored and let go
                    while _computed() == before or inputs.pending:
                        await asyncio.sleep(0.005)
            return entries

        monkeypatch.setattr(ResponseCache, "get_many", get_many)
        stub = rpc.InferenceServiceStub(channel)
        shared = f"shared {uuid.uuid4().hex}"
        before = _computed()
        answers = await asyncio.gather(
            stub.Embed(pb.EmbedRequest(model=MODEL, inputs=[shared])),
            stub.Embed(pb.EmbedRequest(model=MODEL, inputs=[shared])),
        )
        assert _computed() - before == 1
        assert answers[0].embeddings[0].values == answers[1].embeddings[0].values
