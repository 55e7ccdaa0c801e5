"""The switch between load-aware endpoint weights and equal ones (per edge, or mesh-wide)."""

from __future__ import annotations

from dataclasses import replace

from services.router import catalog as cat
from services.router import snapshot
from services.router.load_weights import NEUTRAL_WEIGHT, WeightState
from services.router.registry import WorkerEntry
from services.router.snapshot import ENDPOINT_TYPE, EdgeFlags

NOW = 1_800_000_000.0


def weights(flags: EdgeFlags, options: snapshot.ClusterOptions) -> list[int]:
    model = cat.add_version(None, "m", "1", 0)
    fast = WorkerEntry("fast", "127.0.0.1", 9001, (("m", "1"),), "serving", NOW + 5)
    slow = replace(fast, worker_id="slow", port=9002, weight=WeightState(weight=20, reason="slow"))
    resources = snapshot.build({"m": model}, [fast, slow], NOW, flags, options)
    assignment = resources.by_type[ENDPOINT_TYPE][snapshot.model_cluster("m", "1")]
    return sorted(
        e.get("load_balancing_weight", 1) for group in assignment["endpoints"]
        for e in group["lb_endpoints"]
    )  # fmt: skip


def test_endpoints_weigh_the_load_unless_the_edge_or_the_router_turns_it_off():
    on, options = EdgeFlags(), snapshot.ClusterOptions()
    assert weights(on, options) == [20, NEUTRAL_WEIGHT]
    assert weights(EdgeFlags(load_aware=False), options) == [NEUTRAL_WEIGHT, NEUTRAL_WEIGHT]
    off = snapshot.ClusterOptions(load_aware=False)
    assert weights(on, off) == [NEUTRAL_WEIGHT, NEUTRAL_WEIGHT]
    assert EdgeFlags.from_metadata({"tokenmesh_load_aware": False}).load_aware is False
    assert EdgeFlags.from_metadata({}).load_aware is True
