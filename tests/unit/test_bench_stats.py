"""The benchmark reports' statistics helpers and the figures built on them."""

from __future__ import annotations

import random

from bench.registry import _usage_judge
from bench.stats import percentile_ratio_interval


def test_the_interval_holds_the_ratio_and_narrows_with_more_requests() -> None:
    rng = random.Random(1)
    few = (
        [rng.expovariate(1 / 100) for _ in range(140)],
        [rng.expovariate(1 / 100) for _ in range(140)],
    )
    many = (
        [rng.expovariate(1 / 100) for _ in range(5600)],
        [rng.expovariate(1 / 100) for _ in range(5600)],
    )
    low, high = percentile_ratio_interval(*few, 90)
    assert low < 1.0 < high  # the same distribution on both sides
    assert high - low > 0.2  # 140 requests a side: p90's ratio is loose
    narrow_low, narrow_high = percentile_ratio_interval(*many, 90)
    assert narrow_high - narrow_low < (high - low) / 3
    assert percentile_ratio_interval(*few, 90) == (low, high)  # seeded: reads the same twice


def test_a_shifted_side_moves_the_interval_and_no_values_give_zeros() -> None:
    base = [float(n) for n in range(1, 201)]
    low, high = percentile_ratio_interval([2 * v for v in base], base, 90)
    assert 1.8 < low <= 2.0 <= high < 2.2
    assert percentile_ratio_interval([], base, 90) == (0.0, 0.0)


def test_r1_reports_decisions_per_cpu_second_beside_decisions_per_second() -> None:
    def load(rps: float, cpu_us: float) -> dict[str, object]:
        return {"rps": rps, "cpu_us_per_call": cpu_us, "sequential": {"p99_ms": 1.0}}

    results = {
        "echo": load(4000, 270),
        "rate_limit": load(2600, 390),
        "no_leases": load(2000, 500),
    }
    (r1,) = _usage_judge(results)
    assert r1.id == "R1" and not r1.passed  # 65% of the echo's decisions/s
    assert r1.measured.startswith("65%, by CPU 69%")
    assert "leases off, a Redis round trip each: 50%, by CPU 54%" in r1.measured
    assert r1.cpu == "limiter 390, leases off 500, echo 270 µs/call"
