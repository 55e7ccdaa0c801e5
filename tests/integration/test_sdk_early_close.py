"""The Python SDK on a real worker: a stream the caller stops reading is cancelled.

grpc.aio keeps a call running when the iterator reading it is abandoned, so a
caller that took 3 tokens and left the loop had the worker generate (and bill)
all of max_output_tokens, finish_reason "length". Every way of leaving a
stream early now cancels the call: the usage record says "cancelled" and
counts only the tokens produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import tokenmesh.client as sdk
from services.core.server import serving
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v1 import inference_pb2 as usage_pb
from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_service_pb2 as pb

#: Far more than the test reads: at 20 ms a step, 8 s of generation left to bill.
MAX_TOKENS = 400


class Worker(typing.NamedTuple):
    target: str
    redis_url: str
    usage_stream: str


@pytest.fixture
async def slow_worker(tmp_path: Path, redis_url: str) -> AsyncIterator[Worker]:
    """A plaintext worker (every caller taken for the edge, as the SDK reaches one in
    development) whose test engine takes 20 ms a token."""
    settings = inference_settings(
        tmp_path, redis_url, pki_dir=None, insecure_peer_identity="edge", test_engine_step_ms=20.0
    )
    async with serving(InferenceService(settings), settings) as running:
        yield Worker(f"127.0.0.1:{running.port}", redis_url, settings.usage_stream)


async def _usage_event(worker: Worker, request_id: str) -> usage_pb.UsageEvent:
    """Waits for the usage event of `request_id` (the worker writes it when the
    request ends, cancelled or not)."""
    client = aioredis.from_url(worker.redis_url)
    try:
        async with asyncio.timeout(30):
            while True:
                entries: Any = await client.xrange(worker.usage_stream)
                found = [f for _, f in entries if f[b"request_id"].decode() == request_id]
                if found:
                    return usage_pb.UsageEvent.FromString(found[0][b"event"])
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def _assert_cancelled_early(event: usage_pb.UsageEvent) -> None:
    assert event.finish_reason == "cancelled"
    # 3 read, a few more produced before the cancel arrived; not the 400 of old.
    assert 3 <= event.usage.completion_tokens < MAX_TOKENS // 4


async def read_three_then_aclosing(client: sdk.Client, request_id: str) -> list[str]:
    """The documented way for typed code (mypy --strict checks this function: with
    generate() typed AsyncIterator, aclosing() and aclose() did not type-check)."""
    texts: list[str] = []
    stream: sdk.Stream[pb.GenerateResponse] = client.generate(
        "deterministic-test", "long", max_output_tokens=MAX_TOKENS, request_id=request_id
    )
    async with contextlib.aclosing(stream) as messages:
        async for message in messages:
            texts.append(message.text)
            if len(texts) == 3:
                break
    return texts


async def read_three_then_aclose(client: sdk.Client, request_id: str) -> list[str]:
    texts: list[str] = []
    stream = client.generate(
        "deterministic-test", "long", max_output_tokens=MAX_TOKENS, request_id=request_id
    )
    async for message in stream:
        texts.append(message.text)
        if len(texts) == 3:
            break
    await stream.aclose()
    return texts


async def read_three_in_async_with(client: sdk.Client, request_id: str) -> list[str]:
    texts: list[str] = []
    async with client.generate(
        "deterministic-test", "long", max_output_tokens=MAX_TOKENS, request_id=request_id
    ) as stream:
        async for message in stream:
            texts.append(message.text)
            if len(texts) == 3:
                break
    return texts


async def read_three_then_drop(client: sdk.Client, request_id: str) -> list[str]:
    """The README's shape, `async for` straight over generate(), left with `break` and
    nothing closed: the stream is cancelled once it is garbage."""
    texts: list[str] = []
    async for message in client.generate(
        "deterministic-test", "long", max_output_tokens=MAX_TOKENS, request_id=request_id
    ):
        texts.append(message.text)
        if len(texts) == 3:
            break
    gc.collect()  # CPython frees it at once; other runtimes when they collect
    return texts


async def read_three_then_raise(client: sdk.Client, request_id: str) -> list[str]:
    texts: list[str] = []
    with contextlib.suppress(LookupError):
        async with client.generate(
            "deterministic-test", "long", max_output_tokens=MAX_TOKENS, request_id=request_id
        ) as stream:
            async for message in stream:
                texts.append(message.text)
                if len(texts) == 3:
                    raise LookupError("the caller's own failure")
    return texts


@pytest.mark.parametrize(
    "read_three",
    [
        read_three_then_aclosing,
        read_three_then_aclose,
        read_three_in_async_with,
        read_three_then_drop,
        read_three_then_raise,
    ],
    ids=lambda f: f.__name__,
)
async def test_a_stream_left_after_three_messages_is_cancelled_and_billed_for_what_ran(
    slow_worker: Worker,
    read_three: Callable[[sdk.Client, str], Awaitable[list[str]]],
    request: pytest.FixtureRequest,
) -> None:
    request_id = f"sdk-early-{request.node.callspec.id}"
    # The client stays open: closing its channel was the only thing that cancelled.
    async with sdk.Client(slow_worker.target, timeout_s=60) as client:
        texts = await read_three(client, request_id)
        assert len(texts) == 3
        event = await _usage_event(slow_worker, request_id)
    _assert_cancelled_early(event)


async def test_a_v1_stream_closed_early_is_cancelled(slow_worker: Worker) -> None:
    async with sdk.V1Client(slow_worker.target, timeout_s=60) as client:
        stream = client.generate(
            "deterministic-test", "long", max_tokens=MAX_TOKENS, request_id="sdk-early-v1"
        )
        async with stream:
            texts: list[v1_pb.GenerateResponse] = []
            async for message in stream:
                texts.append(message)
                if len(texts) == 3:
                    break
        event = await _usage_event(slow_worker, "sdk-early-v1")
    _assert_cancelled_early(event)


async def test_a_stream_read_to_its_end_is_billed_whole(slow_worker: Worker) -> None:
    """Closing a finished stream cancels nothing: the record is the generation's own."""
    async with sdk.Client(slow_worker.target, timeout_s=60) as client:
        async with client.generate(
            "deterministic-test", "long", max_output_tokens=5, request_id="sdk-whole"
        ) as stream:
            messages = [message async for message in stream]
        event = await _usage_event(slow_worker, "sdk-whole")
    assert messages[-1].HasField("finish_reason")
    assert event.finish_reason == "length" and event.usage.completion_tokens == 5


def test_generate_is_typed_as_a_closable_stream() -> None:
    """generate() was typed AsyncIterator (v1: AsyncIterator[Any]), hiding aclose():
    `contextlib.aclosing(client.generate(...))` failed mypy --strict."""
    for client, message in (
        (sdk.Client, pb.GenerateResponse),
        (sdk.V1Client, v1_pb.GenerateResponse),
    ):
        returned = typing.get_type_hints(client.generate)["return"]
        assert typing.get_origin(returned) is sdk.Stream
        assert typing.get_args(returned) == (message,)
    for method in ("aclose", "__aenter__", "__aexit__", "__anext__"):
        assert inspect.iscoroutinefunction(getattr(sdk.Stream, method))
