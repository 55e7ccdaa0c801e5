"""TOKENMESH_CACHE_SHARED_MODELS reaches the engines' prefix caches: a model the
operator made public has one scope for every tenant, the others one per tenant
(services/inference/engines/prefix_cache.py; the scoping itself is tested in
tests/unit/test_prefix_cache_tenants.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.server import serving
from services.inference.service import InferenceService
from tests.integration.conftest import inference_settings


async def _demo_lm_cache_is_shared(tmp_path: Path, redis_url: str) -> bool:
    settings = inference_settings(tmp_path, redis_url, models=("demo-lm:1",), test_models=())
    service = InferenceService(settings)
    async with serving(service, settings):
        scheduler = service.registry.resolve("demo-lm", "1").scheduler
        assert scheduler is not None and scheduler.engine.prefix_cache is not None
        return scheduler.engine.prefix_cache.shared


async def test_a_model_listed_as_shared_shares_its_prefix_cache(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMESH_CACHE_SHARED_MODELS", "demo-lm")
    assert await _demo_lm_cache_is_shared(tmp_path, redis_url)


async def test_other_models_keep_a_prefix_cache_per_tenant(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMESH_CACHE_SHARED_MODELS", "another-model")
    assert not await _demo_lm_cache_is_shared(tmp_path, redis_url)
