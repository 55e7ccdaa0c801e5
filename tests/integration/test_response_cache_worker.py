"""The response cache and coalescing on a real worker (gRPC direct, real Redis), cache on.

The edge-facing checks (REST headers, tenants, SSE) are tests/e2e/test_response_cache.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.inference.pipeline.cache import COMPUTED_SEQUENCES, EMBEDDING_INPUTS
from services.inference.service import InferenceService
from tests.answer_headers import call_headers
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_inference_v2 import _usage_event
from tests.prompts import unique_prompt
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"


@pytest.fixture
async def cached_worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(
        tmp_path, redis_url, models=("all-minilm-l6-v2:1",), test_engine_step_ms=20.0
    )
    async with await start_inference(settings) as pair:
        yield pair


def _computed(model: str = MODEL) -> float:
    return COMPUTED_SEQUENCES.labels(model)._value.get()  # type: ignore[no-any-return]


async def _complete(stub: Any, request: pb.CompleteRequest) -> tuple[pb.CompleteResponse, str]:
    call = stub.Complete(request)
    response = await call
    return response, (await call_headers(call))["x-tokenmesh-cache"]


async def test_a_seeded_completion_is_computed_once_then_served(cached_worker):
    service, channel = cached_worker
    stub = rpc.InferenceServiceStub(channel)
    request = pb.CompleteRequest(model=MODEL, prompt=unique_prompt("p"), max_output_tokens=6)
    request.sampling.seed = 9
    before = _computed()
    versions = [m.outcomes for m in service.registry.all() if m.name == MODEL]
    outcomes_before = [(v.requests, sum(v.ttft_counts)) for v in versions]
    miss, miss_status = await _complete(stub, request)
    hit, hit_status = await _complete(stub, request)
    assert (miss_status, hit_status) == ("miss", "hit")
    assert hit.choices[0].text == miss.choices[0].text and hit.usage == miss.usage
    ttft = [r.choices[0].timing.time_to_first_token_ms for r in (miss, hit)]
    assert ttft[1] < ttft[0]
    assert _computed() - before == 1
    # The version's outcomes (rollout gates, load weights) count the computation only:
    # a hit's 1-3 ms TTFT made a canary read faster than it computes.
    outcomes_after = [(v.requests, sum(v.ttft_counts)) for v in versions]
    added = [(a - b, c - d) for (a, c), (b, d) in zip(outcomes_after, outcomes_before, strict=True)]
    assert sorted(added) == [(0, 0), (1, 1)]
    request.cache = 2  # CACHE_MODE_NO_STORE
    assert (await _complete(stub, request))[1] == "bypass"
    unseeded = pb.CompleteRequest(model=MODEL, prompt="random", max_output_tokens=2)
    unseeded.sampling.temperature = 0.7
    assert (await _complete(stub, unseeded))[1] == "bypass"


async def test_concurrent_identical_streams_share_one_sequence(cached_worker):
    _, channel = cached_worker
    stub = rpc.InferenceServiceStub(channel)
    request = pb.GenerateRequest(model=MODEL, prompt=unique_prompt("s"), max_output_tokens=20)
    request.sampling.seed = 4
    before = _computed()

    async def stream(index: int) -> tuple[str, str]:
        mine = pb.GenerateRequest()
        mine.CopyFrom(request)
        mine.request_id = f"r{index}-{uuid.uuid4().hex[:6]}"
        call = stub.Generate(mine)
        status = dict(await call.initial_metadata())["x-tokenmesh-cache"]
        text = ""
        async for message in call:
            assert message.request_id == mine.request_id
            text += message.text
            if index == 0:
                call.cancel()  # one waiter leaves: the others go on
                break
        return status, text

    results = await asyncio.gather(*(stream(i) for i in range(16)))
    texts = {text for _, text in results[1:]}
    assert len(texts) == 1 and texts.pop()
    statuses = [status for status, _ in results]
    assert statuses.count("miss") == 1 and set(statuses) <= {"miss", "coalesced", "hit"}
    assert _computed() - before == 1


async def test_concurrent_embeddings_compute_each_distinct_input_once(cached_worker):
    _, channel = cached_worker
    stub = rpc.InferenceServiceStub(channel)
    shared = [f"shared {i} {uuid.uuid4().hex}" for i in range(3)]
    requests = [
        pb.EmbedRequest(model="all-minilm-l6-v2", inputs=[*shared, f"own {i} {uuid.uuid4().hex}"])
        for i in range(10)
    ]
    computed = EMBEDDING_INPUTS.labels("all-minilm-l6-v2", "computed")
    before = computed._value.get()
    replies = await asyncio.gather(*(stub.Embed(r) for r in requests))
    assert computed._value.get() - before == len(shared) + len(requests)
    first = [list(e.values) for e in replies[0].embeddings[:3]]
    assert all([list(e.values) for e in r.embeddings[:3]] == first for r in replies)


async def test_a_follower_refused_by_its_own_budget_is_not_billed(cached_worker):
    # A key out of token budget joined a stream another key of its tenant computes:
    # its caller got RESOURCE_EXHAUSTED, yet a usage event billed it the prompt.
    service, channel = cached_worker
    stub = rpc.InferenceServiceStub(channel)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    request = pb.GenerateRequest(model=MODEL, prompt=unique_prompt("b"), max_output_tokens=20)
    request.sampling.seed = 5

    def call(key: str, request_id: str, monthly: int = 0) -> Any:
        mine = pb.GenerateRequest()
        mine.CopyFrom(request)
        mine.request_id = request_id
        metadata = [(contract.TENANT_HEADER, tenant), (contract.KEY_ID_HEADER, key)]
        if monthly:
            metadata.append((contract.MONTHLY_TOKENS_HEADER, str(monthly)))
        return stub.Generate(mine, metadata=metadata)

    leader_id, follower_id = f"lead-{tenant}", f"poor-{tenant}"
    leader = call(f"rich-{tenant}", leader_id)
    assert dict(await leader.initial_metadata())["x-tokenmesh-cache"] == "miss"
    follower = call(f"poor-{tenant}", follower_id, monthly=1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in follower:
            pass
    # (monthly_tokens=1 holds no request of its: refused for good, not "retry later")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    async for _ in leader:
        pass
    # Events ship in order: once the leader's (appended after) is in, a follower's is too.
    await _usage_event(service, leader_id)
    assert await _usage_events(service, follower_id) == []


async def _usage_events(service: InferenceService, request_id: str) -> list[Any]:
    client = aioredis.from_url(service.settings.redis_url)
    try:
        entries: Any = await client.xrange(service.settings.usage_stream)
        return [f[b"event"] for _, f in entries if f[b"request_id"].decode() == request_id]
    finally:
        await client.aclose()


async def test_an_embed_counts_in_its_versions_outcomes_when_it_computed_any_input(cached_worker):
    # Served answers are no computation of the version; an embed served partly from the
    # cache computed the rest (left out, a canary's successes were undercounted against
    # its errors).
    service, channel = cached_worker
    stub = rpc.InferenceServiceStub(channel)
    outcomes = service.registry.resolve("all-minilm-l6-v2", "1").outcomes
    before = outcomes.requests
    one, two = f"one {uuid.uuid4().hex}", f"two {uuid.uuid4().hex}"
    for inputs in ([one], [one, two], [one, two]):  # computed, half served, all served
        await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=inputs))
    assert outcomes.requests - before == 2
