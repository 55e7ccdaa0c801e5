"""Small statistics helpers for benchmark reports."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from bench.clients import StreamRecord


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the q-th percentile (0 for no values)."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def percentile_ratio_interval(
    numerator: Sequence[float],
    denominator: Sequence[float],
    q: float,
    level: float = 0.95,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval of percentile(numerator, q) / percentile(denominator, q).

    Resamples each side's values with replacement (seeded: a report reads the
    same twice). It treats the values as independent draws, so it leaves out
    what moves a whole round (the VM's speed drifting between rounds): a lower
    bound on how far another run could read. (0, 0) without values.
    """
    if not len(numerator) or not len(denominator):
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    top, bottom = np.asarray(numerator, float), np.asarray(denominator, float)
    tops = np.percentile(top[rng.integers(0, len(top), (draws, len(top)))], q, axis=1)
    bottoms = np.percentile(bottom[rng.integers(0, len(bottom), (draws, len(bottom)))], q, axis=1)
    ratios = tops / np.maximum(bottoms, 1e-9)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def median_each(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The median of each key over rounds (a process's CPU per unit of work, say),
    a key missing from a round counting 0; values under 0.5 left out."""
    names = {name for r in rounds for name in r}
    medians = {name: statistics.median(r.get(name, 0.0) for r in rounds) for name in names}
    return {name: value for name, value in sorted(medians.items()) if value >= 0.5}


def summarize_streams(records: Sequence[StreamRecord]) -> dict[str, float]:
    """Returns throughput and latency figures (ms, tokens/s) for stream records."""
    ok = [r for r in records if r.ok]
    if not ok:
        return {"requests": 0, "errors": len(records)}
    wall = max(r.end for r in ok) - min(r.start for r in ok)
    tokens = sum(r.tokens for r in ok)
    messages = sum(r.messages for r in ok)
    # With several streams, each one's first call arrives in the opening burst
    # (all at once): reported apart from the steady state that follows.
    opening = [r.ttft * 1000 for r in ok if r.opening]
    burst = len(opening) > 1
    ttft = [r.ttft * 1000 for r in ok if not (burst and r.opening)]
    gaps = [g * 1000 for r in ok for g in r.gaps]
    return {
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "wall_s": wall,
        "tokens": tokens,
        "messages": messages,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "messages_per_s": messages / wall if wall else 0.0,
        "tokens_per_message": tokens / messages if messages else 0.0,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "opening_ttft_p50_ms": percentile(opening, 50),
        "opening_ttft_p99_ms": percentile(opening, 99),
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
    }
