"""The router's catalogue reads (`models:read`) show a key its own models only.

A key restricted to some models listed every catalogue model, with its
versions, aliases, fallback, shadow traffic and prices; the workers'
ListModels and GetModel already hid them. GetCatalogModel of another model
(registered or not) is refused as GetModel refuses it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.launcher.mesh import Mesh
from tests.e2e.conftest import model_limited_key_channel
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

# Catalogue entries of this test's own (no worker serves them; nothing routes there).
SUFFIX = uuid.uuid4().hex[:8]
SHOWN, HIDDEN = f"allow-list-shown-{SUFFIX}", f"allow-list-hidden-{SUFFIX}"
NEVER_REGISTERED = f"allow-list-unknown-{SUFFIX}"


@pytest.fixture(scope="module")
def catalogue(channel: grpc.Channel) -> router_rpc.RouterServiceStub:
    """The catalogue (as the admin key) with SHOWN and HIDDEN registered."""
    stub = router_rpc.RouterServiceStub(channel)
    for model in (SHOWN, HIDDEN):
        stub.RegisterModelVersion(
            router_pb.RegisterModelVersionRequest(model=model, version="1", weight=100),
            timeout=10,
        )
    stub.SetModelAlias(
        router_pb.SetModelAliasRequest(model=HIDDEN, alias="secret-alias", version="1"),
        timeout=10,
    )
    return stub


@pytest.fixture(scope="module")
def restricted(mesh: Mesh, channel: grpc.Channel) -> Iterator[grpc.Channel]:
    """The edge, as a `models:read` key allowed SHOWN only."""
    with model_limited_key_channel(mesh, channel, "one model", [SHOWN]) as edge:
        yield edge


def _refusal(call: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info)
    return call.code(), info.reason


def test_a_restricted_key_lists_only_its_models(
    catalogue: router_rpc.RouterServiceStub, restricted: grpc.Channel
) -> None:
    everything = catalogue.ListCatalogModels(router_pb.ListCatalogModelsRequest(), timeout=10)
    assert {SHOWN, HIDDEN} <= {m.name for m in everything.models}  # the admin sees all
    own = router_rpc.RouterServiceStub(restricted).ListCatalogModels(
        router_pb.ListCatalogModelsRequest(), timeout=10
    )
    assert [m.name for m in own.models] == [SHOWN]
    shown = router_rpc.RouterServiceStub(restricted).GetCatalogModel(
        router_pb.GetCatalogModelRequest(model=SHOWN), timeout=10
    )
    assert [v.version for v in shown.model.versions] == ["1"]


@pytest.mark.parametrize("model", [HIDDEN, NEVER_REGISTERED], ids=["registered", "unknown"])
def test_another_model_is_refused_as_get_model_refuses_it(
    catalogue: router_rpc.RouterServiceStub, restricted: grpc.Channel, model: str
) -> None:
    with pytest.raises(grpc.RpcError) as from_router:
        router_rpc.RouterServiceStub(restricted).GetCatalogModel(
            router_pb.GetCatalogModelRequest(model=model), timeout=10
        )
    with pytest.raises(grpc.RpcError) as from_worker:
        v2_rpc.InferenceServiceStub(restricted).GetModel(
            v2_pb.GetModelRequest(model=model), timeout=10
        )
    refusal = _refusal(from_router.value)
    # Registered or not, the same answer: a restricted key learns nothing of others.
    assert refusal == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert refusal == _refusal(from_worker.value)
    assert from_router.value.details() == from_worker.value.details()
