"""Prefix pins and the edge's bounded load: a head too hot for one worker is not pinned,
so the hash (Maglev, hash_balance_factor) spills it over instead of one worker taking it."""

from __future__ import annotations

from dataclasses import replace

from services.router import catalog as cat
from services.router import prefix_pins, snapshot
from services.router.load_weights import WeightState
from services.router.prefix_pins import Holder
from services.router.registry import HotPrefix, VersionCounts, WorkerEntry

NOW = 1_800_000_000.0
HOT = "ab" * 8  # one shared system prompt: most of the version's requests
SMALL = [f"{i:02x}" * 4 for i in range(6)]
A, B = "10.0.0.1:5000", "10.0.0.2:5000"


def test_a_head_past_the_bounded_share_of_equal_workers_is_left_to_the_hash():
    # 400 of 418 units of heat: pinned whole, one worker took it all (bound: 1.5 x 209).
    a = Holder(A, 100, {HOT: (400.0, 0.0)} | {h: (3.0, 0.1) for h in SMALL})
    b = Holder(B, 100, {HOT: (1.0, 2.0)})
    pins = prefix_pins.pins([a, b])
    assert HOT not in pins
    assert set(pins) == set(SMALL)  # the others are still pinned, and balanced
    assert set(pins.values()) == {A, B}
    # Pinned last time: let go all the same (it is the hash's now).
    assert HOT not in prefix_pins.pins([a, b], {HOT: A})
    # One worker: no pins, as before.
    assert prefix_pins.pins([a]) == {}


def test_a_head_within_the_bound_is_pinned():
    # 70% of the heat over two equal workers: within 1.5 x the even share (75%).
    a = Holder(A, 100, {HOT: (70.0, 0.0)})
    b = Holder(B, 100, {h: (5.0, 0.1) for h in SMALL})
    pins = prefix_pins.pins([a, b])
    assert pins[HOT] == A and all(pins[h] == B for h in SMALL)


def test_a_head_past_an_even_splits_bound_is_not_pinned_whatever_the_weights():
    # Next to a worker at the floor weight, the other's bound at the edge is 1.5 x 100/105
    # of everything: the hot head fitted there, and moved there whole; then back when
    # that worker slowed in turn (a cache miss each time, all of it on one worker).
    heat = {HOT: (400.0, 0.0)} | {h: (3.0, 0.1) for h in SMALL}
    assert HOT not in prefix_pins.pins([Holder(A, 5, heat), Holder(B, 100, {HOT: (1.0, 2.0)})])
    assert HOT not in prefix_pins.pins([Holder(A, 100, heat), Holder(B, 5, {HOT: (1.0, 2.0)})])


def test_a_head_the_balance_leaves_past_its_workers_bound_is_not_pinned():
    # Pinned to a light worker last time, and the split within noise at these counts, the
    # balance keeps it there: 3 of 9 units of heat on a worker of weight 20 of 120, past
    # its bound of 2.25.
    a = Holder(A, 20, {HOT: (3.0, 0.1)})
    b = Holder(B, 100, {h: (3.0, 0.1) for h in SMALL[:2]})
    pins = prefix_pins.pins([a, b], {HOT: A} | dict.fromkeys(SMALL[:2], B))
    assert pins == dict.fromkeys(SMALL[:2], B)


def test_the_pins_use_the_bound_the_edge_clusters_are_given():
    assert prefix_pins.HASH_BALANCE_FACTOR == snapshot.HASH_BALANCE_FACTOR
    cluster = snapshot.eds_cluster(
        "model:m:1", "m", snapshot.ClusterOptions(), snapshot.EdgeFlags(), hashed=True
    )
    balance = cluster["common_lb_config"]["consistent_hashing_lb_config"]
    assert balance == {"hash_balance_factor": prefix_pins.HASH_BALANCE_FACTOR}


def _worker(name: str, port: int, heads: dict[str, float]) -> WorkerEntry:
    counts = VersionCounts(
        "m", "1", hot_prefixes=tuple(HotPrefix(h, n, NOW - 0.2) for h, n in heads.items())
    )
    entry = WorkerEntry(name, "127.0.0.1", port, (("m", "1"),), "serving", NOW + 5)
    return replace(entry, outcomes=(counts,), weight=WeightState(weight=100))


def test_the_edge_routes_do_not_pin_a_head_past_the_bound():
    model = cat.add_version(None, "m", "1", 0)
    workers = [
        _worker("w1", 1001, {HOT: 400.0} | dict.fromkeys(SMALL, 3.0)),
        _worker("w2", 1002, {HOT: 1.0}),
    ]
    resources = snapshot.build(
        {"m": model}, workers, NOW, snapshot.EdgeFlags(), snapshot.ClusterOptions()
    )
    pins = resources.pins[("m", "1")]
    assert HOT not in pins and set(pins) == set(SMALL)


def test_a_workers_pinned_heads_together_stay_within_its_bound():
    # A shared prompt at 70% of the heat fits a's bound (75%) alone; the three small
    # heads a full cache kept beside it (b's would overflow: 2048 tokens, heads of
    # 440) took a to 83% of the heat, all of it past the bounded-load hash.
    heads = [f"h{i}" for i in range(8)]
    heat = [16.3] + [1.0] * 7
    tokens = {"head_tokens": dict.fromkeys(heads, 440), "cache_tokens": 2048}
    a = Holder(
        A, 100, {h: (heat[i] * 10, 100.0) for i, h in enumerate(heads) if i % 2 == 0}, **tokens
    )
    b = Holder(B, 100, {h: (heat[i] * 10, 100.0) for i, h in enumerate(heads) if i % 2}, **tokens)
    pins = prefix_pins.pins([a, b])
    total = sum(heat) * 10
    for worker in (A, B):
        share = sum(heat[heads.index(h)] * 10 for h, w in pins.items() if w == worker) / total
        assert share <= prefix_pins.HASH_BALANCE_FACTOR / 100 / 2, (worker, share, pins)
    assert pins["h0"] == A  # the hot head is still pinned, where its cache is
