"""tokenmesh.inference.v2 on a real worker over mTLS: choices, logprobs, usage, errors.

The deterministic test engine (inference_channel) and the real demo-lm and
all-minilm-l6-v2 (model_server) serve v2 beside v1 on the same worker.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tests import mtls
from tokenmesh.inference.v1 import inference_pb2 as v1_resources
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

STOP = resources.FINISH_REASON_STOP
LENGTH = resources.FINISH_REASON_LENGTH


def _violations(status) -> dict[str, str]:
    found = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


async def _bad_request(call) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await call.read()  # a stream fails before its first message
        else:
            await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    return _violations(status)


def _by_choice(messages):
    choices = {}
    for message in messages:
        choices.setdefault(message.choice_index, []).append(message)
    return choices


async def _texts(stub, **fields) -> list[str]:
    messages = [m async for m in stub.Generate(pb.GenerateRequest(**fields))]
    return ["".join(m.text for m in ms) for _, ms in sorted(_by_choice(messages).items())]


async def _usage_event(service, request_id):
    client = aioredis.from_url(service.settings.redis_url)
    try:
        async with asyncio.timeout(10):
            while True:
                entries = await client.xrange(service.settings.usage_stream)
                found = [f for _, f in entries if f[b"request_id"].decode() == request_id]
                if found:
                    assert len(found) == 1, "one usage event per request"
                    return v1_resources.UsageEvent.FromString(found[0][b"event"])
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_n_choices_stream_interleaved_each_with_one_final_message(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    request = pb.GenerateRequest(
        model="deterministic-test",
        prompt="hello there",
        n=3,
        max_output_tokens=5,
        sampling=resources.SamplingParams(seed=7),
        request_id="v2-n3",
    )
    messages = [m async for m in stub.Generate(request)]
    choices = _by_choice(messages)
    assert sorted(choices) == [0, 1, 2]
    sent = 0
    for message in messages:
        sent += len(message.token_ids)
        if message.HasField("finish_reason"):
            # usage is cumulative: the prompt once, every token sent so far.
            assert message.usage.prompt_tokens == 2
            assert message.usage.completion_tokens == sent
            assert message.usage.total_tokens == 2 + sent
            assert message.usage.cached_prompt_tokens == 0
    for index, stream in choices.items():
        finals = [m for m in stream if m.HasField("finish_reason")]
        assert finals == [stream[-1]], f"choice {index}: exactly one final message, last"
        final = stream[-1]
        assert final.finish_reason == LENGTH
        assert sum(len(m.token_ids) for m in stream) == 5
        assert final.model.name == "deterministic-test" and final.model.version == "2"
        timing = final.timing
        assert timing.total_ms >= timing.time_to_first_token_ms > 0
        assert timing.time_to_first_token_ms >= timing.queue_ms
        assert timing.decode_ms > 0 and timing.output_tokens_per_second > 0
        assert final.HasField("confidence") and 0 <= final.confidence <= 1
        assert final.mean_logprob <= 0
        assert math.isclose(final.confidence, math.exp(final.mean_logprob))
        assert not any(m.logprobs for m in stream), "logprobs only when asked for"
        assert all(not m.HasField("usage") for m in stream[:-1])
    assert messages[-1].usage.completion_tokens == 15
    assert {m.request_id for m in messages} == {"v2-n3"}


async def test_a_seed_reproduces_every_choice_and_choices_differ(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    fields = dict(
        model="deterministic-test",
        prompt="the mesh",
        n=3,
        max_output_tokens=8,
        sampling=resources.SamplingParams(seed=42, temperature=1.0),
    )
    first = await _texts(stub, **fields)
    again = await _texts(stub, **fields)
    assert first == again
    assert len(set(first)) == 3, first


async def test_demo_lm_n3_with_a_seed_is_reproducible_and_complete_matches(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    fields = dict(
        model="demo-lm",
        messages=[resources.ChatMessage(role="user", content="In the beginning")],
        n=3,
        max_output_tokens=12,
        sampling=resources.SamplingParams(seed=3),
    )
    first = await _texts(stub, **fields)
    assert first == await _texts(stub, **fields)
    assert len(set(first)) == 3, first
    complete = await stub.Complete(pb.CompleteRequest(**fields))
    assert [c.text for c in complete.choices] == first
    assert [c.index for c in complete.choices] == [0, 1, 2]
    assert complete.usage.completion_tokens == sum(len(c.token_ids) for c in complete.choices)
    assert complete.model.name == "demo-lm"


async def test_cached_prompt_tokens_count_what_the_prefix_cache_served(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    request = pb.CompleteRequest(
        model="demo-lm", prompt="Thou shalt love thy neighbour", n=3, max_output_tokens=2
    )
    first = await stub.Complete(request)
    # Choice 0 computed the prompt (the other two copied it): nothing came from the cache.
    assert first.usage.cached_prompt_tokens == 0
    again = await stub.Complete(request)
    assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens > 0


async def test_v2_choice_0_draws_what_v1_draws_with_the_same_seed(model_server):
    _, channel = model_server
    v2_reply = await rpc.InferenceServiceStub(channel).Complete(
        pb.CompleteRequest(
            model="demo-lm",
            prompt="And God said",
            max_output_tokens=10,
            sampling=resources.SamplingParams(seed=11),
        )
    )
    v1_reply = await v1_rpc.InferenceServiceStub(channel).Complete(
        v1.CompleteRequest(model="demo-lm", prompt="And God said", max_tokens=10, seed=11)
    )
    assert v2_reply.choices[0].text == v1_reply.text
    assert list(v2_reply.choices[0].token_ids) == list(v1_reply.token_ids)


async def test_demo_lm_logprobs_greedy_top1_is_the_sampled_token(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    reply = await stub.Complete(
        pb.CompleteRequest(
            model="demo-lm",
            prompt="And the LORD",
            max_output_tokens=8,
            sampling=resources.SamplingParams(temperature=0),
            logprobs=True,
            top_logprobs=5,
        )
    )
    (choice,) = reply.choices
    assert len(choice.logprobs) == len(choice.token_ids) > 0
    for item, token_id in zip(choice.logprobs, choice.token_ids, strict=True):
        assert item.token_id == token_id and item.logprob <= 0
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert item.top_logprobs[0].token_id == token_id
        assert item.top_logprobs[0].logprob == item.logprob
        assert item.token == item.top_logprobs[0].token
    mean = sum(i.logprob for i in choice.logprobs) / len(choice.logprobs)
    assert math.isclose(choice.mean_logprob, mean, rel_tol=1e-9)
    assert 0 <= choice.confidence <= 1


async def test_sampled_logprobs_come_from_the_filtered_distribution(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    call = stub.Generate(
        pb.GenerateRequest(
            model="demo-lm",
            prompt="In the beginning",
            max_output_tokens=10,
            sampling=resources.SamplingParams(seed=5, temperature=0.9, top_k=3),
            logprobs=True,
            top_logprobs=5,
        )
    )
    messages = [m async for m in call]
    items = [i for m in messages for i in m.logprobs]
    assert len(items) == sum(len(m.token_ids) for m in messages)
    for item in items:
        assert item.logprob <= 0
        assert len(item.top_logprobs) <= 3, "top_k leaves at most 3 tokens"
        assert item.token_id in {t.token_id for t in item.top_logprobs}
        total = sum(math.exp(t.logprob) for t in item.top_logprobs)
        assert math.isclose(total, 1.0, rel_tol=1e-6), "renormalised over the kept tokens"


async def test_stop_sequences_and_eos_finish_with_stop(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    reply = await stub.Complete(
        pb.CompleteRequest(
            model="deterministic-test",
            prompt="hello",
            n=2,
            max_output_tokens=60,
            stop_sequences=[" the"],
            sampling=resources.SamplingParams(seed=1),
        )
    )
    for choice in reply.choices:
        assert " the" not in choice.text
        assert choice.finish_reason in (STOP, LENGTH)
    assert any(c.finish_reason == STOP for c in reply.choices)


async def test_v2_usage_event_sums_choices_and_carries_metadata(model_server):
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    reply = await stub.Complete(
        pb.CompleteRequest(
            model="demo-lm",
            prompt="Blessed are",
            n=2,
            max_output_tokens=4,
            metadata={"team": "search", "env": "test"},
            request_id="v2-meter",
        ),
        metadata=(("x-tokenmesh-tenant", "acme"),),
    )
    event = await _usage_event(service, "v2-meter")
    assert event.api_version == "v2"
    assert dict(event.metadata) == {"team": "search", "env": "test"}
    assert event.usage.prompt_tokens == reply.usage.prompt_tokens
    assert event.usage.completion_tokens == reply.usage.completion_tokens == 8
    assert event.rpc == "/tokenmesh.inference.v2.InferenceService/Complete"
    assert event.tenant == "acme" and event.finish_reason == "length"
    await v1_rpc.InferenceServiceStub(channel).Complete(
        v1.CompleteRequest(model="demo-lm", prompt="x", max_tokens=1, request_id="v1-meter")
    )
    v1_event = await _usage_event(service, "v1-meter")
    assert v1_event.api_version == "v1" and not v1_event.metadata


async def test_validation_names_every_bad_field(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    violations = await _bad_request(
        stub.Complete(
            pb.CompleteRequest(
                model="deterministic-test",
                prompt="x",
                messages=[resources.ChatMessage(role="robot", content="hi")],
                n=9,
                top_logprobs=21,
                sampling=resources.SamplingParams(temperature=3, top_p=0, top_k=5000),
                max_output_tokens=0,
                stop_sequences=[""],
                metadata={"bad key": "v", "ok": "x" * 257},
            )
        )
    )
    assert set(violations) == {
        "messages",
        "messages[0].role",
        "n",
        "top_logprobs",
        "sampling.temperature",
        "sampling.top_p",
        "sampling.top_k",
        "max_output_tokens",
        "stop_sequences[0]",
        "metadata",
        "metadata.ok",
    }, violations
    assert "not both" in violations["messages"]
    violations = await _bad_request(
        stub.Complete(pb.CompleteRequest(model="deterministic-test", prompt="x", top_logprobs=3))
    )
    assert violations == {"top_logprobs": "needs logprobs: true"}
    violations = await _bad_request(stub.Complete(pb.CompleteRequest(model="deterministic-test")))
    assert set(violations) == {"prompt"}
    too_many = {f"k{i}": "v" for i in range(17)}
    violations = await _bad_request(
        stub.Complete(pb.CompleteRequest(model="deterministic-test", prompt="x", metadata=too_many))
    )
    assert set(violations) == {"metadata"}


async def test_an_invalid_stream_fails_before_any_message(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    violations = await _bad_request(
        stub.Generate(pb.GenerateRequest(model="deterministic-test", prompt="x", n=-1))
    )
    assert set(violations) == {"n"}
    call = stub.Generate(
        pb.GenerateRequest(model="deterministic-test", prompt="word " * 500, max_output_tokens=100)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pytest.fail("no message expected")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_output_tokens" in info.value.details()


async def test_a_failure_mid_stream_ends_every_running_choice_in_band(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    admin = v1_rpc.InferenceAdminServiceStub(inference_channel)
    call = stub.Generate(
        pb.GenerateRequest(
            model="deterministic-test", version="1", prompt="long", n=2, max_output_tokens=400
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
    finals = [m for m in messages if m.HasField("finish_reason")]
    assert sorted(m.choice_index for m in finals) == [0, 1]
    for final in finals:
        assert final.finish_reason == resources.FINISH_REASON_ERROR
        assert final.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert final.error.message and final.usage.prompt_tokens == 1
    assert finals[-1].usage.completion_tokens == sum(len(m.token_ids) for m in messages)


async def test_embed_base64_decodes_to_the_float_values(model_server):
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    inputs = ["The LORD is my shepherd", "a gRPC service mesh"]
    floats = await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=inputs))
    packed = await stub.Embed(
        pb.EmbedRequest(
            model="all-minilm-l6-v2",
            inputs=inputs,
            encoding=resources.EMBEDDING_ENCODING_BASE64,
            metadata={"team": "search"},
        )
    )
    for f, p in zip(floats.embeddings, packed.embeddings, strict=True):
        assert not p.values and p.HasField("base64") and not f.HasField("base64")
        decoded = np.frombuffer(p.base64, dtype="<f4")
        assert decoded.shape == (384,)
        assert np.array_equal(decoded, np.asarray(f.values, dtype=np.float32))
        assert f.prompt_tokens == p.prompt_tokens > 0 and not p.truncated
    assert packed.usage.prompt_tokens == sum(e.prompt_tokens for e in packed.embeddings)
    assert packed.usage.completion_tokens == 0


async def test_embed_truncation_none_rejects_and_end_cuts(model_server):
    service, channel = model_server
    embedder = service.registry.resolve("all-minilm-l6-v2", "1").embedder
    stub = rpc.InferenceServiceStub(channel)
    long_text = "word " * 2000
    violations = await _bad_request(
        stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["short", long_text]))
    )
    assert set(violations) == {"inputs[1]"}
    reply = await stub.Embed(
        pb.EmbedRequest(
            model="all-minilm-l6-v2",
            inputs=["short", long_text],
            truncate=resources.TRUNCATION_END,
        )
    )
    short, cut = reply.embeddings
    assert not short.truncated and cut.truncated
    assert cut.prompt_tokens == embedder.max_input_tokens and short.prompt_tokens < 10
    assert math.isclose(sum(v * v for v in cut.values), 1.0, rel_tol=1e-4)


async def test_embed_with_another_size_is_refused_before_any_work(model_server):
    # OpenAI batches pass `dimensions` on: a line asking for another size was
    # computed and billed, then failed as a 400 line.
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    metered: list[Any] = []
    log = service.usage_log
    append = log.append
    log.append = lambda event: (metered.append(event), append(event))[-1]
    violations = await _bad_request(
        stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["a"], dimensions=256))
    )
    assert violations == {"dimensions": "must be 384 for this model (or left out)"}
    assert not metered  # refused before any work: nothing metered
    assert set(
        await _bad_request(
            stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["a"], dimensions=0))
        )
    ) == {"dimensions"}
    reply = await stub.Embed(
        pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["a"], dimensions=384)
    )
    assert len(reply.embeddings[0].values) == 384


async def test_list_and_get_models_in_the_v2_shape(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    page = await stub.ListModels(pb.ListModelsRequest())
    (model,) = page.models
    assert model.name == "deterministic-test" and model.default_version == "2"
    assert model.kind == resources.MODEL_KIND_GENERATIVE
    version = model.versions[0]
    assert version.state == resources.MODEL_VERSION_STATE_READY
    assert version.max_output_tokens_default > 0 and version.context_length == 512
    got = await stub.GetModel(pb.GetModelRequest(model="deterministic-test"))
    assert got.model == model
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModel(pb.GetModelRequest(model="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_name_v2(inference_channel):
    health = health_pb2_grpc.HealthStub(inference_channel)
    for name in (
        "tokenmesh.inference.v2.InferenceService",
        "tokenmesh.inference.v2.InferenceService/deterministic-test/1",
    ):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    stub = reflection_pb2_grpc.ServerReflectionStub(inference_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in reply.list_services_response.service}
    assert "tokenmesh.inference.v2.InferenceService" in names


async def test_only_the_edge_may_call_v2(tmp_path, redis_url):
    from tests.integration.conftest import inference_settings, start_inference

    settings = inference_settings(tmp_path, redis_url, test_models=("deterministic-test:1",))
    async with await start_inference(settings) as (service, _):
        port = service._running.port  # noqa: SLF001 - the bound port
        async with mtls.aio_channel(port, peer="worker", caller="usage") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_n_choices_reserve_every_choice_in_the_token_budget(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    identity = (("x-tokenmesh-key-id", f"key_{uuid.uuid4().hex[:8]}"), ("x-tokenmesh-tpm", "40"))
    # prompt (1) + 3 x 20 = 61 > 40: refused before any compute (more than the whole
    # tokens_per_minute: for good, not "retry later").
    call = stub.Complete(
        pb.CompleteRequest(model="deterministic-test", prompt="x", n=3, max_output_tokens=20),
        metadata=identity,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs 61 tokens" in (info.value.details() or "")
    # prompt (1) + 2 x 5 = 11 fits; the unused part of the reservation comes back.
    reply = await stub.Complete(
        pb.CompleteRequest(model="deterministic-test", prompt="x", n=2, max_output_tokens=5),
        metadata=identity,
    )
    assert reply.usage.total_tokens == 11


async def test_a_stream_admitted_while_budgets_were_down_ends_every_choice_with_quota(tmp_path):
    """As in v1: budgets fail open, the stream is then charged as it goes, and every
    running choice ends cleanly with FINISH_REASON_QUOTA once the budget is gone."""
    from services.inference.budget import Limits, TokenBudgets
    from services.launcher.mesh import spawn_redis
    from tests.integration.conftest import inference_settings, start_inference

    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    settings = inference_settings(tmp_path, url, test_engine_step_ms=20.0)
    key = f"key_{uuid.uuid4().hex[:8]}"
    # Room for its 2 x 401 tokens (more than a whole budget is refused before Redis is
    # asked): it runs out because another request takes the minute's tokens.
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-tpm", "1000")]
    try:
        async with await start_inference(settings) as (_, channel):
            child.terminate()
            child.wait(10)
            call = rpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(
                    model="deterministic-test", prompt="a", n=2, max_output_tokens=400
                ),
                metadata=identity,
            )
            messages = [await call.read()]  # admitted although budgets were unreachable
            child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
            client = aioredis.from_url(url)
            await TokenBudgets(client).reserve(key, Limits(tokens_per_minute=1000), "other", 990)
            await client.aclose()
            while (message := await call.read()) != grpc.aio.EOF:
                messages.append(message)
            assert await call.code() == grpc.StatusCode.OK  # a clean end, not an error
    finally:
        child.terminate()
        child.wait(10)
    finals = [m for m in messages if m.HasField("finish_reason")]
    assert sorted(m.choice_index for m in finals) == [0, 1]
    assert all(m.finish_reason == resources.FINISH_REASON_QUOTA for m in finals)
    sent = sum(len(m.token_ids) for m in messages)
    assert finals[-1].usage.completion_tokens == sent < 800


async def test_a_prompt_near_the_context_without_a_limit_gets_the_room_left(inference_channel):
    # The model's default (64) no longer fits after 500 of its 512 tokens: it was a
    # 400 naming max_output_tokens, which the caller never sent. OpenAI and vLLM
    # cut the default to the room left.
    stub = rpc.InferenceServiceStub(inference_channel)
    prompt = " ".join(["the"] * 500)
    reply = await stub.Complete(pb.CompleteRequest(model="deterministic-test", prompt=prompt))
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 512
    assert reply.usage.completion_tokens > 0
    with pytest.raises(grpc.aio.AioRpcError) as asked:  # a limit the caller set is checked
        await stub.Complete(
            pb.CompleteRequest(model="deterministic-test", prompt=prompt, max_output_tokens=64)
        )
    assert asked.value.code() == grpc.StatusCode.INVALID_ARGUMENT
