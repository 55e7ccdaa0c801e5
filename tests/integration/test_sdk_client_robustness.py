"""The SDK client against a real worker: what broke for ordinary use.

- An answer over gRPC's default 4 MiB (a long completion with logprobs) was
  generated and billed, then refused by the client as RESOURCE_EXHAUSTED.
- A client made before `asyncio.run` (at import, as AsyncOpenAI() often is)
  failed every call with a bare RuntimeError (its channel was another loop's).
- A token read from a file (a trailing newline) made calls raise grpc's raw
  ExecuteBatchError.
- Closing the client under a task reading a stream made that task "cancelled"
  (a TaskGroup took the cut generation for done); a call on a closed client
  raised grpc.aio.UsageError.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import tokenmesh.client as sdk
from services.core.server import MAX_MESSAGE_BYTES, serving
from services.inference import repository
from services.inference import service as inference_service
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings

LM = "deterministic-test"


# The deterministic test model with an 8,192-token context (a real LLM's).
_long_context_model = functools.partial(repository.deterministic_test_model, context_length=8192)


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.setattr(inference_service, "deterministic_test_model", _long_context_model)
    settings = inference_settings(
        tmp_path,
        redis_url,
        pki_dir=None,
        insecure_peer_identity="edge",
        test_models=("deterministic-test:1",),
        test_engine_step_ms=0.0,
    )
    async with serving(InferenceService(settings), settings) as running:
        yield f"127.0.0.1:{running.port}"


async def test_an_answer_over_4_mib_reaches_the_caller(worker: str) -> None:
    async with sdk.Client(worker, timeout_s=120) as client:
        answer = await client.complete(
            LM, "long", max_output_tokens=7500, logprobs=True, top_logprobs=20
        )
    assert 4 * 1024 * 1024 < answer.ByteSize() < MAX_MESSAGE_BYTES
    assert sdk.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES  # the servers' limit


async def test_a_client_made_before_its_event_loop_serves_it(worker: str) -> None:
    def made_outside_and_used_in_another_loop() -> Any:
        client = sdk.Client(worker)

        async def use() -> Any:
            async with client:
                return await client.list_models()

        return asyncio.run(use())

    models = await asyncio.to_thread(made_outside_and_used_in_another_loop)
    assert LM in [model.name for model in models.models]


async def test_a_token_read_from_a_file_is_sent_without_its_newline(worker: str) -> None:
    async with sdk.Client(worker, token="tm_" + "a" * 43 + "\n") as client:
        models = await client.list_models()  # the worker takes the edge's identity here
    assert models.models
    with pytest.raises(ValueError, match="one line"):
        sdk.Client(worker, token="tm_a\nb")


async def test_closing_the_client_ends_a_reading_task_cancelled_not_the_task(worker: str) -> None:
    client = sdk.Client(worker)
    started = asyncio.Event()

    async def reader() -> None:
        async for _ in client.generate(LM, "long", max_output_tokens=4000):
            started.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(started.wait(), 30)
    await client.close()
    with pytest.raises(sdk.TokenmeshRpcError) as cut:
        await asyncio.wait_for(task, 10)
    assert cut.value.code == grpc.StatusCode.CANCELLED
    assert cut.value.message == "the client was closed"
    with pytest.raises(RuntimeError, match="closed"):
        await client.list_models()


def test_details_a_client_cannot_read_leave_the_code() -> None:
    error = grpc.aio.AioRpcError(
        code=grpc.StatusCode.UNAVAILABLE,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\x00garbage")),
        details="a proxy's own",
    )
    decoded = sdk._decoded(error)
    assert decoded.code == grpc.StatusCode.UNAVAILABLE and decoded.status is None
