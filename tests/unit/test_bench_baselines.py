"""The benchmark's baselines run at the load of what they are compared with, and a
window whose load generator had no headroom is not judged on (bench/README's method)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import serving
from bench.servers import PACE_KEY, TOKENS_KEY, bare_server, message_sizes
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


def _window(**figures: float) -> dict[str, float]:
    """One load window's summary (serving._load) with quiet defaults."""
    return {
        "requests": 200.0,
        "tokens_per_s": 3000.0,
        "messages_per_s": 1500.0,
        "tokens_per_message": 2.0,
        "ttft_p50_ms": 2.0,
        "ttft_p99_ms": 3.0,
        "worker_cpu_us_per_token": 300.0,
        "worker_cpu_us_per_message": 600.0,
        "worker_cpu_cores": 0.9,
        "redis_cpu_us_per_message": 1.0,
        "client_cpu_us_per_token": 50.0,
        "client_cores": 0.2,
        **figures,
    }


def _served_round(
    served: dict[str, float], bare: dict[str, float], paced: dict[str, float]
) -> dict[str, Any]:
    engine = {"tokens_per_s": 3200.0, "cpu_us_per_token": 290.0}
    return {
        "ceiling": engine,
        "offline": engine,
        "served": served,
        "bare": bare,
        "bare_paced": paced,
    }


def _s3_round(bare: dict[str, float], paced: dict[str, float]) -> dict[str, Any]:
    unbatched = _window(
        messages_per_s=13600.0, tokens_per_message=1.0, worker_cpu_us_per_message=71.0
    )
    return {"bare": bare, "unbatched": unbatched, "bare_paced": paced, "batched": _window()}


def _rows(served_rounds: list[dict[str, Any]], s3_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    results = {
        "s1_s2": serving.served_summary(served_rounds),
        "s3": serving.cpu_summary(s3_rounds),
    }
    return {r.id: r for r in serving.judge(results)}


# The stored run 20261206T041656Z, round 1: the unpaced bare streamer's client at 0.99
# cores read a TTFT p99 (its event loop's backlog) below the worker's.
SERVED = _window(ttft_p99_ms=23.0, client_cores=0.16)
UNPACED = _window(ttft_p99_ms=18.6, client_cores=0.99, messages_per_s=21737.0)
PACED = _window(ttft_p99_ms=2.8, client_cores=0.17)


def test_s2_is_judged_against_the_bare_streamer_at_the_workers_load_not_a_saturated_client():
    rows = _rows([_served_round(SERVED, UNPACED, PACED)], [_s3_round(UNPACED, PACED)])
    s2 = rows["S2"]
    assert s2.passed is False  # 8.2x; unpaced it read 1.24x and passed
    assert s2.measured.startswith("8.21x")
    assert "unpaced, its client at 0.99 cores: 1.24x" in s2.measured
    assert "paced to the worker's 1500 messages/s, 2.0 tokens/message" in s2.baseline
    assert "client cores: served 0.16, bare paced 0.17, unpaced 0.99" in s2.cpu


def test_a_judged_window_whose_client_had_no_headroom_is_not_a_valid_baseline():
    saturated_paced = _window(ttft_p99_ms=20.0, client_cores=0.95)
    rows = _rows(
        [_served_round(SERVED, UNPACED, saturated_paced)], [_s3_round(UNPACED, saturated_paced)]
    )
    for row_id in ("S2", "S3"):  # both ratios are within their targets
        assert rows[row_id].passed is False
        assert "NOT A VALID BASELINE" in rows[row_id].measured
        assert "round 1 bare paced (0.95 cores)" in rows[row_id].measured
    quiet_paced = _window(ttft_p99_ms=20.0)
    quiet = _rows([_served_round(SERVED, UNPACED, quiet_paced)], [_s3_round(UNPACED, quiet_paced)])
    assert quiet["S2"].passed is True


def test_s3_compares_cpu_per_message_at_the_unbatched_workers_message_rate():
    unpaced = _window(messages_per_s=23491.0, worker_cpu_us_per_message=36.3, client_cores=0.99)
    paced = _window(messages_per_s=13500.0, worker_cpu_us_per_message=41.8, client_cores=0.4)
    s3 = _rows([_served_round(SERVED, UNPACED, PACED)], [_s3_round(unpaced, paced)])["S3"]
    assert s3.measured.startswith("1.70x")  # 71 / 41.8, not 71 / 36.3 = 1.96x
    assert "vs the bare streamer unpaced: 1.96x" in s3.measured
    assert s3.baseline == (
        "bare grpc.aio paced to the worker's 13600 messages/s: 42 µs/message"
        " (reached 13500; unpaced 36 µs/message at 23491)"
    )
    assert "bare paced 0.40, unpaced 0.99" in s3.cpu


def test_the_paced_baseline_gets_the_windows_messages_per_stream_and_tokens_per_message():
    metadata = dict(serving._paced(_window(messages_per_s=1600.0, tokens_per_message=1.96)))
    assert metadata == {PACE_KEY: "20000", TOKENS_KEY: "1.960"}  # 32 streams / 1600 messages/s


def test_message_sizes_average_a_fractional_tokens_per_message():
    assert message_sizes(5, 1.0) == [1, 1, 1, 1, 1]
    assert message_sizes(64, 2.0) == [2] * 32
    sizes = message_sizes(64, 1.5)
    assert sum(sizes) == 64 and set(sizes) == {1, 2} and len(sizes) == 43
    assert message_sizes(3, 0.2) == [1, 1, 1]  # never an empty message


@pytest.fixture
def bare(tmp_path: Path):
    with bare_server(tmp_path, None) as peer:
        yield peer


def test_the_bare_streamer_sends_the_tokens_a_message_the_call_asks_for(bare) -> None:
    request = pb.GenerateRequest(max_tokens=64)
    with bare.channel() as channel:
        stub = rpc.InferenceServiceStub(channel)
        replies = list(stub.Generate(request, timeout=30, metadata=((TOKENS_KEY, "2"),)))
        default = list(stub.Generate(request, timeout=30))
    assert [len(r.token_ids) for r in replies] == [2] * 32
    assert len(default) == 64
