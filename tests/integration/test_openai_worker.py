"""tokenmesh.openai.v1 on a real worker over mTLS: the bytes it writes, and its errors.

What the edge makes of them (HTTP statuses, the error body) is in
tests/e2e/test_openai.py; here are the worker's own guarantees: SSE framing,
OpenAI's error JSON in the trailers of an error before any output (parameter
names as the client sent them), and a last `data: {"error": ...}` event when a
stream fails after it started.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from services.core import contract
from services.inference.pipeline.policy import PatternRule, Policy
from services.inference.service import InferenceService
from services.router.policies import TENANT, PolicyCatalog
from tests import mtls
from tests.rpc_errors import openai_refusal
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as rpc


def _body(**fields: Any) -> HttpBody:
    return HttpBody(content_type="application/json", data=json.dumps(fields).encode())


def _events(messages: list[HttpBody]) -> list[str]:
    data = b"".join(m.data for m in messages).decode()
    assert data.endswith("\n\n") and "\nevent:" not in data and not data.startswith("event:")
    return [event.removeprefix("data: ") for event in data.split("\n\n")[:-1]]


async def _error_trailer(call: Any) -> dict[str, Any]:
    return (await openai_refusal(call))[1]


async def test_a_stream_is_server_sent_events_ending_with_done(inference_channel):
    stub = rpc.OpenAIServiceStub(inference_channel)
    call = stub.CreateChatCompletion(
        _body(
            model="deterministic-test",
            messages=[{"role": "user", "content": "a b c"}],
            max_tokens=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    messages = [m async for m in call]
    assert messages[0].content_type == "text/event-stream"
    events = _events(messages)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert set(usage["usage"]["prompt_tokens_details"]) == {"cached_tokens"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes.count("length") == 2 and finishes.count(None) == len(finishes) - 2
    assert all(c["usage"] is None for c in chunks[:-1])
    headers = dict(await call.initial_metadata())
    assert headers["x-model-version"] and headers["x-request-id"]
    assert chunks[0]["model"] == f"deterministic-test@{headers['x-model-version']}"


async def test_errors_before_output_carry_openais_json_with_the_clients_names(inference_channel):
    stub = rpc.OpenAIServiceStub(inference_channel)
    chat = {"model": "deterministic-test", "messages": [{"role": "user", "content": "x"}]}
    cases = {
        "temperature": {**chat, "temperature": 3},
        "max_completion_tokens": {**chat, "max_completion_tokens": 10**6},
        "stop[0]": {**chat, "stop": ["x" * 100]},
        "messages[0].role": {**chat, "messages": [{"role": "tool", "content": "x"}]},
        "frobnicate": {**chat, "frobnicate": 1},
        "presence_penalty": {**chat, "presence_penalty": 0.5},
    }
    for param, body in cases.items():
        error = await _error_trailer(stub.CreateChatCompletion(_body(**body)))
        assert error["param"] == param, error
        assert error["type"] == "invalid_request_error" and error["message"]
    missing = await _error_trailer(stub.CreateChatCompletion(_body(**{**chat, "model": "nope"})))
    assert (missing["type"], missing["code"]) == ("invalid_request_error", "model_not_found")
    embed = await _error_trailer(
        stub.CreateEmbedding(_body(model="deterministic-test", input=[[1, 2]]))
    )
    assert embed["param"] == "input"
    echo = await _error_trailer(
        stub.CreateCompletion(_body(model="deterministic-test", prompt="a", echo=True))
    )
    assert echo["param"] == "echo"


async def test_a_failure_mid_stream_ends_with_an_error_event(inference_channel):
    stub = rpc.OpenAIServiceStub(inference_channel)
    admin = v1_rpc.InferenceAdminServiceStub(inference_channel)
    call = stub.CreateChatCompletion(
        _body(
            model="deterministic-test@1",
            messages=[{"role": "user", "content": "long"}],
            max_tokens=400,
            n=2,
            stream=True,
        )
    )
    messages = [await call.read()]
    # Unloading the version (1 s grace) fails the choices still generating.
    unloading = asyncio.ensure_future(
        admin.UnloadModel(
            v1.UnloadModelRequest(model="deterministic-test", version="1"),
            metadata=mtls.EDGE_FOR_ADMIN,
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    await unloading
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    events = _events(messages)
    assert events[-1].startswith('{"error":')
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and error["message"]
    assert sum(1 for e in events if e.startswith('{"error"')) == 1  # one for all choices


async def test_streamed_choices_open_with_their_roles_in_index_order_under_an_output_rule(
    model_server: tuple[InferenceService, grpc.aio.Channel], redis_url: str
) -> None:
    # An output rule holds each choice's text apart until released: a choice opened
    # (with its role) when its first text came, so choice 2 could open the stream,
    # and the SDK's stream helper (chat.completions.stream) failed with IndexError.
    service, channel = model_server
    client = aioredis.from_url(redis_url)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    try:
        catalog = PolicyCatalog(client)
        rule = PatternRule("zqzqzq", "never generated")
        created = await catalog.create(
            Policy(f"out-{tenant}", 0, output_block_patterns=(rule,)), time.time()
        )
        await catalog.attach(TENANT, tenant, created.name)
        await service.policies.refresh()
    finally:
        await client.aclose()
    stub = rpc.OpenAIServiceStub(channel)
    identity = ((contract.TENANT_HEADER, tenant), (contract.KEY_ID_HEADER, "k"))
    for seed in range(4):
        body = _body(
            model="demo-lm",
            messages=[{"role": "user", "content": "Tell me a story"}],
            n=3,
            seed=seed,
            temperature=1.0,
            max_tokens=60,
            stream=True,
        )
        call = stub.CreateChatCompletion(body, metadata=identity)
        events = _events([m async for m in call])[:-1]
        chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events]
        opened = list(dict.fromkeys(chunk.choices[0].index for chunk in chunks))
        assert opened == [0, 1, 2], (seed, opened)
        state = ChatCompletionStreamState()
        for chunk in chunks:
            state.handle_chunk(chunk)
        assert [c.index for c in state.current_completion_snapshot.choices] == [0, 1, 2]
