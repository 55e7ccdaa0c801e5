"""LoadModel never reaches outside the model repository (a real in-process worker)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests import audit
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

#: What the edge sends for a caller with the admin scope.
ADMIN = (("x-tokenmesh-scopes", "admin"),)
#: A card that would load (if anything read it) and fail only for want of weights.
PLANTED_CARD = {"kind": "generative", "context_length": 8, "description": "planted"}


@pytest.fixture
async def admin_and_root(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[rpc.InferenceAdminServiceStub, Path]]:
    """A worker whose model repository is `<tmp>/a/models`; yields (admin stub, tmp)."""
    repository = tmp_path / "a" / "models"
    repository.mkdir(parents=True)
    settings = inference_settings(tmp_path, redis_url, model_repository=repository)
    async with await start_inference(settings) as (_, channel):
        yield rpc.InferenceAdminServiceStub(channel), tmp_path


def _plant(directory: Path) -> Path:
    """Writes a config.json in `directory/1/` (outside the repository); returns it."""
    card = directory / "1" / "config.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps(PLANTED_CARD))
    return card


async def _bad_request(call: Any) -> error_details_pb2.BadRequest:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = await rpc_status.aio.from_call(call)
    assert status is not None, "the error carries no google.rpc.Status"
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    bad_request = error_details_pb2.BadRequest()
    detail.Unpack(bad_request)
    return bad_request


HOSTILE = ["../../tmp/evil", "../../evil", "a/b", "x\x00", "..", ".", "demo\n", "/etc"]


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_a_hostile_model_name_is_invalid_and_names_the_field(admin_and_root, hostile):
    admin, root = admin_and_root
    _plant(root / "evil")  # what "../../evil" reaches from <tmp>/a/models
    call = admin.LoadModel(pb.LoadModelRequest(model=hostile, version="1"), metadata=ADMIN)
    bad_request = await _bad_request(call)
    assert [v.field for v in bad_request.field_violations] == ["model"]
    assert "A-Za-z0-9" in bad_request.field_violations[0].description


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_a_hostile_version_is_invalid_and_names_the_field(admin_and_root, hostile):
    admin, root = admin_and_root
    _plant(root / "evil")
    call = admin.LoadModel(pb.LoadModelRequest(model="demo-lm", version=hostile), metadata=ADMIN)
    bad_request = await _bad_request(call)
    assert [v.field for v in bad_request.field_violations] == ["version"]


async def test_unload_checks_names_too(admin_and_root):
    admin, _ = admin_and_root
    call = admin.UnloadModel(pb.UnloadModelRequest(model="..", version="1"), metadata=ADMIN)
    bad_request = await _bad_request(call)
    assert [v.field for v in bad_request.field_violations] == ["model"]


async def test_a_traversal_never_opens_the_planted_file(admin_and_root):
    admin, root = admin_and_root
    _plant(root / "evil")
    with audit.opened_under(root / "evil") as opened:
        for model, version in [("../../evil", "1"), ("demo-lm", "../../../evil/1")]:
            request = pb.LoadModelRequest(model=model, version=version)
            await _bad_request(admin.LoadModel(request, metadata=ADMIN))
    assert opened == []


async def test_a_symlink_out_of_the_repository_is_refused_before_reading(admin_and_root):
    """Defence in depth: a well-formed name whose directory resolves outside the root."""
    admin, root = admin_and_root
    _plant(root / "evil")
    (root / "a" / "models" / "linked").symlink_to(root / "evil", target_is_directory=True)
    call = admin.LoadModel(pb.LoadModelRequest(model="linked", version="1"), metadata=ADMIN)
    with audit.opened_under(root / "evil") as opened:
        bad_request = await _bad_request(call)
    assert opened == []
    assert {v.field for v in bad_request.field_violations} == {"model", "version"}
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    assert info.reason == "MODEL_OUTSIDE_REPOSITORY"
