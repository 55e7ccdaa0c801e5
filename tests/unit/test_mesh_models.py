"""Any worker answers ListModels and GetModel for the mesh: its models and the others'."""

from __future__ import annotations

import time

import pytest

from services.core.errors import NotFound
from services.inference.mesh_models import MeshModels, local_models
from services.inference.model_merge import merge
from services.inference.models import ModelRegistry
from services.inference.repository import deterministic_test_model
from services.inference.scheduler import SchedulerLimits
from tokenmesh.inference.v2 import inference_pb2 as pb

READY = pb.ModelVersionState.MODEL_VERSION_STATE_READY
LOADING = pb.ModelVersionState.MODEL_VERSION_STATE_LOADING
FAILED = pb.ModelVersionState.MODEL_VERSION_STATE_FAILED
GENERATIVE = pb.ModelKind.MODEL_KIND_GENERATIVE


def described(
    name: str, *versions: tuple[str, pb.ModelVersionState.ValueType], description: str = ""
) -> pb.Model:
    return pb.Model(
        name=name,
        kind=GENERATIVE,
        description=description,
        versions=[pb.ModelVersion(version=v, state=s, engine="e") for v, s in versions],
    )


def states(model: pb.Model) -> dict[str, int]:
    return {v.version: v.state for v in model.versions}


def test_versions_of_one_model_on_several_workers_are_merged_in_order():
    merged = merge(
        [
            described("m", ("10", READY)),
            described("m", ("2", READY), ("1", READY)),
            described("other", ("1", READY)),
        ]
    )
    assert sorted(merged) == ["m", "other"]
    assert [v.version for v in merged["m"].versions] == ["1", "2", "10"]  # by number
    assert merged["m"].default_version == "10"


def test_a_version_ready_anywhere_is_ready_and_the_default_is_the_newest_ready():
    merged = merge(
        [
            described("m", ("1", FAILED), ("2", LOADING), description="failing"),
            described("m", ("1", READY), description="serving"),
        ]
    )["m"]
    assert states(merged) == {"1": READY, "2": LOADING}
    assert merged.default_version == "1"  # 2 is still loading
    assert merged.description == "serving"  # the description of its default's worker


def test_a_model_that_no_worker_can_serve_yet_defaults_to_its_newest_version():
    merged = merge([described("m", ("1", FAILED)), described("m", ("2", LOADING))])["m"]
    assert merged.default_version == "2"
    assert merge([pb.Model(name="empty")]) == {}  # no versions: nothing serves it


@pytest.fixture
def registry() -> ModelRegistry:
    registry = ModelRegistry()
    for version in ("1", "2"):
        model = deterministic_test_model("local", version, 0.0, SchedulerLimits())
        model.ready = version == "1"  # 2 is loading
        registry.add(model)
    return registry


def test_without_the_router_s_view_a_worker_answers_for_itself(registry):
    models = MeshModels(registry)
    assert models.names() == ["local"]
    assert states(models.describe("local")) == {"1": READY, "2": LOADING}
    with pytest.raises(NotFound) as info:
        models.describe("elsewhere")
    assert info.value.reason == "MODEL_NOT_FOUND"


def test_the_other_workers_models_and_versions_are_listed_with_its_own(registry):
    models = MeshModels(registry)
    models.update([described("elsewhere", ("3", READY)), described("local", ("2", READY))], 60)
    assert models.names() == ["elsewhere", "local"]
    assert states(models.describe("elsewhere")) == {"3": READY}
    # Another worker serves version 2 already: it is READY in the mesh.
    assert states(models.describe("local")) == {"1": READY, "2": READY}
    assert models.describe("local").default_version == "2"


def test_the_default_is_the_version_the_catalogue_routes_unpinned_requests_to(registry):
    models = MeshModels(registry)
    others = [described("local", ("2", READY)), described("elsewhere", ("3", READY))]
    # 2 is READY and newest, but the catalogue's split (or pin) sends requests to 1.
    models.update(others, 60, {"local": "1", "elsewhere": "9"})
    assert models.describe("local").default_version == "1"
    # A routed version no worker describes is not named: the worker's own rule stands.
    assert models.describe("elsewhere").default_version == "3"
    models.update(others, 60, {})
    assert models.describe("local").default_version == "2"


def test_this_worker_s_own_state_wins_over_the_router_s_older_copy_of_it(registry):
    models = MeshModels(registry)
    models.update([described("local", ("1", LOADING))], 60)  # what it said before it was ready
    assert states(models.describe("local"))["1"] == READY


def test_the_others_are_forgotten_when_the_router_stops_refreshing_them(registry, monkeypatch):
    models = MeshModels(registry)
    models.update([described("elsewhere", ("3", READY))], 5)
    later = time.monotonic() + 6
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert models.names() == ["local"]
    with pytest.raises(NotFound):
        models.describe("elsewhere")


def test_a_heartbeat_describes_every_version_in_any_state(registry):
    (model,) = local_models(registry)
    assert (model.name, states(model)) == ("local", {"1": READY, "2": LOADING})
    assert all(v.engine and v.context_length for v in model.versions)
