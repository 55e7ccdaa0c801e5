"""Labelled counters that alerts read with increase() exist at 0 before their first event.

Prometheus' increase() needs two samples: a series whose first sample is 1 (a
child created by its first `.labels(...).inc()`) reads as no increase, so a
rare event's alert never fired for it. Checked in a fresh interpreter, where
nothing has counted yet.
"""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

EXPOSE = """
import services.usage.meter  # registers its metrics
from prometheus_client import REGISTRY, generate_latest
print(generate_latest(REGISTRY).decode())
"""


def _fresh_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = subprocess.run(
        [sys.executable, "-c", EXPOSE], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_dead_letter_reason_is_exported_at_zero_from_the_start() -> None:
    samples = _fresh_samples()
    for reason in ("missing_event", "undecodable", "no_request_id"):
        key = ("tokenmesh_usage_dead_letters_total", (("reason", reason),))
        assert samples.get(key) == 0.0, reason
