"""The real models from models/ on ONNX Runtime, served over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import numpy as np
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from tests import mtls
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

KJV_WORDS = {
    "the",
    "and",
    "of",
    "unto",
    "lord",
    "god",
    "shall",
    "thou",
    "thee",
    "thy",
    "him",
    "his",
    "that",
}


async def _embed(stub, *texts: str) -> np.ndarray:
    reply = await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=list(texts)))
    return np.array([e.values for e in reply.embeddings])


async def test_embeddings_are_unit_384d_and_semantic(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    kitten, cat, car = await _embed(stub, "kitten", "cat", "car")
    assert kitten.shape == (384,)
    assert np.allclose([np.linalg.norm(v) for v in (kitten, cat, car)], 1.0, atol=1e-4)
    assert kitten @ cat > kitten @ car


async def test_embed_reports_usage_and_keeps_input_order(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    reply = await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["a b c", "hello"]))
    assert [e.index for e in reply.embeddings] == [0, 1]
    assert reply.usage.prompt_tokens == 5 + 3  # [CLS] a b c [SEP] + [CLS] hello [SEP]
    assert reply.model.name == "all-minilm-l6-v2" and reply.model.version == "1"
    single = await _embed(stub, "hello")
    assert np.allclose(single[0], reply.embeddings[1].values, atol=1e-5)  # padding does not leak


async def test_an_over_long_embed_input_is_invalid_with_numbers(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["ok", "word " * 400]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in info.value.details() and "256" in info.value.details()


async def _generate(stub, seed, max_tokens=40, prompt="And God said"):
    request = pb.GenerateRequest(model="demo-lm", prompt=prompt, max_tokens=max_tokens, seed=seed)
    return [m async for m in stub.Generate(request)]


async def test_demo_lm_writes_kjv_flavoured_text_reproducibly(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    first = "".join(m.text for m in await _generate(stub, seed=1))
    again = "".join(m.text for m in await _generate(stub, seed=1))
    other = "".join(m.text for m in await _generate(stub, seed=2))
    assert first == again and first != other
    words = {w.strip(".,;:").lower() for w in (first + other).split()}
    assert len(words & KJV_WORDS) >= 3, first


def _prefix_tokens(outcome: str) -> float:
    labels = {"model": "demo-lm", "version": "1", "outcome": outcome}
    return REGISTRY.get_sample_value("tokenmesh_prefix_cache_tokens_total", labels) or 0.0


async def _prefix_tokens_become(outcome: str, expected: float) -> float:
    """Waits (up to 2 s) for the engine thread to publish its counters; returns the last value."""
    for _ in range(40):
        if (value := _prefix_tokens(outcome)) >= expected:
            return value
        await asyncio.sleep(0.05)
    return _prefix_tokens(outcome)


async def test_a_repeated_prompt_reuses_its_kv_from_the_prefix_cache(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    prompt = "Then Jesus answered and said unto them, Verily"
    reused, computed = _prefix_tokens("reused"), _prefix_tokens("computed")
    first = await _generate(stub, seed=5, max_tokens=12, prompt=prompt)
    prompt_tokens = first[-1].usage.prompt_tokens
    assert await _prefix_tokens_become("computed", computed + prompt_tokens) == (
        computed + prompt_tokens
    )
    again = await _generate(stub, seed=5, max_tokens=12, prompt=prompt)
    assert await _prefix_tokens_become("reused", reused + prompt_tokens) == reused + prompt_tokens
    assert "".join(m.text for m in again) == "".join(m.text for m in first)
    assert again[-1].usage.prompt_tokens == prompt_tokens  # reused tokens are still billed


async def test_32_concurrent_streams_each_get_their_own_usage(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    results = await asyncio.gather(
        *(_generate(stub, seed=i, max_tokens=8 + i % 5) for i in range(32))
    )
    for i, messages in enumerate(results):
        final = messages[-1]
        assert final.finish_reason == "length"
        assert final.usage.completion_tokens == 8 + i % 5 == sum(len(m.token_ids) for m in messages)
        assert final.usage.prompt_tokens == messages[-1].usage.total_tokens - (8 + i % 5)


async def test_cancelled_stream_frees_its_slot_and_is_metered(model_server):
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    admin = rpc.InferenceAdminServiceStub(channel)
    call = stub.Generate(
        pb.GenerateRequest(
            model="demo-lm", prompt="In the beginning", max_tokens=400, request_id="cancel-me"
        )
    )
    received = 0
    async for message in call:
        received += len(message.token_ids)
        if received >= 5:
            call.cancel()
            break
    for _ in range(100):
        stats = await admin.GetWorkerStats(pb.GetWorkerStatsRequest(), metadata=mtls.EDGE_FOR_ADMIN)
        if stats.running_sequences == 0 and stats.cancelled_total >= 1:
            break
        await asyncio.sleep(0.02)
    assert stats.running_sequences == 0 and stats.cancelled_total == 1
    event = await _usage_event(service, "cancel-me")
    assert event.finish_reason == "cancelled"
    assert event.usage.completion_tokens >= received  # tokens actually produced


async def _usage_event(service, request_id, timeout_s=5.0):
    client = aioredis.from_url(service.settings.redis_url)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                for _, fields in await client.xrange(service.settings.usage_stream):
                    if fields[b"request_id"].decode() == request_id:
                        return inference_pb2.UsageEvent.FromString(fields[b"event"])
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_one_usage_event_per_request_with_what_the_client_saw(model_server):
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    reply = await stub.Complete(
        pb.CompleteRequest(
            model="demo-lm", prompt="Blessed are", max_tokens=6, request_id="meter-1"
        ),
        metadata=(("x-tokenmesh-tenant", "acme"),),
    )
    event = await _usage_event(service, "meter-1")
    assert event.usage == reply.usage and event.finish_reason == reply.finish_reason
    assert event.model == reply.model and event.tenant == "acme"
    client = aioredis.from_url(service.settings.redis_url)
    entries = await client.xrange(service.settings.usage_stream)
    await client.aclose()
    assert sum(1 for _, f in entries if f[b"request_id"] == b"meter-1") == 1


async def test_models_load_and_unload_at_run_time(model_server):
    _, channel = model_server
    admin = rpc.InferenceAdminServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stub = rpc.InferenceServiceStub(channel)
    loaded = await admin.LoadModel(
        pb.LoadModelRequest(model="demo-lm", version="2"), metadata=mtls.EDGE_FOR_ADMIN
    )
    assert [v.version for v in loaded.model.versions] == ["1", "2"]
    name = "tokenmesh.inference.v1.InferenceService/demo-lm/2"
    status = await health.Check(health_pb2.HealthCheckRequest(service=name))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reply = await stub.Complete(
        pb.CompleteRequest(model="demo-lm", version="2", prompt="x", max_tokens=2)
    )
    assert reply.model.version == "2"
    await admin.UnloadModel(
        pb.UnloadModelRequest(model="demo-lm", version="2"), metadata=mtls.EDGE_FOR_ADMIN
    )
    status = await health.Check(health_pb2.HealthCheckRequest(service=name))
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    # The worker itself (version 1 and the other services) still serves: a
    # probe of the overall entry must not take it out of rotation.
    for overall in ("", "tokenmesh.inference.v1.InferenceService"):
        status = await health.Check(health_pb2.HealthCheckRequest(service=overall))
        assert status.status == health_pb2.HealthCheckResponse.SERVING, overall
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(
            pb.CompleteRequest(model="demo-lm", version="2", prompt="x", max_tokens=2)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.LoadModel(
            pb.LoadModelRequest(model="no-such-model", version="1"), metadata=mtls.EDGE_FOR_ADMIN
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
