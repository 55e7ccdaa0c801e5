"""Prompt templates in inference v2 requests, on a real worker over mTLS with real Redis:
resolved through the worker's cache, rendered, validated, and named in responses and usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.inference.service import InferenceService
from services.inference.templates import DEFAULT_CHAT_TEMPLATE_ID, Variable
from services.inference.tokenizer import WordTokenizer
from services.router.prompts import PromptCatalog
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_inference_v2 import _usage_event
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
GREEDY = resources.SamplingParams(temperature=0, seed=1)


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[InferenceService, rpc.InferenceServiceStub]]:
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (service, ch):
        yield service, rpc.InferenceServiceStub(ch)


@pytest.fixture
async def catalog(redis_url: str) -> AsyncIterator[PromptCatalog]:
    client = aioredis.from_url(redis_url)
    yield PromptCatalog(client)
    await client.aclose()


@pytest.fixture
def name() -> str:
    return f"greet-{uuid.uuid4().hex[:8]}"


async def _create(catalog: PromptCatalog, name: str, source: str) -> int:
    variables = (Variable("who", required=True, max_length=16),)
    created = await catalog.create(name, source, "", variables, time.time())
    return created.version


async def _generate(stub, **fields) -> tuple[str, list[pb.GenerateResponse]]:
    finals, text = [], ""
    async for message in stub.Generate(pb.GenerateRequest(model=MODEL, **fields)):
        text += message.text
        if message.finish_reason:
            finals.append(message)
    return text, finals


async def _status(call) -> tuple[grpc.StatusCode, list[object]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = await rpc_status.aio.from_call(call)
    details: list[object] = []
    for detail in status.details if status else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo):
            message = kind()
            if detail.Unpack(message):
                details.append(message)
    return info.value.code(), details


async def test_a_template_version_renders_the_prompt_and_is_named(worker, catalog, name):
    service, stub = worker
    await _create(
        catalog, name, "a b {{ who }} c {% for m in messages %}{{ m.content }}{% endfor %}"
    )
    expected = "a b dog c the end"
    text, (final,) = await _generate(
        stub,
        template=f"{name}@1",
        variables={"who": "dog"},
        prompt="the end",
        max_output_tokens=4,
        sampling=GREEDY,
        request_id=f"tpl-{name}",
    )
    assert final.usage.prompt_tokens == len(WordTokenizer().encode(expected))
    plain, _ = await _generate(stub, prompt=expected, max_output_tokens=4, sampling=GREEDY)
    assert text == plain, "the same tokens as the rendered prompt sent as is"
    assert (final.template.name, final.template.version) == (name, 1)
    event = await _usage_event(service, f"tpl-{name}")
    assert (event.template.name, event.template.version) == (name, 1)


async def test_complete_names_the_template_and_messages_name_the_chat_template(
    worker, catalog, name
):
    _, stub = worker
    await _create(catalog, name, "{{ who }}")
    reply = await stub.Complete(
        pb.CompleteRequest(model=MODEL, template=name, variables={"who": "x"}, max_output_tokens=1)
    )
    assert (reply.template.name, reply.template.version) == (name, 1)
    _, (final,) = await _generate(
        stub, messages=[resources.ChatMessage(role="user", content="hi")], max_output_tokens=1
    )
    assert (final.template.name, final.template.version) == (
        DEFAULT_CHAT_TEMPLATE_ID.name,
        DEFAULT_CHAT_TEMPLATE_ID.version,
    )
    _, (plain,) = await _generate(stub, prompt="a", max_output_tokens=1)
    assert not plain.HasField("template"), "a prompt used as is has no template"
    model = (await stub.GetModel(pb.GetModelRequest(model=MODEL))).model
    assert model.versions[0].chat_template.name == DEFAULT_CHAT_TEMPLATE_ID.name


async def test_an_alias_moved_is_served_within_a_second_or_two(worker, catalog, name):
    _, stub = worker
    await _create(catalog, name, "one {{ who }}")
    await _create(catalog, name, "two {{ who }}")
    await catalog.set_alias(name, "stable", 1, time.time())
    fields = {"template": f"{name}@stable", "variables": {"who": "a"}, "max_output_tokens": 1}
    _, (final,) = await _generate(stub, **fields)
    assert final.template.version == 1
    await catalog.set_alias(name, "stable", 2, time.time())
    # The background refresh re-reads used aliases every 0.5 s (5 s: slack for a loaded CI).
    async with asyncio.timeout(5):
        while final.template.version != 2:
            _, (final,) = await _generate(stub, **fields)


async def test_unknown_templates_versions_and_aliases_are_not_found(worker, catalog, name):
    _, stub = worker
    await _create(catalog, name, "{{ who }}")
    for reference in (f"missing-{name}@1", f"{name}@7", f"{name}@nope"):
        request = pb.CompleteRequest(model=MODEL, template=reference, variables={"who": "a"})
        code, details = await _status(stub.Complete(request))
        assert code == grpc.StatusCode.NOT_FOUND, reference
        (info,) = [d for d in details if isinstance(d, error_details_pb2.ResourceInfo)]
        assert info.resource_name == reference
        assert info.resource_type == "tokenmesh.router.v1.PromptTemplate"


async def test_a_variable_over_its_limit_is_invalid_argument_naming_it(worker, catalog, name):
    _, stub = worker
    await _create(catalog, name, "{{ who }}")
    for variables, field in (({"who": "x" * 17}, "variables.who"), ({}, "variables.who")):
        request = pb.CompleteRequest(model=MODEL, template=f"{name}@1", variables=variables)
        code, details = await _status(stub.Complete(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = [d for d in details if isinstance(d, error_details_pb2.BadRequest)]
        assert [v.field for v in bad.field_violations] == [field]
