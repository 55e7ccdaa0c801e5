"""metrics.observe_many records what observing one by one records."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram

from services.inference.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1.0)
# Below, on and between the bounds, and above the last one (+Inf only).
AMOUNTS = [0.0, 0.0005, 0.001, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 30.0]


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name.removeprefix(name), sample.labels.get("le", "")): sample.value
        for metric in registry.collect()
        if metric.name == name
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def test_observe_many_equals_observing_each_amount() -> None:
    registry = CollectorRegistry()
    one_by_one = Histogram("each", "", ["m"], buckets=BUCKETS, registry=registry).labels("x")
    at_once = Histogram("many", "", ["m"], buckets=BUCKETS, registry=registry).labels("x")
    for amount in AMOUNTS:
        one_by_one.observe(amount)
    observe_many(at_once, AMOUNTS[:5])
    observe_many(at_once, AMOUNTS[5:])
    observe_many(at_once, [])
    each, many = _samples(registry, "each"), _samples(registry, "many")
    assert math.isclose(each.pop(("_sum", "")), many.pop(("_sum", "")))
    assert each == many
    assert many[("_bucket", "0.001")] == 4 and many[("_bucket", "+Inf")] == len(AMOUNTS)
