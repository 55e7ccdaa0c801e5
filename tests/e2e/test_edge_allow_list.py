"""A key restricted to some models learns nothing at the edge of the others' state.

The edge routed a restricted key's call by its model before any worker checked
the key's allowed models: a model with no healthy worker answered 503 (no
healthy upstream), a sunset version its route's 404, where a served model, or
one never registered, got the worker's PERMISSION_DENIED (MODEL_NOT_ALLOWED).
The model-routing Lua filter now sends a model the key may not use where an
unknown model goes (any worker), so its state at the edge changes nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.model_routing import MODEL_HEADER
from services.launcher.mesh import Mesh
from tests.e2e.conftest import edge_routes, model_limited_key_channel
from tests.e2e.test_jobs import wait_until
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

SUFFIX = uuid.uuid4().hex[:8]
ALLOWED = "deterministic-test"
NO_WORKER = f"edge-allow-no-worker-{SUFFIX}"  # routed, to a cluster with no worker
SUNSET = f"edge-allow-sunset-{SUFFIX}"  # its only version sunset: a direct 404 route
NEVER_REGISTERED = f"edge-allow-unknown-{SUFFIX}"
SUNSET_IN_S = 2.0


def _routes_of(mesh: Mesh, model: str) -> list[dict[str, Any]]:
    return [
        route
        for route in edge_routes(mesh)
        if any(
            h["name"] == MODEL_HEADER and h.get("string_match", {}).get("exact") == model
            for h in route.get("match", {}).get("headers", [])
        )
    ]


@pytest.fixture(scope="module")
def routed_elsewhere(mesh: Mesh, channel: grpc.Channel) -> None:
    """NO_WORKER and SUNSET registered, and the edge routing them (SUNSET: its 404)."""
    catalogue = router_rpc.RouterServiceStub(channel)
    for model in (NO_WORKER, SUNSET):
        catalogue.RegisterModelVersion(
            router_pb.RegisterModelVersionRequest(model=model, version="1", weight=100),
            timeout=10,
        )
    # A sunset must be in the future when set: this one passes in SUNSET_IN_S.
    sunset = timestamp_pb2.Timestamp(seconds=int(time.time() + SUNSET_IN_S) + 1)
    catalogue.DeprecateModelVersion(
        router_pb.DeprecateModelVersionRequest(model=SUNSET, version="1", sunset_time=sunset),
        timeout=10,
    )
    wait_until(lambda: _routes_of(mesh, NO_WORKER), 15, f"the edge to route {NO_WORKER}")
    wait_until(
        lambda: any("direct_response" in r for r in _routes_of(mesh, SUNSET)),
        30,
        f"the edge's sunset route of {SUNSET}",
    )


@pytest.fixture(scope="module")
def restricted(mesh: Mesh, channel: grpc.Channel) -> Iterator[grpc.Channel]:
    """The edge, as a key allowed ALLOWED only."""
    with model_limited_key_channel(mesh, channel, "one model at the edge", [ALLOWED]) as edge:
        yield edge


def _refusal(channel: grpc.Channel, model: str) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, message with the model's name generic) of a Complete."""
    with pytest.raises(grpc.RpcError) as refused:
        v2_rpc.InferenceServiceStub(channel).Complete(
            v2_pb.CompleteRequest(model=model, prompt="hello"), timeout=10
        )
    call = refused.value
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    reason = ""
    if status is not None and status.details:
        info = error_details_pb2.ErrorInfo()
        if status.details[0].Unpack(info):
            reason = info.reason
    return call.code(), reason, (call.details() or "").replace(model, "MODEL")


def test_another_models_state_at_the_edge_does_not_change_the_refusal(
    routed_elsewhere: None, restricted: grpc.Channel
) -> None:
    unknown = _refusal(restricted, NEVER_REGISTERED)
    # No healthy worker, or its version sunset: the same answer as a model never
    # registered (the old edge answered UNAVAILABLE, then its sunset route's 404).
    assert _refusal(restricted, NO_WORKER) == unknown
    assert _refusal(restricted, SUNSET) == unknown


def test_a_served_model_is_refused_as_an_unknown_one(restricted: grpc.Channel) -> None:
    unknown = _refusal(restricted, NEVER_REGISTERED)
    assert _refusal(restricted, "demo-lm") == unknown  # served by the mesh, not allowed
    assert unknown[:2] == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
