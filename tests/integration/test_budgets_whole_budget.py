"""A request needing more tokens than a key's whole budget is refused for good.

It was refused as RESOURCE_EXHAUSTED with RetryInfo ("retry in 60s", or 25 days for
the month) on an empty window: a client that waited as told was refused again,
forever, and a job item holding one waited until its job expired.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.exceptions import RedisError

from services.core import contract
from services.core.errors import ResourceExhausted
from services.inference.budget import Limits, TokenBudgets
from services.jobs import execution
from services.launcher.processes import reserve_port
from tests.integration.conftest import inference_settings, start_inference
from tests.rpc_errors import openai_refusal
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

MODEL = "deterministic-test"


@pytest.fixture
async def budgets(redis_url: str) -> AsyncIterator[TokenBudgets]:
    client = aioredis.from_url(redis_url)
    yield TokenBudgets(client)
    await client.aclose()


def _key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    ("limits", "name", "largest"),
    [
        (Limits(tokens_per_minute=1000), "tokens_per_minute", 1000),
        (Limits(monthly_tokens=1000), "monthly_tokens", 1000),
        (Limits(tokens_per_minute=1000, monthly_tokens=1200), "tokens_per_minute", 1000),
        (Limits(tokens_per_minute=5000, monthly_tokens=1000), "monthly_tokens", 1000),
    ],
)
async def test_a_request_over_a_whole_budget_is_refused_with_no_retry(
    budgets: TokenBudgets, limits: Limits, name: str, largest: int
) -> None:
    key = _key()
    with pytest.raises(ResourceExhausted) as refused:  # a RequestOverBudget
        await budgets.reserve(key, limits, "too-big", 1500)
    error = refused.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "REQUEST_EXCEEDS_BUDGET"
    assert error.retry_after_s is None
    assert not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in error.to_status().details)
    assert f"{name}=" in error.message and f"{largest} tokens" in error.message
    assert error.metadata == {
        "limit": name,
        "limit_tokens": str(getattr(limits, name)),
        "needed_tokens": "1500",
        "max_request_tokens": str(largest),
    }
    # Nothing was charged, and the largest request the key can make is admitted.
    window, _, month = budgets._keys(key, time.time())
    assert await budgets.redis.zcard(window) == 0
    assert await budgets.redis.get(month) is None
    await budgets.reserve(key, limits, "largest", largest)


async def test_a_request_that_fits_a_whole_budget_still_waits_for_room(budgets) -> None:
    key, limits = _key(), Limits(tokens_per_minute=1000)
    await budgets.reserve(key, limits, "first", 600)
    with pytest.raises(ResourceExhausted) as refused:
        await budgets.reserve(key, limits, "second", 600)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.retry_after_s is not None


def _identity(key: str, tpm: int) -> list[tuple[str, str]]:
    return [(contract.KEY_ID_HEADER, key), (contract.TPM_HEADER, str(tpm))]


async def _v1_refusal(channel: grpc.aio.Channel, key: str, max_tokens: int) -> Any:
    stub = rpc.InferenceServiceStub(channel)
    request = pb.CompleteRequest(model=MODEL, prompt="x", max_tokens=max_tokens)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Complete(request, metadata=_identity(key, 40))
    return refused.value


async def test_a_worker_refuses_it_as_a_final_answer_on_every_surface(
    tmp_path: Path, redis_url: str
) -> None:
    """gRPC: FAILED_PRECONDITION (REST 400) with no RetryInfo and no retry-after, which
    a job item takes for its result (`waits` is False) instead of waiting until its job
    expires; OpenAI: invalid_request_error. One that fits tpm=40 but not what is left
    still waits."""
    key = _key()
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        error = await _v1_refusal(channel, key, 100)  # 1 + 100 > 40: never
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        status = rpc_status.from_call(error)
        assert execution.error_reason(status) == "REQUEST_EXCEEDS_BUDGET"
        assert execution.retry_delay_s(status) is None
        assert "retry-after" not in dict(error.trailing_metadata() or ())
        assert "tokens_per_minute=40" in (error.details() or "")
        assert not execution.waits(error, status)

        stub = openai_rpc.OpenAIServiceStub(channel)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 100}
        call = stub.CreateCompletion(
            HttpBody(content_type="application/json", data=json.dumps(body).encode()),
            metadata=_identity(key, 40),
        )
        code, openai_error = await openai_refusal(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert openai_error["type"] == "invalid_request_error"
        assert openai_error["code"] == "request_exceeds_budget"

        await rpc.InferenceServiceStub(channel).Complete(
            pb.CompleteRequest(model=MODEL, prompt="x", max_tokens=30),
            metadata=_identity(key, 40),
        )  # 31 of 40
        error = await _v1_refusal(channel, key, 20)  # 21 fits 40, not the 9 left
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)
        assert execution.error_reason(status) == "TOKEN_BUDGET_EXCEEDED"
        assert execution.waits(error, status)


@pytest.mark.parametrize("limit_header", [contract.TPM_HEADER, contract.MONTHLY_TOKENS_HEADER])
async def test_prompts_that_each_fit_but_together_exceed_a_whole_budget_are_refused_for_good(
    tmp_path: Path, redis_url: str, limit_header: str
) -> None:
    """A legacy completion's prompts are reserved one by one: each fit the whole budget
    (31 of 40), together they never can (62), and the request was told "retry in 60s"
    (or the month) every time. Refused for good now, naming the request's tokens;
    nothing is reserved."""
    key = _key()
    identity = [(contract.KEY_ID_HEADER, key), (limit_header, "40")]
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        body = {"model": MODEL, "prompt": ["x", "y"], "max_tokens": 30}
        call = openai_rpc.OpenAIServiceStub(channel).CreateCompletion(
            HttpBody(content_type="application/json", data=json.dumps(body).encode()),
            metadata=identity,
        )
        code, openai_error = await openai_refusal(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert openai_error["code"] == "request_exceeds_budget"
        assert "needs 62 tokens" in openai_error["message"]
        client = aioredis.from_url(redis_url)
        try:
            window, _, month = TokenBudgets(client)._keys(key, time.time())
            assert await client.zcard(window) == 0 and await client.get(month) is None
        finally:
            await client.aclose()
        # One prompt of them still fits.
        await (
            openai_rpc.OpenAIServiceStub(channel)
            .CreateCompletion(
                HttpBody(
                    content_type="application/json",
                    data=json.dumps({**body, "prompt": ["x"]}).encode(),
                ),
                metadata=identity,
            )
            .read()
        )


async def test_a_request_over_a_whole_budget_is_refused_while_redis_is_away() -> None:
    # The check ran in the reserve script only: with the budgets' Redis away a request
    # needing 1,500 tokens of a key with 1,000 a minute was admitted unmetered and ran
    # to its end (the several-prompts check, local, refused the same tokens as two).
    nobody = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_timeout=1)
    budgets = TokenBudgets(nobody)
    try:
        with pytest.raises(ResourceExhausted) as refused:
            await budgets.reserve(_key(), Limits(tokens_per_minute=1000), "big", 1500)
        assert refused.value.reason == "REQUEST_EXCEEDS_BUDGET"
        with pytest.raises((RedisError, OSError)):  # one that fits still asks Redis
            await budgets.reserve(_key(), Limits(tokens_per_minute=1000), "fits", 900)
    finally:
        await nobody.aclose()
