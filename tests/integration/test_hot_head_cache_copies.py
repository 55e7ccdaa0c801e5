"""A hot prompt head's cache footprint as a worker's heartbeat reports it: one copy
of the prompt per tenant that sent it, as the tenant-scoped prefix cache holds it
(one for a model whose cache is shared). The router fits the heads it pins into
the workers' caches by this figure (services.router.prefix_pins)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.model_routing import PREFIX_HEADER
from services.core import contract
from services.inference.load_report import version_outcomes_pb
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "demo-lm"
TENANTS = ("tenant-a", "tenant-b", "tenant-c")


async def _demo_lm_worker(tmp_path: Path, redis_url: str) -> Any:
    settings = inference_settings(tmp_path, redis_url, models=(f"{MODEL}:1",), test_models=())
    return await start_inference(settings)


@pytest.fixture
async def worker(tmp_path: Path, redis_url: str) -> AsyncIterator[Any]:
    async with await _demo_lm_worker(tmp_path, redis_url) as pair:
        yield pair


@pytest.fixture
async def shared_cache_worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    monkeypatch.setenv("TOKENMESH_CACHE_SHARED_MODELS", MODEL)
    async with await _demo_lm_worker(tmp_path, redis_url) as pair:
        yield pair


async def _send_head_as_tenants(channel: grpc.aio.Channel, head: str) -> int:
    """Sends the head twice as each tenant, as the edge forwards it; returns the
    prompt's length in tokens (every request's prompt is the same)."""
    stub = rpc.InferenceServiceStub(channel)
    key = head.encode()[:64].hex()
    lengths = set()
    for tenant in TENANTS:
        for _ in range(2):
            metadata = [
                (contract.TENANT_HEADER, tenant),
                (contract.KEY_ID_HEADER, f"key-{tenant}"),
                (PREFIX_HEADER, key),
            ]
            reply = await stub.Complete(
                pb.CompleteRequest(model=MODEL, prompt=head, max_output_tokens=1),
                metadata=metadata,
                timeout=30,
            )
            lengths.add(reply.usage.prompt_tokens)
    (length,) = lengths
    return length


def _reported_tokens(service: InferenceService, head: str) -> int:
    """The head's footprint in the heartbeat the worker sends next."""
    versions = version_outcomes_pb(service.registry.resolve(MODEL, "1"))
    key = head.encode()[:64].hex()
    (reported,) = [h.prompt_tokens for h in versions.hot_prefixes if h.prefix == key]
    return reported


def _head() -> str:
    return f"{uuid.uuid4().hex}: one system prompt that every tenant's assistant shares."


async def test_a_head_sent_by_three_tenants_reports_three_copies(worker):
    service, channel = worker
    head = _head()
    length = await _send_head_as_tenants(channel, head)
    assert _reported_tokens(service, head) == len(TENANTS) * length


async def test_a_shared_models_head_reports_one_copy(shared_cache_worker):
    service, channel = shared_cache_worker
    head = _head()
    length = await _send_head_as_tenants(channel, head)
    assert _reported_tokens(service, head) == length
