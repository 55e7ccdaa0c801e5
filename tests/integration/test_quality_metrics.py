"""Quality and drift metrics move when a real worker serves (services.inference.quality).

The worker runs in this process: its metrics are prometheus_client's default
registry, read here before and after each call.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.inference import quality
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

TEST_LM = {"model": "deterministic-test", "version": "2"}
MINILM = {"model": "all-minilm-l6-v2", "version": "1"}


def _value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _snapshot(labels: dict[str, str]) -> dict[str, float]:
    return {
        "tokens_count": _value("tokenmesh_choice_output_tokens_count", labels),
        "tokens_sum": _value("tokenmesh_choice_output_tokens_sum", labels),
        "logprob_count": _value("tokenmesh_choice_mean_neg_logprob_count", labels),
        "logprob_sum": _value("tokenmesh_choice_mean_neg_logprob_sum", labels),
        "confidence_count": _value("tokenmesh_choice_confidence_count", labels),
        "length": _value("tokenmesh_choices_total", {**labels, "finish_reason": "length"}),
    }


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


async def test_v2_choices_observe_length_logprob_confidence_and_finish_reason(inference_channel):
    stub = rpc.InferenceServiceStub(inference_channel)
    before = _snapshot(TEST_LM)
    request = pb.GenerateRequest(
        model="deterministic-test",
        prompt="quality signals",
        n=2,
        max_output_tokens=5,
        sampling=resources.SamplingParams(seed=11),
    )
    finals = [m async for m in stub.Generate(request) if m.HasField("finish_reason")]
    moved = _moved(before, _snapshot(TEST_LM))
    assert moved["tokens_count"] == 2 and moved["tokens_sum"] == 10
    assert moved["length"] == 2
    assert moved["logprob_count"] == 2 and moved["confidence_count"] == 2
    # The histogram saw exactly the mean log-probabilities the caller was told.
    assert moved["logprob_sum"] == pytest.approx(-sum(m.mean_logprob for m in finals))
    assert moved["logprob_sum"] > 0


async def test_v1_choices_observe_length_but_compute_no_logprob_for_it(inference_channel):
    stub = v1_rpc.InferenceServiceStub(inference_channel)
    before = _snapshot(TEST_LM)
    await stub.Complete(v1.CompleteRequest(model="deterministic-test", prompt="v1", max_tokens=3))
    moved = _moved(before, _snapshot(TEST_LM))
    assert moved["tokens_count"] == 1 and moved["tokens_sum"] == 3 and moved["length"] == 1
    assert moved["logprob_count"] == 0 and moved["confidence_count"] == 0


async def test_embedding_norms_and_drift_against_the_reference_window(model_server, monkeypatch):
    # Windows of 256 vectors: one request of 256 inputs fills one.
    monkeypatch.setattr(quality, "DRIFT_WINDOW", 256)
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    norms_before = _value("tokenmesh_embedding_norm_count", MINILM)
    unit_before = _value("tokenmesh_embedding_norm_bucket", {**MINILM, "le": "1.001"})
    short_before = _value("tokenmesh_embedding_norm_bucket", {**MINILM, "le": "0.999"})

    async def embed(text: str) -> None:
        await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", inputs=[text] * 256))

    def drift() -> float | None:
        return REGISTRY.get_sample_value("tokenmesh_embedding_drift", MINILM)

    await embed("the cat sat on the mat")  # the reference window
    await embed("the cat sat on the mat")  # a recent window just like it
    assert drift() == pytest.approx(0.0, abs=1e-6)
    await embed("quantum chromodynamics of heavy quarks")  # the traffic changed
    shifted = drift()
    assert shifted is not None and shifted > 0.3
    assert REGISTRY.get_sample_value(
        "tokenmesh_embedding_recent_mean_norm", MINILM
    ) == pytest.approx(1.0, abs=1e-3)
    assert _value("tokenmesh_embedding_norm_count", MINILM) - norms_before == 768
    # Unit vectors: every norm fell in the bucket around 1 (<= 1.001, > 0.999).
    unit_after = _value("tokenmesh_embedding_norm_bucket", {**MINILM, "le": "1.001"})
    assert unit_after - unit_before == 768
    assert _value("tokenmesh_embedding_norm_bucket", {**MINILM, "le": "0.999"}) == short_before
