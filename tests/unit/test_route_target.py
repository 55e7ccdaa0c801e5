"""A worker serves what the edge routed it to, its fallback, or asks for a retry elsewhere."""

from __future__ import annotations

import pytest

from services.core.errors import NotFound, Unavailable
from services.inference.models import ModelRegistry
from services.inference.repository import deterministic_test_model
from services.inference.scheduler import SchedulerLimits
from services.inference.servicer import route_target


@pytest.fixture
def registry() -> ModelRegistry:
    registry = ModelRegistry()
    for name, version in (("m", "1"), ("m", "2"), ("backup", "3")):
        registry.add(deterministic_test_model(name, version, 0.0, SchedulerLimits()))
    return registry


def _routed(model: str, version: str, **extra: str) -> dict[str, str]:
    return {"x-tokenmesh-route-model": model, "x-tokenmesh-route-version": version, **extra}


def test_the_edge_s_choice_wins_over_the_request(registry):
    target = route_target(registry, _routed("m", "1"), "m", "")
    assert (target.model.version, target.fallback_from) == ("1", "")


def test_the_fallback_serves_when_the_routed_version_is_not_here(registry):
    headers = _routed(
        "ghost",
        "1",
        **{"x-tokenmesh-fallback-model": "backup", "x-tokenmesh-fallback-version": "3"},
    )
    target = route_target(registry, headers, "ghost", "")
    assert (target.model.name, target.fallback_from) == ("backup", "ghost")
    # Should the body name another model than the edge read, the fallback is the
    # routed model's (a key's permission is checked against it, not the body's).
    assert route_target(registry, headers, "allowed", "").fallback_from == "ghost"


def test_a_stale_endpoint_asks_for_a_retry_elsewhere(registry):
    with pytest.raises(Unavailable) as info:
        route_target(registry, _routed("m", "7"), "m", "")
    assert info.value.reason == "VERSION_NOT_ON_WORKER"


def test_without_the_edge_the_request_decides(registry):
    assert route_target(registry, {}, "m", "").model.version == "2"  # newest
    assert route_target(registry, {"x-model-version": "1"}, "m", "").model.version == "1"
    with pytest.raises(NotFound):
        route_target(registry, {}, "m", "9")
