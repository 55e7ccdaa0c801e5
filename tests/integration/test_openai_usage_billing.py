"""A legacy completion's several prompts on a real worker: billed once each, as answered.

`prompt` may be a list: each prompt is a v2 request of its own (its n choices
share its prompt). The response's usage is every prompt's tokens once plus every
choice's completion, and the usage events and the key's budget hold exactly that.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
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
from tests.integration.conftest import inference_settings, month_charged, start_inference
from tests.prompts import unique_prompt
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.openai.v1 import openai_service_pb2_grpc as rpc

MODEL = "deterministic-test"
PROMPTS = ["a", "b c d e f g", "h i j"]
MAX_TOKENS = 5
N = 2


def _body(**fields: Any) -> HttpBody:
    return HttpBody(content_type="application/json", data=json.dumps(fields).encode())


def _identity(key: str) -> list[tuple[str, str]]:
    return [(contract.KEY_ID_HEADER, key), (contract.MONTHLY_TOKENS_HEADER, "100000")]


async def _usage(stub: Any, body: dict[str, Any], key: str) -> dict[str, Any]:
    """Returns the usage a legacy completion answers (its last event's, streamed)."""
    call = stub.CreateCompletion(_body(**body), metadata=_identity(key))
    data = b"".join([m.data async for m in call])
    if not body.get("stream"):
        return dict(json.loads(data)["usage"])
    events = data.decode().split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    return dict(json.loads(events[-2].removeprefix("data: "))["usage"])


async def _key_events(
    client: aioredis.Redis, stream: str, key: str, count: int, until: str = ""
) -> list[Any]:
    """Waits for `count` usage events of `key` (and one of key `until`, recorded after
    them: the worker ships its events in order); returns the key's events."""
    deadline = time.monotonic() + 10
    while True:
        entries: Any = await client.xrange(stream)
        events = [inference_pb2.UsageEvent.FromString(f[b"event"]) for _, f in entries]
        mine = [e for e in events if e.key_id == key]
        shipped = not until or any(e.key_id == until for e in events)
        if (len(mine) >= count and shipped) or time.monotonic() > deadline:
            return mine
        await asyncio.sleep(0.02)


async def _month_used(budgets: TokenBudgets, key: str, expected: int) -> int:
    """Waits for the key's month to hold `expected` (reconciled in the background)."""
    deadline = time.monotonic() + 5
    while (used := await month_charged(budgets.redis, key)) != expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return used


@pytest.mark.parametrize("stream", [False, True])
async def test_each_prompt_is_billed_its_own_tokens_once(
    tmp_path: Path, redis_url: str, stream: bool
) -> None:
    settings = inference_settings(tmp_path, redis_url)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    try:
        async with await start_inference(settings) as (_, channel):
            stub = rpc.OpenAIServiceStub(channel)
            own = [
                (await _usage(stub, {"model": MODEL, "prompt": p, "max_tokens": 1}, "alone"))
                for p in PROMPTS
            ]
            key = f"key_{uuid.uuid4().hex[:8]}"
            body: dict[str, Any] = {
                "model": MODEL,
                "prompt": PROMPTS,
                "max_tokens": MAX_TOKENS,
                "n": N,
            }
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            usage = await _usage(stub, body, key)
            events = await _key_events(client, settings.usage_stream, key, len(PROMPTS))
            month = await _month_used(budgets, key, usage["total_tokens"])
    finally:
        await client.aclose()
    prompt_tokens = [u["prompt_tokens"] for u in own]
    assert len(set(prompt_tokens)) == len(PROMPTS)  # each prompt's own length shows
    # Each prompt once (not once per choice, not the batch's for each prompt).
    assert usage["prompt_tokens"] == sum(prompt_tokens)
    assert usage["completion_tokens"] == len(PROMPTS) * N * MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # One event per prompt, billing its own tokens: together what the response says.
    assert len(events) == len(PROMPTS)
    assert sorted(e.usage.prompt_tokens for e in events) == sorted(prompt_tokens)
    assert all(e.usage.completion_tokens == N * MAX_TOKENS for e in events)
    assert sum(e.usage.total_tokens for e in events) == usage["total_tokens"]
    assert month == usage["total_tokens"]


async def test_a_refused_multi_prompt_completion_bills_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """A prompt too long for the context refuses the request (400, no usage): its
    siblings, admitted and scheduled before, were cancelled and billed their prompts."""
    settings = inference_settings(tmp_path, redis_url)
    client = aioredis.from_url(redis_url)
    key = f"key_{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "prompt": ["a b c", "d e", "x " * 40000], "max_tokens": 100, "n": 2}
    try:
        async with await start_inference(settings) as (_, channel):
            stub = rpc.OpenAIServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateCompletion(_body(**body), metadata=_identity(key)).read()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A request that follows it: once its event is shipped, any of the
            # refused request's are too.
            after = f"key_{uuid.uuid4().hex[:8]}"
            await _usage(stub, {"model": MODEL, "prompt": "z", "max_tokens": 1}, after)
            events = await _key_events(client, settings.usage_stream, key, 0, until=after)
    finally:
        await client.aclose()
    assert [(e.usage.total_tokens, e.finish_reason) for e in events] == []


async def _idle(service: InferenceService) -> None:
    """Waits until no model version runs or queues a sequence."""
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    async with asyncio.timeout(10):
        while any(s.stats()["running"] or s.stats()["waiting"] for s in schedulers):
            await asyncio.sleep(0.02)


async def _refused_completion(
    stub: Any, body: dict[str, Any], identity: list[tuple[str, str]]
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateCompletion(_body(**body), metadata=identity).read()
    return refused.value


async def test_a_multi_prompt_completion_over_the_budget_bills_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """The month holds two prompts' reservations, not three: the third prompt was
    refused 429 while the first two, reserved and scheduled, ran, were cancelled and
    billed. Every prompt is now reserved before any runs; a refusal gives them back.
    (The three fit the whole month, 650: what the month has left, 599, refuses them.
    Over the whole month, they are refused for good before any is reserved:
    test_budgets_whole_budget.)"""
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=20.0)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    key = f"key_{uuid.uuid4().hex[:8]}"
    # Each prompt needs its few tokens plus n * max_tokens = 200: 607 for the three.
    identity = [(contract.KEY_ID_HEADER, key), (contract.MONTHLY_TOKENS_HEADER, "650")]
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": ["a b c", "d e", "f g"],
        "max_tokens": 100,
        "n": 2,
    }
    try:
        async with await start_inference(settings) as (_, channel):
            stub = rpc.OpenAIServiceStub(channel)
            spent = (await _usage(stub, {"model": MODEL, "prompt": "z", "max_tokens": 50}, key))[
                "total_tokens"
            ]  # 51 of the month's 650
            await _month_used(budgets, key, spent)
            refused = await _refused_completion(stub, body, identity)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            after = f"key_{uuid.uuid4().hex[:8]}"
            await _usage(stub, {"model": MODEL, "prompt": "z", "max_tokens": 1}, after)
            events = await _key_events(client, settings.usage_stream, key, 0, until=after)
            month = await _month_used(budgets, key, spent)
            # The budget is as it was: two of the prompts fit, and are billed.
            usage = await _usage(stub, {**body, "prompt": body["prompt"][:2]}, key)
            billed = await _month_used(budgets, key, spent + usage["total_tokens"])
    finally:
        await client.aclose()
    # The spending request's only: none of the refused one.
    assert [(e.usage.total_tokens, e.finish_reason) for e in events] == [(spent, "length")]
    assert month == spent
    assert billed == spent + usage["total_tokens"] > spent


async def test_a_multi_prompt_completion_the_queue_cannot_hold_bills_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """Two free slots and no queue: the third prompt was refused QUEUE_FULL after the
    first two were submitted (they ran, were cancelled and billed). The request is
    refused before any prompt is submitted when the queue cannot hold them all: here
    for good (three prompts can never fit two slots and no queue), INVALID_ARGUMENT."""
    settings = inference_settings(
        tmp_path, redis_url, max_queue=0, max_sequences=2, test_engine_step_ms=20.0
    )
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    key = f"key_{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {"model": MODEL, "prompt": ["a b c", "d e", "f g"], "max_tokens": 20}
    try:
        async with await start_inference(settings) as (service, channel):
            stub = rpc.OpenAIServiceStub(channel)
            refused = await _refused_completion(stub, body, _identity(key))
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "runs and queues at once" in str(refused.details())
            await _idle(service)  # (cancelled sequences free their slots a step later)
            after = f"key_{uuid.uuid4().hex[:8]}"
            await _usage(stub, {"model": MODEL, "prompt": "z", "max_tokens": 1}, after)
            events = await _key_events(client, settings.usage_stream, key, 0, until=after)
            month = await _month_used(budgets, key, 0)
            # Two prompts fit the two slots.
            usage = await _usage(stub, {**body, "prompt": body["prompt"][:2]}, key)
    finally:
        await client.aclose()
    assert [(e.usage.total_tokens, e.finish_reason) for e in events] == []
    assert month == 0
    assert usage["completion_tokens"] == 2 * 20


async def test_a_multi_prompt_completion_served_by_the_cache_settles_every_reservation(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts reserved before they run, then answered by another's computation (the
    same prompt twice: one computes, the other joins it) are reconciled to their bill."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(tmp_path, redis_url)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    key = f"key_{uuid.uuid4().hex[:8]}"
    prompt = unique_prompt("same")
    body = {"model": MODEL, "prompt": [prompt, prompt], "max_tokens": 6, "seed": 7}
    try:
        async with await start_inference(settings) as (_, channel):
            stub = rpc.OpenAIServiceStub(channel)
            usage = await _usage(stub, body, key)
            events = await _key_events(client, settings.usage_stream, key, 2)
            billed = sum(e.usage.total_tokens for e in events)
            month = await _month_used(budgets, key, billed)
    finally:
        await client.aclose()
    assert sorted(e.cached for e in events) == [False, True]
    assert usage["completion_tokens"] == 2 * 6
    assert month == billed < usage["total_tokens"]  # the cached one: its prompt only


async def test_a_prompt_refused_when_submitted_leaves_its_siblings_unbilled(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal only the scheduler's submit makes (the model version unloading; or a
    queue filled since the check) fails the request after its other prompts ran or
    were answered: here one the cache answered. None of them is billed."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(tmp_path, redis_url)
    client = aioredis.from_url(redis_url)
    key = f"key_{uuid.uuid4().hex[:8]}"
    cached = f"cached {uuid.uuid4().hex}"
    body = {"model": MODEL, "prompt": cached, "max_tokens": 4, "seed": 7}
    try:
        async with await start_inference(settings) as (service, channel):
            stub = rpc.OpenAIServiceStub(channel)
            await _usage(stub, body, f"warm-{key}")  # stores the first prompt's answer
            for model in service.registry.all():
                if model.scheduler is not None:
                    await model.scheduler.stop(drain_timeout_s=0)  # as an unload does
            refused = await _refused_completion(
                stub, {**body, "prompt": [cached, "not cached"]}, _identity(key)
            )
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            # A request the cache answers alone: once its event is shipped, any of the
            # refused request's are too.
            after = f"key_{uuid.uuid4().hex[:8]}"
            await _usage(stub, body, after)
            events = await _key_events(client, settings.usage_stream, key, 0, until=after)
    finally:
        await client.aclose()
    assert [(e.usage.total_tokens, e.cached, e.finish_reason) for e in events] == []
