"""A legacy completion's several prompts that the response cache answers (real worker,
real Redis, cache on): they need no room in the queue, and reserve in the key's
budget what they are billed, as each does sent alone.

The multi-prompt path checks the queue and reserves every prompt before any runs
(tests/integration/test_openai_usage_billing.py). It counted a cached prompt as a
sequence and reserved its prompt + max_tokens: requests the cache answers were
refused QUEUE_FULL, or 429 by a budget the same prompts sent one by one fit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody

from services.core import contract
from services.inference.budget import TokenBudgets
from services.inference.service import InferenceService
from tests.answer_headers import answer_headers
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_openai_usage_billing import (
    _key_events,
    _month_used,
    _refused_completion,
    _usage,
)
from tests.prompts import unique_prompt
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as rpc

MODEL = "deterministic-test"
MAX_TOKENS = 40


@pytest.fixture
def cache_on(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The response cache on, its entries in the test Redis (the patch sets its billing)."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    yield monkeypatch


async def _worker(tmp_path: Path, redis_url: str, slots: int) -> Any:
    """A worker of `slots` slots and no queue: a sequence that finds them taken is refused."""
    settings = inference_settings(
        tmp_path, redis_url, max_queue=0, max_sequences=slots, test_engine_step_ms=20.0
    )
    return await start_inference(settings)


def _prompts(count: int) -> list[str]:
    return [unique_prompt(f"p{i}") for i in range(count)]


def _key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


def _body(prompt: str | list[str], **fields: Any) -> dict[str, Any]:
    """A seeded completion (cacheable) of MAX_TOKENS."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "seed": 7, **fields}


def _identity(key: str, monthly_tokens: int = 100000) -> list[tuple[str, str]]:
    return [(contract.KEY_ID_HEADER, key), (contract.MONTHLY_TOKENS_HEADER, str(monthly_tokens))]


async def _complete(stub: Any, body: dict[str, Any], identity: list[tuple[str, str]]) -> Any:
    """Returns a legacy completion's JSON answer."""
    request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
    call = stub.CreateCompletion(request, metadata=identity)
    return json.loads(b"".join([m.data async for m in call]))


async def _warm(stub: Any, prompts: list[str], **fields: Any) -> list[Any]:
    """Stores each prompt's answer (computed alone, by another key); returns the answers."""
    return [await _complete(stub, _body(p, **fields), _identity(_key())) for p in prompts]


async def _hold_slots(channel: grpc.aio.Channel, count: int) -> list[Any]:
    """Starts `count` long streams (480 tokens, 20 ms a step) and waits until each runs."""
    stub = v2_rpc.InferenceServiceStub(channel)
    holders = []
    for _ in range(count):
        request = v2.GenerateRequest(
            model=MODEL, prompt=unique_prompt("hold"), max_output_tokens=480
        )
        holder = stub.Generate(request)
        holders.append(holder)
        await holder.read()  # its first token: it holds a slot
    return holders


async def _events(
    service: InferenceService, stub: Any, key: str, count: int, cached_prompt: str = ""
) -> list[Any]:
    """Returns `key`'s usage events once `count` are shipped; with none expected, once
    those of a later request (of `cached_prompt`: it needs no slot) are."""
    client = aioredis.from_url(service.settings.redis_url)
    try:
        until = ""
        if cached_prompt:
            until = _key()
            await _usage(stub, _body(cached_prompt), until)
        return await _key_events(client, service.settings.usage_stream, key, count, until)
    finally:
        await client.aclose()


def _texts(answers: list[Any]) -> list[str]:
    return [choice["text"] for answer in answers for choice in answer["choices"]]


async def test_prompts_the_cache_answers_are_served_while_the_queue_is_full(
    tmp_path: Path, redis_url: str, cache_on: pytest.MonkeyPatch
) -> None:
    """The only slot is held and there is no queue: prompts the cache answers need
    none of it (they were refused QUEUE_FULL); one that must compute still is refused."""
    cached, uncached = _prompts(2), _prompts(1)
    key, refused_key = _key(), _key()
    async with await _worker(tmp_path, redis_url, slots=1) as (service, channel):
        stub = rpc.OpenAIServiceStub(channel)
        warmed = await _warm(stub, cached)
        holders = await _hold_slots(channel, 1)
        try:
            answer = await _complete(stub, _body(cached), _identity(key))
            body = _body([*cached, *uncached])
            refused = await _refused_completion(stub, body, _identity(refused_key))
        finally:
            for holder in holders:
                holder.cancel()
        events = await _events(service, stub, key, len(cached))
        refused_events = await _events(service, stub, refused_key, 0, cached_prompt=cached[0])
    assert _texts([answer]) == _texts(warmed)
    assert [e.cached for e in events] == [True, True]
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in str(refused.details())
    assert refused_events == []  # all or none: the cached prompt is not billed either


async def test_only_prompts_the_cache_does_not_answer_need_room_in_the_queue(
    tmp_path: Path, redis_url: str, cache_on: pytest.MonkeyPatch
) -> None:
    """One of two slots is held: a cached prompt and one to compute fit (they were
    counted two sequences and refused)."""
    (cached,), (uncached,) = _prompts(1), _prompts(1)
    key = _key()
    async with await _worker(tmp_path, redis_url, slots=2) as (service, channel):
        stub = rpc.OpenAIServiceStub(channel)
        warmed = await _warm(stub, [cached])
        holders = await _hold_slots(channel, 1)
        try:
            answer = await _complete(stub, _body([cached, uncached]), _identity(key))
        finally:
            for holder in holders:
                holder.cancel()
        events = await _events(service, stub, key, 2)
    assert _texts([answer])[0] == _texts(warmed)[0]
    assert answer["usage"]["completion_tokens"] == 2 * MAX_TOKENS
    assert sorted(e.cached for e in events) == [False, True]


async def test_a_repeated_prompt_needs_room_for_one_computation(
    tmp_path: Path, redis_url: str, cache_on: pytest.MonkeyPatch
) -> None:
    """One slot, no queue: the same cacheable prompt twice computes once (the other
    joins it), so it fits (it was counted two sequences and refused)."""
    (prompt,) = _prompts(1)
    key = _key()
    async with await _worker(tmp_path, redis_url, slots=1) as (service, channel):
        stub = rpc.OpenAIServiceStub(channel)
        answer = await _complete(stub, _body([prompt, prompt]), _identity(key))
        events = await _events(service, stub, key, 2)
    first, second = _texts([answer])
    assert first == second
    assert sorted(e.cached for e in events) == [False, True]


def _billed(usage: dict[str, int], billing: str) -> int:
    """Returns what a cached answer of `usage` is billed (TOKENMESH_CACHE_BILLING)."""
    return {"full": usage["total_tokens"], "prompt_only": usage["prompt_tokens"], "none": 0}[
        billing
    ]


@pytest.mark.parametrize("billing", ["full", "prompt_only", "none"])
async def test_prompts_the_cache_answers_reserve_what_they_are_billed(
    tmp_path: Path, redis_url: str, cache_on: pytest.MonkeyPatch, billing: str
) -> None:
    """A key whose budget holds exactly what the cached answers are billed: the same
    prompts sent one by one are served, and so is the multi-prompt request (it held
    prompt + max_tokens for each and was refused 429). Both bill the same."""
    cache_on.setenv("TOKENMESH_CACHE_BILLING", billing)
    prompts = _prompts(2)
    multi_key, alone_key = _key(), _key()
    budgets = TokenBudgets(aioredis.from_url(redis_url))
    try:
        async with await _worker(tmp_path, redis_url, slots=4) as (_, channel):
            stub = rpc.OpenAIServiceStub(channel)
            fields: dict[str, Any] = {}
            if billing == "full":
                # A stop the first answer meets before its end: billed in full, it is
                # still less than prompt + max_tokens.
                (probe,) = await _warm(stub, prompts[:1])
                words = probe["choices"][0]["text"].split()
                fields["stop"] = " " + words[len(words) // 2]
            warmed = await _warm(stub, prompts, **fields)
            billed = sum(_billed(w["usage"], billing) for w in warmed)
            budget = max(billed, 1)  # (a budget of 0 is no budget)
            for prompt in prompts:
                await _complete(stub, _body(prompt, **fields), _identity(alone_key, budget))
            answer = await _complete(stub, _body(prompts, **fields), _identity(multi_key, budget))
            alone = await _month_used(budgets, alone_key, billed)
            multi = await _month_used(budgets, multi_key, billed)
    finally:
        await budgets.redis.aclose()
    reserved_before = sum(w["usage"]["prompt_tokens"] + MAX_TOKENS for w in warmed)
    assert billed < reserved_before  # what the request was refused for
    assert _texts([answer]) == _texts(warmed)
    assert multi == alone == billed


async def test_a_multi_prompt_answer_says_how_all_its_prompts_were_served(
    tmp_path: Path, redis_url: str, cache_on: pytest.MonkeyPatch
) -> None:
    """`x-tokenmesh-cache` was the first prompt's: a request whose first prompt was
    cached and the rest computed said `hit`."""
    cached, fresh = _prompts(2), _prompts(1)
    async with await _worker(tmp_path, redis_url, slots=4) as (_, channel):
        stub = rpc.OpenAIServiceStub(channel)
        await _warm(stub, cached)

        async def cache_header(prompts: list[str]) -> str:
            request = HttpBody(
                content_type="application/json", data=json.dumps(_body(prompts)).encode()
            )
            call = stub.CreateCompletion(request, metadata=_identity(_key()))
            assert json.loads(b"".join([m.data async for m in call]))["choices"]
            headers = answer_headers(await call.initial_metadata(), await call.trailing_metadata())
            return str(headers[contract.CACHE_HEADER])

        assert await cache_header(cached) == "hit"
        assert await cache_header([cached[0], *fresh]) == "miss"
