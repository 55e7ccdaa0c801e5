"""failure_mode_deny refuses an OpenAI route's call in OpenAI's error shape.

A worker that cannot decide a call's rate limits (its limits store unreachable,
or a limiter bug) refuses it when TOKENMESH_RATELIMIT_FAILURE_MODE_DENY is set.
That refusal went out through the error boundary, without the
x-tokenmesh-openai-error trailer that every other error of an OpenAI route
carries, so the edge answered the transcoder's {"code":14,...} instead of
OpenAI's {"error": {...}} (which OpenAI SDKs parse). Real worker over mTLS,
called as the edge with a key's identity headers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from prometheus_client import REGISTRY

from services.core import contract
from services.launcher.processes import reserve_port
from tests.integration.conftest import inference_settings, start_inference
from tests.rpc_errors import openai_refusal
from tokenmesh.openai.v1 import openai_service_pb2_grpc as rpc

MODEL = "deterministic-test"


def _body(**fields: Any) -> HttpBody:
    return HttpBody(content_type="application/json", data=json.dumps(fields).encode())


async def _refusals(tmp_path: Path, redis_url: str, limits_url: str, key: str) -> list[Any]:
    """Refusals of a streamed chat completion and a (unary) embedding in deny mode."""
    settings = inference_settings(
        tmp_path, redis_url, ratelimit_redis_url=limits_url, ratelimit_failure_mode_deny=True
    )
    identity = ((contract.KEY_ID_HEADER, key), (contract.RPM_HEADER, "100"))
    async with await start_inference(settings) as (_, channel):
        stub = rpc.OpenAIServiceStub(channel)
        chat = _body(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=2)
        embed = _body(model=MODEL, input="a")
        return [
            await openai_refusal(stub.CreateChatCompletion(chat, metadata=identity, timeout=20)),
            await openai_refusal(stub.CreateEmbedding(embed, metadata=identity, timeout=20)),
        ]


def _unavailable_store_counts() -> tuple[float, float]:
    """(fail-open, fail-closed) decisions so far."""
    names = ("tokenmesh_ratelimit_fail_open_total", "tokenmesh_ratelimit_fail_closed_total")
    return tuple(REGISTRY.get_sample_value(name) or 0.0 for name in names)  # type: ignore[return-value]


async def test_an_unreachable_limits_store_refuses_in_openai_shape(tmp_path, redis_url):
    dead = f"redis://127.0.0.1:{reserve_port()}/0"
    fail_open, fail_closed = _unavailable_store_counts()
    refusals = await _refusals(tmp_path, redis_url, dead, "key_deny")
    for code, error in refusals:
        assert code == grpc.StatusCode.UNAVAILABLE
        assert error["type"] == "server_error" and error["message"], error
    # Refused, so counted as failing closed: not in the fail-open alert's counter.
    assert _unavailable_store_counts() == (fail_open, fail_closed + len(refusals))


async def test_a_limiter_bug_refuses_in_openai_shape(tmp_path, redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    # A window of the wrong type: Redis is fine, our data is not (a bug: INTERNAL).
    await client.set(f"tm:ratelimit:rpm:{key}", "not a sorted set", ex=60)
    try:
        refusals = await _refusals(tmp_path, redis_url, redis_url, key)
    finally:
        await client.delete(f"tm:ratelimit:rpm:{key}")
        await client.aclose()
    for code, error in refusals:
        assert code == grpc.StatusCode.INTERNAL
        assert error["type"] == "server_error" and "WRONGTYPE" not in error["message"], error
