"""Tenant labels are bounded: past the limit, new tenants count under one label."""

from __future__ import annotations

from services.usage.tenant_metrics import BoundedLabels


def test_labels_past_the_limit_become_other_and_known_ones_stay():
    labels = BoundedLabels(2, other="_other")
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        "_other",
        "a",
        "_other",
        "b",
    ]
