"""The benchmark reports' statistics helpers."""

from __future__ import annotations

import random

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
