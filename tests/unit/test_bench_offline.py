"""S1's requests run in-process (bench.offline): the same calls as the streaming client's."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bench import offline, serving
from bench.clients import variant
from services.inference.models import ModelDefaults

REPO = Path(__file__).resolve().parents[2]


def test_each_call_is_the_one_the_streaming_client_sends_then() -> None:
    request = serving.served_request()
    for stream, repeat in [(0, 0), (3, 1), (31, 7), (12, 40)]:
        sent = variant(request, stream, repeat)
        params = offline.call_params(ModelDefaults(top_p=0.95, top_k=50), stream, repeat)
        assert (params.max_tokens, params.seed) == (sent.max_tokens, sent.seed)
        assert params.temperature == pytest.approx(request.temperature)
        # What the request leaves unset comes from the model, as in the worker.
        assert (params.top_p, params.top_k) == (0.95, 50)
    # The calls vary in length and seed, as the client's do.
    assert len({offline.call_params(ModelDefaults(), s, 0).max_tokens for s in range(32)}) > 1


def test_the_worker_s_scheduler_serves_every_caller_within_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENMESH_MODEL_REPOSITORY", str(REPO / "models"))
    monkeypatch.setenv("TOKENMESH_ENGINE", "onnxruntime")
    monkeypatch.setenv("TOKENMESH_ENGINE_THREADS", "1")
    result: dict[str, Any] = asyncio.run(offline.serve(1.0, streams=4))
    assert result["streams"] == result["streams_served"] == 4
    # 1 s of 4 streams: more than one call's worth of tokens, each costing some CPU.
    assert result["tokens"] > serving.served_request().max_tokens
    assert result["tokens_per_s"] > 0 and result["cpu_us_per_token"] > 0
