"""A version's gauges go when a real worker unloads it.

The worker runs in this process: its metrics are prometheus_client's default
registry. A gauge child left behind kept exporting the unloaded version's last
value until the process ended: TokenmeshEmbeddingDrift kept firing for a version
gone (or reloaded, until both new windows were full), and the preStop hook, the
queue-depth autoscalers and the dashboards read queue, running and prefix-cache
figures of a version nothing served.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.inference import quality
from services.inference.scheduler import Scheduler
from services.inference.service import InferenceService
from tests import mtls
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_hung_engine import GRACE_S, SLACK_S, _hold_a_running_stream, _key
from tests.integration.test_inference_model_lifecycle import _until
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MINILM = {"model": "all-minilm-l6-v2", "version": "1"}
DEMO_LM = {"model": "demo-lm", "version": "1"}
WINDOW = 256  # quality.DRIFT_WINDOW for these tests: one request of 256 inputs fills one


def _gauges_of(labels: dict[str, str]) -> list[str]:
    """Returns every gauge series this process exports for one model version."""
    return [
        f"{sample.name}{sample.labels}"
        for family in REGISTRY.collect()
        if family.type == "gauge"
        for sample in family.samples
        if sample.labels.get("model") == labels["model"]
        and sample.labels.get("version") == labels["version"]
    ]


def _unload(labels: dict[str, str]) -> v1.UnloadModelRequest:
    return v1.UnloadModelRequest(model=labels["model"], version=labels["version"])


async def test_an_unloaded_embedding_version_exports_no_drift_and_a_reload_starts_afresh(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quality, "DRIFT_WINDOW", WINDOW)
    settings = inference_settings(
        tmp_path, redis_url, models=("all-minilm-l6-v2:1",), test_models=()
    )
    async with await start_inference(settings) as (_, channel):
        stub = rpc.InferenceServiceStub(channel)
        admin = v1_rpc.InferenceAdminServiceStub(channel)

        async def embed(text: str) -> None:
            await stub.Embed(pb.EmbedRequest(model=MINILM["model"], inputs=[text] * WINDOW))

        def drift() -> float | None:
            return REGISTRY.get_sample_value("tokenmesh_embedding_drift", MINILM)

        await embed("the cat sat on the mat")  # the reference window
        await embed("quantum chromodynamics of heavy quarks")  # the traffic changed
        shifted = drift()
        assert shifted is not None and shifted > 0.3  # TokenmeshEmbeddingDrift: > 0.15
        await admin.UnloadModel(_unload(MINILM), metadata=mtls.EDGE_FOR_ADMIN)
        assert _gauges_of(MINILM) == []
        # The runbook's remedy: loaded again, it has a new reference window and no
        # drift until its recent window is full too (not the old version's).
        await admin.LoadModel(
            v1.LoadModelRequest(model=MINILM["model"], version="1"), metadata=mtls.EDGE_FOR_ADMIN
        )
        await embed("quantum chromodynamics of heavy quarks")
        assert drift() is None
        await embed("quantum chromodynamics of heavy quarks")
        assert drift() == pytest.approx(0.0, abs=1e-6)


async def test_an_unloaded_generative_version_exports_no_scheduler_gauges(
    tmp_path: Path, redis_url: str
) -> None:
    settings = inference_settings(tmp_path, redis_url, models=("demo-lm:1",), test_models=())
    async with await start_inference(settings) as (_, channel):
        stub = v1_rpc.InferenceServiceStub(channel)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        prompt = "the prefix cache keeps this prompt's head " * 4
        await stub.Complete(v1.CompleteRequest(model="demo-lm", prompt=prompt, max_tokens=2))

        async def cache_holds_it() -> bool:
            held = REGISTRY.get_sample_value("tokenmesh_prefix_cache_held_tokens", DEMO_LM)
            return bool(held)

        await _until(cache_holds_it, 10)
        assert _gauges_of(DEMO_LM)  # queue, running, KV, prefix cache: exported while loaded
        await admin.UnloadModel(_unload(DEMO_LM), metadata=mtls.EDGE_FOR_ADMIN)
        assert _gauges_of(DEMO_LM) == []


async def test_an_unload_past_a_hung_engine_step_leaves_no_sequence_counted(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scheduler.stop gives up on the held step after STOP_JOIN_S and returns early:
    # the running gauge kept its 1 for good (the preStop hook waited on it).
    monkeypatch.setattr(Scheduler, "STOP_JOIN_S", 1.0)
    labels = {"model": "deterministic-test", "version": "1"}
    settings = inference_settings(tmp_path, redis_url, grace_s=GRACE_S)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        _, gate, stream, _ = await _hold_a_running_stream(service, channel, _key(), monkeypatch)
        try:

            async def counted_running() -> bool:
                return REGISTRY.get_sample_value("tokenmesh_running_sequences", labels) == 1

            await _until(counted_running, 5)
            await admin.UnloadModel(
                _unload(labels), metadata=mtls.EDGE_FOR_ADMIN, timeout=GRACE_S + 1.0 + SLACK_S
            )
            assert _gauges_of(labels) == []
        finally:
            stream.cancel()
            gate.release.set()
