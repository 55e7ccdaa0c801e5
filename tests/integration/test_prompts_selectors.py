"""A template reference's version on a real worker (mTLS, real Redis): ASCII digits only.

str.isdigit() also accepts "²" (which int() refuses) and "٣" (which int() reads
as 3): both reached the worker's cache, the first as INTERNAL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.router.prompts import PromptCatalog
from tests.integration.conftest import inference_settings, start_inference
from tests.rpc_errors import failed_call_fields
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"


@pytest.fixture
async def stub(tmp_path: Path, redis_url: str) -> AsyncIterator[rpc.InferenceServiceStub]:
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        yield rpc.InferenceServiceStub(channel)


@pytest.fixture
async def name(redis_url: str) -> AsyncIterator[str]:
    """A template with versions 1-3 (so a selector read as 3 would be served)."""
    name = f"sel-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    catalog = PromptCatalog(client)
    for version in range(1, 4):
        await catalog.create(name, f"v{version}", "", (), time.time())
    yield name
    await client.aclose()


@pytest.mark.parametrize(
    "selector",
    ["²", "٣", "１", "3²", "1" * 5000],
    ids=["superscript-2", "arabic-3", "fullwidth-1", "3-superscript-2", "5000-digits"],
)
async def test_a_version_that_is_not_ascii_digits_is_invalid_argument(stub, name, selector):
    request = pb.CompleteRequest(model=MODEL, template=f"{name}@{selector}", max_output_tokens=1)
    assert await failed_call_fields(stub.Complete(request)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["template"],
    )


async def test_ascii_versions_and_aliases_still_resolve(stub, name):
    for reference, version in ((f"{name}@3", 3), (f"{name}@03", 3), (name, 3)):
        request = pb.CompleteRequest(model=MODEL, template=reference, max_output_tokens=1)
        reply = await stub.Complete(request)
        assert (reply.template.name, reply.template.version) == (name, version), reference
