"""InferenceService over a real channel: streams, errors with details, health, reflection."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


async def _status(call):
    status = await rpc_status.aio.from_call(call)
    assert status is not None, "the error carries no google.rpc.Status"
    return status


def _details(status, detail_type):
    out = []
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            message = detail_type()
            detail.Unpack(message)
            out.append(message)
    return out


async def test_generate_streams_indexed_deltas_and_a_complete_final_message(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    call = stub.Generate(
        pb.GenerateRequest(model="deterministic-test", prompt="hello there", max_tokens=6, seed=5)
    )
    messages = [m async for m in call]
    assert [m.index for m in messages] == list(range(len(messages)))
    final = messages[-1]
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == 2 and final.usage.completion_tokens == 6
    assert final.usage.total_tokens == 8
    assert sum(len(m.token_ids) for m in messages) == 6
    assert final.model.name == "deterministic-test" and final.model.version == "2"
    assert final.timing.total_ms >= final.timing.time_to_first_token_ms > 0
    assert all(m.request_id == final.request_id for m in messages) and final.request_id
    assert all(not m.finish_reason for m in messages[:-1])
    metadata = dict(await call.initial_metadata())
    assert metadata["x-model-version"] == "2"
    assert metadata["x-request-id"] == final.request_id


async def test_complete_equals_the_concatenated_stream(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    fields = dict(
        model="deterministic-test",
        version="1",
        prompt="same prompt",
        max_tokens=7,
        seed=11,
        request_id="req-1",
    )
    streamed = [m async for m in stub.Generate(pb.GenerateRequest(**fields))]
    complete = await stub.Complete(pb.CompleteRequest(**fields))
    assert complete.text == "".join(m.text for m in streamed)
    assert list(complete.token_ids) == [t for m in streamed for t in m.token_ids]
    assert complete.request_id == "req-1" and complete.model.version == "1"
    assert complete.finish_reason == "length"


async def test_invalid_request_names_the_fields(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    call = stub.Complete(
        pb.CompleteRequest(model="deterministic-test", prompt="x", max_tokens=0, temperature=-1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (bad_request,) = _details(await _status(call), error_details_pb2.BadRequest)
    assert {v.field for v in bad_request.field_violations} == {"max_tokens", "temperature"}


async def test_invalid_stream_request_fails_before_any_message(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    call = stub.Generate(pb.GenerateRequest(model="deterministic-test", prompt=""))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pytest.fail("no message expected")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_context_overflow_is_invalid_argument_with_numbers(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    call = stub.Complete(
        pb.CompleteRequest(model="deterministic-test", prompt="word " * 500, max_tokens=100)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "500" in info.value.details() and "512" in info.value.details()


async def test_unknown_model_and_version_are_not_found(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    for request in (pb.GetModelRequest(model="nope"),):
        call = stub.GetModel(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        (error_info,) = _details(await _status(call), error_details_pb2.ErrorInfo)
        assert error_info.reason == "MODEL_NOT_FOUND"
    call = stub.Complete(pb.CompleteRequest(model="deterministic-test", version="9", prompt="x"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_full_queue_is_resource_exhausted_with_retry_info(tmp_path, redis_url):
    from google.protobuf import duration_pb2  # noqa: F401 - RetryInfo's field type

    from tests.integration.conftest import inference_settings, start_inference

    settings = inference_settings(
        tmp_path, redis_url, max_sequences=1, max_queue=1, test_engine_step_ms=20.0
    )
    async with await start_inference(settings) as (_, channel):
        stub = rpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(model="deterministic-test", prompt="x", max_tokens=50)
        running = asyncio.ensure_future(stub.Complete(request))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(stub.Complete(request))
        await asyncio.sleep(0.1)
        call = stub.Complete(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (retry,) = _details(await _status(call), error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToMilliseconds() > 0
        assert (await running).usage.completion_tokens == 50
        assert (await queued).usage.completion_tokens == 50


async def test_embed_on_a_generative_model_is_rejected(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(model="deterministic-test", inputs=["a"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_models_paginates(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    page = await stub.ListModels(pb.ListModelsRequest(page_size=1))
    assert [m.name for m in page.models] == ["deterministic-test"]
    assert [v.version for v in page.models[0].versions] == ["1", "2"]
    assert page.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListModels(pb.ListModelsRequest(page_size=5000))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_cancellation_stops_the_stream(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    call = stub.Generate(
        pb.GenerateRequest(model="deterministic-test", prompt="long", max_tokens=500)
    )
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            call.cancel()
            break
    assert call.cancelled()
    # The server keeps serving after a cancellation.
    reply = await stub.Complete(
        pb.CompleteRequest(model="deterministic-test", prompt="x", max_tokens=2)
    )
    assert reply.usage.completion_tokens == 2


async def test_health_reports_service_and_model_versions(inference_channel):
    health = health_pb2_grpc.HealthStub(inference_channel)
    for name in (
        "",
        "tokenmesh.inference.v1.InferenceService",
        "tokenmesh.inference.v1.InferenceService/deterministic-test/1",
    ):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_service(inference_channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(inference_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert "tokenmesh.inference.v1.InferenceService" in names
    assert "grpc.health.v1.Health" in names


async def test_concurrent_streams_are_independent(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)

    async def one(seed: int) -> str:
        request = pb.GenerateRequest(
            model="deterministic-test", prompt="p", max_tokens=10, seed=seed
        )
        return "".join([m.text async for m in stub.Generate(request)])

    texts = await asyncio.gather(*(one(s % 4) for s in range(16)))
    for i, text in enumerate(texts):
        assert text == texts[i % 4]
