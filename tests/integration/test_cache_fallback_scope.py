"""A private model's requests that its shared fallback answers stay in their tenant's scope.

The operator lists models whose prompts are public in TOKENMESH_CACHE_SHARED_MODELS:
their response-cache entries are everyone's. When a private model fails over to a
shared one (the edge's fallback cluster: the routing headers name both), the scope
was decided by the model that answered: the private model's prompts went into
everyone's scope, and another tenant asking the shared model the same prompt read
`x-tokenmesh-cache: hit`, learning what the private model had been asked. A real
worker and Redis, cache on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import model_routing
from services.core import contract
from services.inference.service import InferenceService
from tests.answer_headers import call_headers
from tests.integration.conftest import inference_settings, start_inference
from tests.prompts import unique_prompt
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

PRIVATE, PUBLIC = "private-lm", "public-lm"


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENMESH_CACHE_SHARED_MODELS", PUBLIC)
    settings = inference_settings(
        tmp_path, redis_url, test_models=(f"{PRIVATE}:1", f"{PUBLIC}:1"), test_engine_step_ms=1.0
    )
    async with await start_inference(settings) as pair:
        yield pair


def _tenant(name: str) -> list[tuple[str, str]]:
    return [(contract.TENANT_HEADER, name), (contract.KEY_ID_HEADER, f"k-{name}")]


def _via_fallback(tenant: str) -> list[tuple[str, str]]:
    """A request for PRIVATE whose route failed over to PUBLIC (version 9 is nowhere)."""
    return [
        *_tenant(tenant),
        (model_routing.ROUTE_MODEL_HEADER, PRIVATE),
        (model_routing.ROUTE_VERSION_HEADER, "9"),
        (model_routing.FALLBACK_MODEL_HEADER, PUBLIC),
        (model_routing.FALLBACK_VERSION_HEADER, "1"),
    ]


async def _complete(stub: Any, model: str, prompt: str, metadata: Any) -> tuple[str, str]:
    request = pb.CompleteRequest(model=model, prompt=prompt, max_output_tokens=4)
    request.sampling.seed = 1
    call = stub.Complete(request, metadata=metadata)
    response = await call
    return response.model.name, (await call_headers(call))["x-tokenmesh-cache"]


async def test_a_private_prompt_its_shared_fallback_answered_is_no_other_tenants_hit(worker):
    stub = rpc.InferenceServiceStub(worker[1])
    secret = unique_prompt("acme's merger plan")
    assert await _complete(stub, PRIVATE, secret, _via_fallback("acme")) == (PUBLIC, "miss")
    assert await _complete(stub, PUBLIC, secret, _tenant("evil")) == (PUBLIC, "miss")
    # Its own tenant still reuses it.
    assert await _complete(stub, PRIVATE, secret, _via_fallback("acme")) == (PUBLIC, "hit")


async def test_a_shared_models_own_requests_are_everyones(worker):
    stub = rpc.InferenceServiceStub(worker[1])
    public = unique_prompt("a public question")
    assert await _complete(stub, PUBLIC, public, _tenant("one")) == (PUBLIC, "miss")
    assert await _complete(stub, PUBLIC, public, _tenant("two")) == (PUBLIC, "hit")


@pytest.fixture
async def shared_demo_lm(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
    """A worker of the real demo-lm, its prefix cache shared by every tenant (listed)."""
    monkeypatch.setenv("TOKENMESH_CACHE_SHARED_MODELS", "demo-lm")
    settings = inference_settings(tmp_path, redis_url, models=("demo-lm:1",), test_models=())
    async with await start_inference(settings) as pair:
        yield pair


async def _cached_tokens(stub: Any, model: str, prompt: str, metadata: Any) -> int:
    request = pb.CompleteRequest(model=model, prompt=prompt, max_output_tokens=1)
    response = await stub.Complete(request, metadata=metadata)
    return int(response.usage.cached_prompt_tokens)


async def test_a_private_prompt_its_shared_fallback_computed_is_no_other_tenants_prefix_hit(
    shared_demo_lm,
):
    # The engine's prefix cache: a hit shows in the caller's cached_prompt_tokens.
    stub = rpc.InferenceServiceStub(shared_demo_lm[1])
    fallback = [
        *_tenant("acme"),
        (model_routing.ROUTE_MODEL_HEADER, PRIVATE),
        (model_routing.ROUTE_VERSION_HEADER, "9"),
        (model_routing.FALLBACK_MODEL_HEADER, "demo-lm"),
        (model_routing.FALLBACK_VERSION_HEADER, "1"),
    ]
    secret = f"And the merger of {unique_prompt('acme')} was agreed in secret"
    assert await _cached_tokens(stub, PRIVATE, secret, fallback) == 0
    assert await _cached_tokens(stub, "demo-lm", secret, _tenant("evil")) == 0
    assert await _cached_tokens(stub, PRIVATE, secret, fallback) > 0  # its own scope's
    # The shared model's own requests still share one scope.
    public = f"And the people of {unique_prompt('all')} heard it"
    assert await _cached_tokens(stub, "demo-lm", public, _tenant("one")) == 0
    assert await _cached_tokens(stub, "demo-lm", public, _tenant("two")) > 0
