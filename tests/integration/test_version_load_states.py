"""A version being loaded is described LOADING, one whose load failed FAILED with the
reason (GetModel and the heartbeat's descriptions alike), and neither is served."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import grpc.aio
import pytest

from services.inference.mesh_models import local_models
from tests import mtls
from tests.integration.conftest import MODEL_REPOSITORY, inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

STATE = inference_pb2.ModelVersionState
LOADING, READY, FAILED = (
    STATE.MODEL_VERSION_STATE_LOADING,
    STATE.MODEL_VERSION_STATE_READY,
    STATE.MODEL_VERSION_STATE_FAILED,
)


def _repository(tmp_path: Path) -> Path:
    """A repository with lm/1 (demo-lm's files) and lm/2, whose weights are missing."""
    repo = tmp_path / "repo"
    good, broken = repo / "lm" / "1", repo / "lm" / "2"
    good.mkdir(parents=True)
    broken.mkdir()
    for name in ("config.json", "model.onnx", "tokenizer.json"):
        (good / name).symlink_to(MODEL_REPOSITORY / "demo-lm" / "1" / name)
    card = json.loads((good / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**card, "weights": "."}))
    return repo


def _states(model: inference_pb2.Model) -> dict[str, tuple[int, str]]:
    return {v.version: (v.state, v.message) for v in model.versions}


async def test_a_version_is_loading_then_ready_and_a_failed_load_stays_failed(tmp_path, redis_url):
    settings = inference_settings(
        tmp_path, redis_url, test_models=("t:1",), model_repository=_repository(tmp_path)
    )
    async with await start_inference(settings) as (service, channel):
        lookups = v2_rpc.InferenceServiceStub(channel)
        port = service._running.port
        async with mtls.aio_channel(port, peer="worker", caller="operator") as admin_channel:
            admin = v1_rpc.InferenceAdminServiceStub(admin_channel)
            load = asyncio.ensure_future(
                admin.LoadModel(v1.LoadModelRequest(model="lm", version="1"))
            )
            looked_up, described = set(), set()
            while not load.done():
                heartbeat = {m.name: m for m in local_models(service.registry)}
                if "lm" in heartbeat:
                    described.add(_states(heartbeat["lm"])["1"][0])
                try:
                    answer = await lookups.GetModel(v2.GetModelRequest(model="lm"))
                    looked_up.add(_states(answer.model)["1"][0])
                except grpc.aio.AioRpcError as error:  # before the load began
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                await asyncio.sleep(0.01)
            await load
            assert LOADING in looked_up and LOADING in described
            assert (await lookups.GetModel(v2.GetModelRequest(model="lm"))).model.versions[
                0
            ].state == READY

            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await admin.LoadModel(v1.LoadModelRequest(model="lm", version="2"))
            assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            model = (await lookups.GetModel(v2.GetModelRequest(model="lm"))).model
            state, message = _states(model)["2"]
            assert state == FAILED and "model.onnx" in message
            assert model.default_version == "1"  # the newest READY one, not the failed one
            heartbeat = {m.name: m for m in local_models(service.registry)}
            assert _states(heartbeat["lm"])["2"] == (FAILED, message)

            # Never served: pinned, it is not here; unpinned, the READY version answers.
            generate = v1_rpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as pinned:
                await generate.Generate(
                    v1.GenerateRequest(model="lm", version="2", prompt="p", max_tokens=2)
                ).read()
            assert pinned.value.code() == grpc.StatusCode.NOT_FOUND
            replies = generate.Generate(v1.GenerateRequest(model="lm", prompt="p", max_tokens=2))
            assert [r.model.version async for r in replies][-1] == "1"

            # An unload forgets the failed load.
            await admin.UnloadModel(v1.UnloadModelRequest(model="lm", version="2"))
            model = (await lookups.GetModel(v2.GetModelRequest(model="lm"))).model
            assert set(_states(model)) == {"1"}
