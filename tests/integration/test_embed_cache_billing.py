"""An embed is charged for what it computes, and for what the cache serves as
TOKENMESH_CACHE_BILLING says: when its budget is reserved, and when its caller leaves.

A real worker with the embedding model and the response cache on, a real Redis,
billing "none" (an answer served without computing bills nothing).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.inference.admission import Request
from services.inference.budget import TokenBudgets
from services.inference.embedder import Embedder
from services.inference.pipeline.embed import EmbeddingPipeline
from services.inference.service import InferenceService
from tests.answer_headers import call_headers
from tests.integration.conftest import inference_settings, start_inference
from tests.rpc_errors import failed_call_reason
from tokenmesh.inference.v1 import inference_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "all-minilm-l6-v2"
Worker = tuple[InferenceService, Any]


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Worker]:
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_BILLING", "none")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(tmp_path, redis_url, models=(f"{MODEL}:1",), test_models=())
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService) and service.cache is not None
        yield service, channel


def _caller(key: str, monthly_tokens: int = 1_000_000) -> list[tuple[str, str]]:
    return [
        (contract.TENANT_HEADER, "t-embed-billing"),
        (contract.KEY_ID_HEADER, key),
        (contract.MONTHLY_TOKENS_HEADER, str(monthly_tokens)),
    ]


async def _stored(service: InferenceService) -> None:
    """Waits until no input is pending: every computation stored its vectors."""
    assert service.cache is not None
    async with asyncio.timeout(10):
        while service.cache.embedding_inputs.pending:
            await asyncio.sleep(0.01)


async def _usage_event(service: InferenceService, request_id: str) -> v1_pb.UsageEvent:
    """Waits for the usage event of `request_id` in the worker's usage stream."""
    client = aioredis.from_url(service.settings.redis_url)
    try:
        async with asyncio.timeout(10):
            while True:
                entries: Any = await client.xrange(service.settings.usage_stream)
                for _, fields in entries:
                    event = v1_pb.UsageEvent.FromString(fields[b"event"])
                    if event.request_id == request_id:
                        return event
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_a_cached_embed_is_served_to_a_spent_budget_when_hits_bill_nothing(worker):
    """The whole prompt was reserved before the cache was read: under billing "none" a
    key whose month was spent was refused an embed the cache answered (billed 0), while
    a Complete the cache answered was served."""
    service, channel = worker
    stub = rpc.InferenceServiceStub(channel)
    text = f"an input the cache holds {uuid.uuid4().hex}"
    await stub.Embed(pb.EmbedRequest(model=MODEL, inputs=[text]), metadata=_caller("key-rich"))
    await _stored(service)

    spent = _caller("key-spent", monthly_tokens=1)
    # Its month is over its (lowered) budget: reserving even 0 tokens was refused.
    client = aioredis.from_url(service.settings.redis_url)
    month = TokenBudgets.month_key("key-spent", time.time())
    await client.set(month, 50, ex=3600)
    await client.aclose()
    call = stub.Embed(
        pb.EmbedRequest(model=MODEL, inputs=[text], request_id="served-1"), metadata=spent
    )
    answer = await call
    assert (await call_headers(call))[contract.CACHE_HEADER] == "hit"
    assert answer.usage.prompt_tokens > 1
    event = await _usage_event(service, "served-1")
    assert (event.cached, event.usage.total_tokens) == (True, 0)
    # An input it must compute still needs room: refused, in words an embed's caller reads.
    fresh = stub.Embed(pb.EmbedRequest(model=MODEL, inputs=[text, f"new {text}"]), metadata=spent)
    assert await failed_call_reason(fresh) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUEST_EXCEEDS_BUDGET",
    )
    assert "inputs" in (await fresh.details() or "")


async def test_an_embed_whose_caller_leaves_while_it_waits_is_billed_what_it_computed(
    worker, monkeypatch
):
    """An embed cancelled while it waited for another request's computation of its
    input was billed its whole prompt: more than the input would bill served, for
    nothing received. It is billed what it set computing: here nothing."""
    service, channel = worker
    stub = rpc.InferenceServiceStub(channel)
    held = asyncio.Event()
    started = asyncio.Event()
    real_embed = Embedder.embed

    async def slow_embed(self: Embedder, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        started.set()
        await held.wait()
        vectors: np.ndarray = await real_embed(self, encoded)
        return vectors

    monkeypatch.setattr(Embedder, "embed", slow_embed)
    looked_up = asyncio.Event()
    real_lookup = EmbeddingPipeline._lookup

    async def observed_lookup(
        self: EmbeddingPipeline, context: Any, call: Request, *args: Any
    ) -> Any:
        found = await real_lookup(self, context, call, *args)
        if call.request_id == "left-1":
            looked_up.set()
        return found

    monkeypatch.setattr(EmbeddingPipeline, "_lookup", observed_lookup)
    text = f"an input being computed {uuid.uuid4().hex}"
    leader = asyncio.ensure_future(
        stub.Embed(pb.EmbedRequest(model=MODEL, inputs=[text]), metadata=_caller("key-leader"))
    )
    async with asyncio.timeout(10):
        await started.wait()
    waiter = stub.Embed(
        pb.EmbedRequest(model=MODEL, inputs=[text], request_id="left-1"),
        metadata=_caller("key-waiter"),
    )
    waiting = asyncio.ensure_future(waiter)
    async with asyncio.timeout(10):  # admitted: it waits for the leader's computation
        await looked_up.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    event = await _usage_event(service, "left-1")
    assert event.finish_reason == "cancelled"
    assert event.usage.total_tokens == 0
    held.set()
    assert (await leader).usage.prompt_tokens > 0
