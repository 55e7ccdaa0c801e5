"""A v1/v2 Generate stream that fails before its first token tells it in-band, on a real worker.

A stream sends its response headers once it is queued, before its prefill
runs. A failure between then and its first token (here: every prefill fails,
TOKENMESH_TEST_ENGINE_ERROR_RATE=1) ended it with its status alone, after those
headers: a REST client had its 200 and then no SSE event, the status a bare
JSON line that SSE readers drop. Each running choice now gets its final
message with finish_reason ERROR and `error` first (v1: "error" and a
StreamError), as a stream failing after its first token does; then the status.
The OpenAI surface holds its headers until its first body and answers such a
failure with an error status of its own (tests/integration/
test_openai_abort_headers.py): that stays so. tests/e2e/test_stream_failure_sse.py
reads the same through the real edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from services.core import contract
from tests.integration.conftest import inference_settings, start_inference
from tests.prompts import unique_prompt
from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as v2_resources
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

MODEL = "deterministic-test"


async def _read(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError]:
    """Returns the messages of a stream that must fail, and its error."""
    messages: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in call:
            messages.append(message)
    return messages, failed.value


@pytest.fixture(params=["cache-off", "cache-on"])
async def failing_worker(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
    """A worker whose every prefill fails, and what its cache makes of a seeded
    request: with the cache on, it leads a shared computation ("miss", its own
    path in the pipeline)."""
    cache = ""
    if request.param == "cache-on":
        cache = "miss"
        monkeypatch.setenv("TOKENMESH_CACHE", "on")
        monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(tmp_path, redis_url, test_engine_error_rate=1.0)
    async with await start_inference(settings) as (_, channel):
        yield channel, cache


async def test_a_v2_stream_failing_before_its_first_token_ends_with_final_messages(
    failing_worker: tuple[grpc.aio.Channel, str],
) -> None:
    channel, cache = failing_worker
    request = v2_pb.GenerateRequest(
        model=MODEL, prompt=unique_prompt("fails"), max_output_tokens=4, n=2
    )
    request.sampling.seed = 5  # deterministic: with the cache on, it leads a computation
    call = v2_rpc.InferenceServiceStub(channel).Generate(request)
    messages, error = await _read(call)
    assert error.code() == grpc.StatusCode.INTERNAL
    headers = dict(await call.initial_metadata())
    assert headers["x-request-id"]  # the stream had started
    assert headers.get(contract.CACHE_HEADER, "") == cache
    assert sorted(m.choice_index for m in messages) == [0, 1]  # one final per choice
    for message in messages:
        assert message.finish_reason == v2_resources.FINISH_REASON_ERROR, message
        assert message.error.code == grpc.StatusCode.INTERNAL.value[0], message
        assert message.request_id and not message.token_ids
        assert message.usage.completion_tokens == 0


async def test_a_v1_stream_failing_before_its_first_token_ends_with_a_stream_error(
    failing_worker: tuple[grpc.aio.Channel, str],
) -> None:
    channel, _ = failing_worker
    request = v1_pb.GenerateRequest(model=MODEL, prompt=unique_prompt("fails v1"), max_tokens=4)
    call = v1_rpc.InferenceServiceStub(channel).Generate(request)
    messages, error = await _read(call)
    assert error.code() == grpc.StatusCode.INTERNAL
    [final] = messages
    assert final.finish_reason == "error"
    assert final.error.code == "INTERNAL" and final.error.message, final
