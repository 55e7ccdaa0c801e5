"""The edge scenario's judge (E1k, E3) over interleaved rounds, its order of paths, and
the one definition of the edge's CPU that E3 and P1 share."""

from __future__ import annotations

from typing import Any

from bench import edge, peer
from bench.registry import _edge_judge
from bench.rows import Row

PATHS = ("direct", "edge-jwt", "edge-api-key", "edge-api-key-no-cache", "envoy", "envoy-direct")


def _results(
    cpu: dict[str, list[dict[str, float]]], rounds: list[dict[str, float]]
) -> dict[str, Any]:
    """Edge results whose latency summaries hold each path's p50 over all its calls."""
    overall = {"direct": 1.0, "edge-jwt": 2.0, "edge-api-key": 2.0, "envoy": 1.5}
    return {
        "latency": {
            name: {"p50_ms": p50} for name, p50 in {**overall, "edge-api-key-no-cache": 5.0}.items()
        },
        "latency_rounds": rounds,
        "cpu_us_per_request": cpu,
        "complete_rps": {"direct": [100.0], "edge-jwt": [95.0]},
    }


def _row(rows: list[Row], row_id: str) -> Row:
    return next(r for r in rows if r.id == row_id)


def _rounds(no_cache_over_jwt: list[float]) -> list[dict[str, float]]:
    return [
        {
            "direct": 1.0,
            "edge-jwt": 2.0,
            "edge-api-key": 2.0,
            "envoy": 1.5,
            "edge-api-key-no-cache": 2.0 * ratio,
        }
        for ratio in no_cache_over_jwt
    ]


def _cpu(rounds: int = 1) -> dict[str, list[dict[str, float]]]:
    edge_round = {
        "envoy": 400.0,
        "auth": 5.0,
        "usage": 3.0,
        "redis-limits": 2.0,
        "inference-0": 450.0,
    }
    return {
        "direct": [{"inference-0": 440.0}] * rounds,
        "edge-jwt": [edge_round] * rounds,
        "edge-api-key": [edge_round] * rounds,
        "envoy": [{"bare-envoy": 200.0, "inference-0": 445.0}] * rounds,
    }


def test_e3_takes_each_process_s_median_over_the_interleaved_rounds() -> None:
    # Five rounds; the third ran while the VM was slow (every figure doubled).
    jwt = [
        {"envoy": e, "auth": 10.0, "usage": u, "redis-limits": r, "inference-0": 450.0}
        for e, u, r in ((400, 10, 20), (420, 0, 10), (900, 20, 40), (380, 10, 10), (410, 10, 20))
    ]
    key = [{**r, "envoy": r["envoy"] + 20} for r in jwt]
    direct = [{"inference-0": w} for w in (440.0, 460.0, 900.0, 430.0, 450.0)]
    bare = [{"bare-envoy": b, "inference-0": 450.0} for b in (200.0, 210.0, 500.0, 190.0, 220.0)]
    cpu = {"direct": direct, "edge-jwt": jwt, "edge-api-key": key, "envoy": bare}
    e3 = _row(_edge_judge(_results(cpu, _rounds([1.5] * 5))), "E3")
    # Envoy's median 410, auth 10, usage 10, rate-limit Redis 20; the edge is the median
    # of the rounds' totals (440, 440, 970, 410, 450): 440.
    assert e3.measured == (
        "440 µs/request (Envoy 410, auth 10, usage 10, rate-limit Redis 20; API key: 460);"
        " ListModels, JWT; median of 5 interleaved rounds"
    )
    assert e3.baseline == "worker 450 µs/request (direct); a bare Envoy proxy 210 µs/request"


def test_e1k_without_the_key_cache_is_the_median_of_the_rounds_ratios_to_jwt() -> None:
    # The no-cache edge over JWT, round by round; its p50 over every call is 5.0 ms
    # against JWT's 2.0 ms (2.5x), which no single round read.
    rounds = _rounds([1.4, 1.6, 3.9, 1.5, 1.5, 4.1])
    e1k = _row(_edge_judge(_results(_cpu(), rounds)), "E1k")
    assert "median of 6 interleaved rounds" in e1k.measured
    assert e1k.measured.endswith("without the edge key cache 1.55x, 5.00 ms)")


def test_e3_and_p1_count_the_same_processes_as_the_edge_s_cpu() -> None:
    per = {"envoy": 400.0, "auth": 5.0, "usage": 3.0, "redis-limits": 7.0, "inference-0": 450.0}
    p1 = peer._gateway_cpu({"tokenmesh": {"cpu_us_per_request": per}}, "tokenmesh")
    assert edge.edge_total(per) == p1 == 415.0
    e3 = _row(_edge_judge(_results({k: [per] for k in _cpu()}, _rounds([1.5]))), "E3")
    assert e3.measured.startswith("415 µs/request")


def test_each_path_runs_first_and_at_every_place_once_in_as_many_rounds() -> None:
    orders = [edge.rotated(PATHS, n) for n in range(len(PATHS))]
    for place in range(len(PATHS)):
        assert sorted(order[place] for order in orders) == sorted(PATHS)
    assert all(sorted(order) == sorted(PATHS) for order in orders)
    assert edge.rotated(PATHS, len(PATHS)) == list(PATHS)
