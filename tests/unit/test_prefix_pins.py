"""Prefix pins: workers' hot prompt heads, balanced into one worker each, carried to the edge."""

from __future__ import annotations

import collections
import itertools
import random
import time
from dataclasses import replace

from envoy.config.route.v3 import route_pb2

from gateway.model_routing import SPREAD_KEY
from services.inference.load_report import (
    HOT_MIN_REQUESTS,
    HOT_PREFIXES,
    PREFIX_HALF_LIFE_S,
    PREFIX_IDLE_S,
    PREFIX_MAX_SCOPES,
    PREFIX_MAX_TRACKED,
    PREFIX_SCOPE_WINDOW_S,
    HotHead,
    PrefixHeat,
)
from services.router import catalog as cat
from services.router import prefix_pins, snapshot
from services.router.load_weights import ClusterWeight, LoadReport, WeightState
from services.router.prefix_pins import Holder
from services.router.registry import HotPrefix, VersionCounts, WorkerEntry
from services.router.servicer import load_to_pb, outcomes_from_pb
from services.router.snapshot import ROUTE_TYPE
from services.router.xds import pack

NOW = 1_800_000_000.0
HEADS = [f"{i:02x}" * 8 for i in range(8)]


def split(pins: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for address in pins.values():
        counts[address] = counts.get(address, 0) + 1
    return counts


def test_an_uneven_hash_split_of_equal_heads_is_evened_out():
    # Maglev put 6 of 8 equally busy heads on a and 2 on b.
    a = Holder("10.0.0.1:1", 100, {h: (6.0, 0.1) for h in HEADS[:6]})
    b = Holder("10.0.0.2:1", 100, {h: (6.0, 0.1) for h in HEADS[6:]})
    pins = prefix_pins.pins([a, b])
    assert split(pins) == {"10.0.0.1:1": 4, "10.0.0.2:1": 4}
    # Only a's heads moved: b keeps what its cache holds.
    assert all(pins[h] == "10.0.0.2:1" for h in HEADS[6:])


def test_an_even_split_is_left_alone_whatever_the_noise():
    a = Holder(
        "10.0.0.1:1", 100, {h: (n, 0.1) for h, n in zip(HEADS[:4], (7, 6.5, 6.5, 6), strict=True)}
    )
    b = Holder(
        "10.0.0.2:1", 100, {h: (n, 0.1) for h, n in zip(HEADS[4:], (5.5, 5.5, 5, 6), strict=True)}
    )
    pins = prefix_pins.pins([a, b])
    assert pins == {h: "10.0.0.1:1" for h in HEADS[:4]} | {h: "10.0.0.2:1" for h in HEADS[4:]}


def test_pinned_heads_stay_while_the_split_is_within_the_counts_noise():
    # 8 equally busy heads (~18 decayed requests each, as in bench K1), pinned 4/4
    # by the last assignment: this build's counts read 85 against 62, 1.16x the
    # even share, a difference of ~2.7 standard deviations of such counts. Moving
    # a head would cost it a cache miss, and the next build's noise moves it back.
    a = Holder(
        "10.0.0.1:1", 100, {h: (n, 0.1) for h, n in zip(HEADS[:4], (24, 22, 20, 19), strict=True)}
    )
    b = Holder(
        "10.0.0.2:1", 100, {h: (n, 0.1) for h, n in zip(HEADS[4:], (17, 16, 15, 14), strict=True)}
    )
    last = {h: "10.0.0.1:1" for h in HEADS[:4]} | {h: "10.0.0.2:1" for h in HEADS[4:]}
    assert prefix_pins.pins([a, b], last) == last


def test_pinned_heads_move_when_the_split_is_beyond_noise():
    # The same heads, pinned 5/3: 90 against 54 is beyond noise, and one head moves.
    a = Holder("10.0.0.1:1", 100, {h: (18.0, 0.1) for h in HEADS[:5]})
    b = Holder("10.0.0.2:1", 100, {h: (18.0, 0.1) for h in HEADS[5:]})
    last = {h: "10.0.0.1:1" for h in HEADS[:5]} | {h: "10.0.0.2:1" for h in HEADS[5:]}
    pins = prefix_pins.pins([a, b], last)
    assert split(pins) == {"10.0.0.1:1": 4, "10.0.0.2:1": 4}
    assert all(pins[h] == "10.0.0.2:1" for h in HEADS[5:])


def _cached(address: str, heat: dict[str, float], cache: int, tokens: int = 440) -> Holder:
    """A worker whose prefix cache holds `cache` tokens, each head's prompt `tokens` long."""
    return Holder(
        address, 100, {h: (n, 0.1) for h, n in heat.items()}, dict.fromkeys(heat, tokens), cache
    )


def test_a_split_within_noise_that_overflows_a_prefix_cache_is_fitted():
    # K1 at a paced load: 8 equal heads at ~8 decayed requests, pinned 5/3. 40
    # against 24 is within the noise bound, so the balance alone keeps it; but 5
    # prompts of 440 tokens overflow a 2048-token cache that 4 fit in, and that
    # worker's cache evicts its own heads in turn (every eviction a full prefill).
    a = _cached("10.0.0.1:1", dict.fromkeys(HEADS[:5], 8.0), 2048)
    b = _cached("10.0.0.2:1", dict.fromkeys(HEADS[5:], 8.0), 2048)
    last = {h: "10.0.0.1:1" for h in HEADS[:5]} | {h: "10.0.0.2:1" for h in HEADS[5:]}
    without_caches = [replace(a, cache_tokens=0), replace(b, cache_tokens=0)]
    assert prefix_pins.pins(without_caches, last) == last  # within noise: kept
    pins = prefix_pins.pins([a, b], last)
    assert split(pins) == {"10.0.0.1:1": 4, "10.0.0.2:1": 4}
    assert all(pins[h] == "10.0.0.2:1" for h in HEADS[5:])  # only a's moved


def test_the_balance_never_moves_a_head_into_a_cache_it_would_overflow():
    # a is busier by heat (one hot head), but b's cache holds its 4 heads and no more:
    # moving a head there would trade a's queue for b's misses.
    a = _cached("10.0.0.1:1", {HEADS[0]: 60.0, HEADS[1]: 20.0, HEADS[2]: 20.0}, 2048)
    b = _cached("10.0.0.2:1", dict.fromkeys(HEADS[3:7], 10.0), 2048)
    pins = prefix_pins.pins([a, b])
    assert split(pins) == {"10.0.0.1:1": 3, "10.0.0.2:1": 4}
    # With room in b's cache the balance moves one as before.
    roomy = [a, replace(b, cache_tokens=4096)]
    assert split(prefix_pins.pins(roomy)) == {"10.0.0.1:1": 2, "10.0.0.2:1": 5}


def test_heads_at_a_caches_boundary_do_not_move_back_and_forth(monkeypatch):
    # 4 heads of ~515 tokens over a 2048-token cache, 2 on the other worker: one
    # moves there. Their requests' lengths vary by a few tokens: at the next build
    # the 4 would just fit (2040), and b is busier by heat beyond noise. Moving the
    # head back would fill all but 8 tokens of a's cache (its prompts' own tails
    # would overflow it), and the build after would move it out again: it stays.
    sizes = {HEADS[0]: 520, HEADS[1]: 515, HEADS[2]: 515, HEADS[3]: 510}
    a = replace(_cached("10.0.0.1:1", dict.fromkeys(HEADS[:4], 24.0), 2048), head_tokens=sizes)
    b = _cached("10.0.0.2:1", dict.fromkeys(HEADS[4:6], 40.0), 2048, tokens=500)
    first = prefix_pins.pins([a, b])
    assert split(first) == {"10.0.0.1:1": 3, "10.0.0.2:1": 3}
    moved = next(h for h in HEADS[:4] if first[h] == "10.0.0.2:1")
    shorter = dict.fromkeys(HEADS[:4], 510)
    a2 = replace(
        a,
        heat={h: (24.0, 0.1) for h in HEADS[:4] if h != moved},
        head_tokens={h: n for h, n in shorter.items() if h != moved},
    )
    b2 = replace(
        b,
        heat={**b.heat, moved: (24.0, 0.1)},
        head_tokens={**b.head_tokens, moved: shorter[moved]},
    )
    assert prefix_pins.pins([a2, b2], first) == first
    monkeypatch.setattr(prefix_pins, "FIT_SHARE", 1.0)  # without the margin it moves back
    assert prefix_pins.pins([a2, b2], first)[moved] == "10.0.0.1:1"


def test_when_no_cache_has_room_the_heat_balance_goes_on():
    # 12 heads, caches of 4 each: neither can hold its share, so fitting moves
    # nothing and heads still balance by heat (a full cache gains nothing by refusing).
    a = _cached("10.0.0.1:1", dict.fromkeys(HEADS[:8], 6.0) | {"aa" * 8: 6.0}, 1800)
    b = _cached("10.0.0.2:1", {f"{i:02x}" * 8: 6.0 for i in range(0xB0, 0xB3)}, 1800)
    assert sorted(split(prefix_pins.pins([a, b])).values()) == [6, 6]


def test_heads_of_unknown_size_and_workers_without_a_cache_are_not_fitted():
    a = _cached("10.0.0.1:1", dict.fromkeys(HEADS[:5], 8.0), 2048, tokens=0)
    b = _cached("10.0.0.2:1", dict.fromkeys(HEADS[5:], 8.0), 0)
    last = {h: "10.0.0.1:1" for h in HEADS[:5]} | {h: "10.0.0.2:1" for h in HEADS[5:]}
    assert prefix_pins.pins([a, b], last) == last
    assert prefix_pins.pins([replace(a, head_tokens=b.head_tokens), b], last) == last


def _reporting(
    pins: dict[str, str], heads: dict[str, tuple[float, int]], cache: int
) -> list[Holder]:
    """Two workers whose heat follows `pins` (head -> (requests, prompt tokens))."""
    return [
        Holder(
            address,
            100,
            {h: (n, 0.1) for h, (n, _) in heads.items() if pins[h] == address},
            {h: tokens for h, (_, tokens) in heads.items() if pins[h] == address},
            cache,
        )
        for address in ("10.0.0.1:1", "10.0.0.2:1")
    ]


def test_the_balance_moves_no_head_into_a_cache_that_overflows_already():
    # a's two heads overflow its cache (1200 of 1000) and fit nowhere else; b is
    # busier by heat, but its heads fit its own cache: moving one to a only adds misses.
    heads = {
        HEADS[0]: (1.0, 600),
        HEADS[1]: (1.0, 600),
        HEADS[2]: (30.0, 700),
        HEADS[3]: (30.0, 50),
    }
    last = {h: "10.0.0.1:1" for h in HEADS[:2]} | {h: "10.0.0.2:1" for h in HEADS[2:4]}
    pins = prefix_pins.pins(_reporting(last, heads, 1000))
    assert all(pins[h] == last[h] for h in pins)  # nothing moved
    # b's two heads, 60 of the 62 units of heat, are past its bounded-load share
    # together (1.5 x 31): the colder one is left to the hash (prefix_pins._Bounds).
    assert pins == {h: last[h] for h in [*HEADS[:2], min(HEADS[2:4])]}


def test_fitting_goes_on_with_the_next_worker_when_the_fullest_cannot_be_fitted():
    # a overflows most, by heads too big for the room anywhere; b overflows by one
    # 600-token head, which fits in c.
    a = Holder(
        "10.0.0.1:1", 100, dict.fromkeys(HEADS[:2], (5.0, 0.1)), dict.fromkeys(HEADS[:2], 800), 1000
    )
    b = Holder(
        "10.0.0.2:1",
        100,
        dict.fromkeys(HEADS[2:4], (5.0, 0.1)),
        dict.fromkeys(HEADS[2:4], 600),
        1000,
    )
    c = Holder("10.0.0.3:1", 100, {HEADS[4]: (5.0, 0.1)}, {HEADS[4]: 200}, 1000)
    last = {h: "10.0.0.1:1" for h in HEADS[:2]} | {h: "10.0.0.2:1" for h in HEADS[2:4]}
    pins = prefix_pins.pins([a, b, c], last | {HEADS[4]: "10.0.0.3:1"})
    assert [pins[h] for h in HEADS[:4]].count("10.0.0.3:1") == 1
    assert all(pins[h] == "10.0.0.1:1" for h in HEADS[:2])


def test_a_head_bigger_than_every_cache_does_not_swing_the_pins_at_every_build():
    # A 2000-token head fits no 1000-token cache. Counted, it kept its worker
    # overflowing for good: the fit moved the small heads off it, the balance moved
    # the big one after them, and the next build swapped everything back.
    heads = {
        HEADS[0]: (40.0, 300),
        HEADS[1]: (5.0, 100),
        HEADS[2]: (5.0, 2000),
        HEADS[3]: (10.0, 100),
    }
    pins = {HEADS[0]: "10.0.0.1:1"} | {h: "10.0.0.2:1" for h in HEADS[1:4]}
    builds = []
    for _ in range(4):
        pins = prefix_pins.pins(_reporting(pins, heads, 1000), pins)
        builds.append(pins)
    assert builds[1] == builds[2] == builds[3]


def test_a_head_starts_where_its_requests_go_now_else_where_most_went():
    # HEADS[0] and HEADS[1]: both workers see them now (the hash spilled): most wins.
    # HEADS[2] was moved to b a moment ago: a still holds more of its heat, but its
    # requests arrive at b now, so it stays there. (HEADS[3] evens the loads out.)
    a = {HEADS[0]: (9.0, 0.2), HEADS[1]: (1.0, 0.1), HEADS[2]: (9.0, 2.5), HEADS[3]: (12.0, 0.1)}
    b = {HEADS[0]: (1.0, 0.1), HEADS[1]: (9.0, 0.3), HEADS[2]: (3.0, 0.1)}
    pins = prefix_pins.pins([Holder("10.0.0.1:1", 100, a), Holder("10.0.0.2:1", 100, b)])
    assert pins == {
        HEADS[0]: "10.0.0.1:1",
        HEADS[1]: "10.0.0.2:1",
        HEADS[2]: "10.0.0.2:1",
        HEADS[3]: "10.0.0.1:1",
    }


def test_a_pin_holds_while_its_worker_serves_whatever_its_old_worker_still_reports():
    # HEADS[0] was just moved from a to b: a still reports more of its heat, and
    # reports it as recent. Starting from the reports alone would put it back on a.
    a = {HEADS[0]: (9.0, 0.3), HEADS[1]: (14.0, 0.1)}
    b = {HEADS[0]: (2.0, 0.1), HEADS[2]: (5.0, 0.1)}
    holders = [Holder("10.0.0.1:1", 100, a), Holder("10.0.0.2:1", 100, b)]
    last = {HEADS[0]: "10.0.0.2:1", HEADS[1]: "10.0.0.1:1", HEADS[2]: "10.0.0.2:1"}
    assert prefix_pins.pins(holders, last) == last
    # A pin to a worker that left starts over.
    moved = prefix_pins.pins(holders, {**last, HEADS[0]: "10.0.0.9:1"})
    assert set(moved.values()) <= {"10.0.0.1:1", "10.0.0.2:1"}


def test_a_lighter_weighted_worker_gets_a_smaller_share():
    heads = {f"{i:02x}": (4.0, 0.1) for i in range(12)}
    slow = Holder("10.0.0.1:1", 50, heads)
    fast = Holder("10.0.0.2:1", 100, {})
    assert split(prefix_pins.pins([slow, fast])) == {"10.0.0.1:1": 4, "10.0.0.2:1": 8}


def test_pins_are_the_same_whatever_order_the_reports_come_in():
    rng = random.Random(7)
    holders = [
        Holder(
            f"10.0.0.{n}:1",
            100,
            {h: (rng.uniform(2, 20), rng.uniform(0, 3)) for h in rng.sample(HEADS, 5)},
        )
        for n in range(1, 4)
    ]
    expected = prefix_pins.pins(holders)
    for _ in range(5):
        rng.shuffle(holders)
        assert prefix_pins.pins(holders) == expected
    assert set(expected) == {head for h in holders for head in h.heat}


def test_no_pins_with_one_worker_and_at_most_max_pins():
    many = {f"{i:04x}": (2.0 + i, 0.1) for i in range(prefix_pins.MAX_PINS + 10)}
    assert prefix_pins.pins([Holder("10.0.0.1:1", 100, many)]) == {}
    pins = prefix_pins.pins([Holder("10.0.0.1:1", 100, many), Holder("10.0.0.2:1", 100, {})])
    assert len(pins) == prefix_pins.MAX_PINS
    assert f"{0:04x}" not in pins  # the coldest are left to the hash


def test_prefix_heat_decays_reports_only_reuse_and_stays_bounded():
    heat = PrefixHeat()
    for tokens in (430, 445, 440, 436):
        heat.observe("aa", tokens, now=100.0)
    heat.observe("bb", now=100.0)  # once: not reuse
    heat.observe("not hex", now=100.0)
    heat.observe("", now=100.0)
    # The latest request's prompt length: about what the head holds in the cache.
    assert heat.hottest(now=100.0) == [HotHead("aa", 4.0, 0.0, 436)]
    later = 100.0 + PREFIX_IDLE_S
    assert heat.hottest(now=later) == [
        HotHead("aa", 4.0 * 0.5 ** (PREFIX_IDLE_S / 5), PREFIX_IDLE_S, 436)
    ]
    assert heat.hottest(now=later + 0.1) == []  # no request since: gone cold
    heat.observe("aa", 450, now=100.0 + PREFIX_HALF_LIFE_S)
    assert heat.hottest(now=100.0 + PREFIX_HALF_LIFE_S) == [HotHead("aa", 3.0, 0.0, 450)]
    for _ in range(3):
        heat.observe("cc", now=120.0)
    assert heat.hottest(now=120.0) == [HotHead("cc", 3.0, 0.0, 0)]  # "aa" decayed below 2
    # A request of unknown length (a cache hit billed 0) keeps the length known.
    heat.observe("cc", 420, now=120.0)
    heat.observe("cc", 0, now=120.0)
    assert heat.hottest(now=120.0) == [HotHead("cc", 5.0, 0.0, 420)]
    assert HOT_MIN_REQUESTS == 2.0
    for i in range(PREFIX_MAX_TRACKED + 1):
        heat.observe(f"{i:06x}", now=200.0)
        heat.observe(f"{i:06x}", now=200.0)
    hottest = heat.hottest(now=200.0)
    assert len(hottest) == HOT_PREFIXES and all(h.requests == 2.0 for h in hottest)
    assert len(heat._heat) <= PREFIX_MAX_TRACKED


def test_a_head_sent_by_several_tenants_reports_a_cache_copy_for_each():
    # The prefix cache holds a prompt once per tenant (scope): reported once, the
    # router fitted 8 tenants' shared system prompt into a cache as if it took a
    # single copy, and the worker evicted what it had been pinned.
    heat = PrefixHeat()
    for tenant in ("t1", "t2", "t3"):
        heat.observe("aa", 400, now=100.0, scope=tenant)
        heat.observe("aa", 400, now=100.0, scope=tenant)
    assert heat.hottest(now=100.0)[0].cached_tokens == 3 * 400
    # One scope for every tenant (a shared model's cache): one copy however many send it.
    heat.observe("bb", 300, now=100.0, scope="")
    heat.observe("bb", 300, now=100.0, scope="")
    assert {h.prefix: h.cached_tokens for h in heat.hottest(now=100.0)}["bb"] == 300
    # A tenant that stopped sending the head stops counting after the window.
    later = 100.0 + PREFIX_SCOPE_WINDOW_S + 1
    heat.observe("aa", 400, now=later, scope="t1")
    heat.observe("aa", 400, now=later, scope="t1")
    assert heat.hottest(now=later)[0].cached_tokens == 400
    # Bounded per head.
    for i in range(PREFIX_MAX_SCOPES + 10):
        heat.observe("aa", 10, now=later, scope=f"s{i}")
    assert heat.hottest(now=later)[0].cached_tokens == 10 * PREFIX_MAX_SCOPES


def test_heartbeat_hot_prefixes_round_trip_and_malformed_ones_are_dropped():
    seen = time.time() - 2
    counts = VersionCounts(
        "m",
        "1",
        5,
        0,
        (1.0,),
        (2, 3),
        hot_prefixes=(
            HotPrefix("aabb", 3.5, seen, 440),
            HotPrefix("NOT-HEX", 9.0, seen, 440),
            # Sizes and counts no worker can have: one would count for every worker.
            HotPrefix("ccdd", 3.5, seen, 1 << 40),
            HotPrefix("eeff", 1e300, seen, 440),
        ),
        prefix_cache_tokens=2048,
        counters_id="run-1",
    )
    load = load_to_pb(LoadReport(), [counts])
    # time.time() may step back a little (CI read 1.99997 s): not the subject here.
    assert 1.99 <= load.versions[0].hot_prefixes[0].idle_seconds < 3
    (parsed,) = outcomes_from_pb(load, received_at=seen + 2)
    ((head, count, seen_again, tokens),) = parsed.hot_prefixes
    assert (head, count, tokens) == ("aabb", 3.5, 440) and abs(seen_again - seen) < 1
    assert parsed.prefix_cache_tokens == 2048
    assert parsed.counters_id == "run-1"  # a rollout tells a worker's restart by it
    # The entry keeps its counters; the heads are stored apart (registry.HEAT_KEY).
    assert VersionCounts.from_json(parsed.to_json()) == replace(parsed, hot_prefixes=())


def _worker(name: str, host: str, port: int, heads: dict[str, float]) -> WorkerEntry:
    counts = VersionCounts(
        "m", "1", hot_prefixes=tuple(HotPrefix(h, n, NOW - 0.2) for h, n in heads.items())
    )
    entry = WorkerEntry(name, host, port, (("m", "1"),), "serving", NOW + 5)
    return replace(entry, outcomes=(counts,))


def test_the_edge_routes_carry_the_pins_and_the_workers_for_the_lua_filter():
    model = cat.add_version(None, "m", "1", 0)
    workers = [
        _worker("w1", "127.0.0.1", 1001, {h: 6.0 for h in HEADS[:6]}),
        _worker("w2", "::1", 1002, {h: 6.0 for h in HEADS[6:]}),
    ]
    resources = snapshot.build(
        {"m": model}, workers, NOW, snapshot.EdgeFlags(), snapshot.ClusterOptions()
    )
    routes = resources.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
    placed = [
        dict(r["metadata"]["filter_metadata"]["envoy.filters.http.lua"])
        for r in routes
        if "metadata" in r
    ]
    assert len(placed) == 3  # the version route, its "latest" alias and the split
    # Unseen heads go to the version's workers in turn (override addresses, sorted).
    assert all(p.pop(SPREAD_KEY) == ["127.0.0.1:1001", "[::1]:1002"] * 4 for p in placed)
    assert all(split(p) == {"127.0.0.1:1001": 4, "[::1]:1002": 4} for p in placed)
    route = route_pb2.RouteConfiguration()  # what Envoy will accept
    assert pack(resources).by_type[ROUTE_TYPE]["edge"].Unpack(route)
    assert any(
        r.metadata.filter_metadata["envoy.filters.http.lua"] for r in route.virtual_hosts[0].routes
    )
    plain = snapshot.build(
        {"m": model},
        workers,
        NOW,
        snapshot.EdgeFlags(),
        snapshot.ClusterOptions(prefix_affinity=False),
    )
    assert not any(
        "metadata" in r for r in plain.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
    )


def test_heads_no_worker_reported_lately_are_not_pinned():
    # Mid-upgrade, routers of an earlier version take some heartbeats and store the
    # heads elsewhere: the last ones stored here stop being refreshed, counts frozen.
    fresh = _worker("w1", "127.0.0.1", 1001, dict.fromkeys(HEADS[:2], 6.0))
    frozen = _worker("w2", "::1", 1002, dict.fromkeys(HEADS[2:4], 6.0))
    stale = replace(
        frozen.outcomes[0],
        hot_prefixes=tuple(replace_seen(h, NOW - 60) for h in frozen.outcomes[0].hot_prefixes),
    )
    pins = snapshot.version_pins("m", "1", [fresh, replace(frozen, outcomes=(stale,))], NOW)
    assert set(pins) == set(HEADS[:2])
    assert set(snapshot.version_pins("m", "1", [fresh, frozen], NOW)) == set(HEADS[:4])


def replace_seen(head: HotPrefix, seen_at: float) -> HotPrefix:
    return head._replace(seen_at=seen_at)


def test_a_version_with_one_worker_lists_no_workers_to_spread_over():
    model = cat.add_version(None, "m", "1", 0)
    workers = [_worker("w1", "127.0.0.1", 1001, {})]
    resources = snapshot.build(
        {"m": model}, workers, NOW, snapshot.EdgeFlags(), snapshot.ClusterOptions()
    )
    routes = resources.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
    assert not any("metadata" in r for r in routes)


def test_unseen_heads_take_turns_by_weight_like_a_weighted_round_robin():
    fast = _worker("fast", "127.0.0.1", 1001, {})
    also_fast = _worker("also", "127.0.0.1", 1003, {})
    a, b = "127.0.0.1:1001", "127.0.0.1:1003"
    assert snapshot.spread_workers([fast, also_fast]) == [a, b, a, b, a, b, a, b]
    # Weights round to SPREAD_TURNS levels (4): 100 and 60 take 4 and 2 turns, spread out.
    slower = replace(also_fast, weight=WeightState(weight=60))
    assert snapshot.spread_workers([fast, slower]) == [a, b, a, a, b, a]
    # A worker the weights hold back takes no turn.
    slow = replace(_worker("slow", "127.0.0.1", 1002, {}), weight=WeightState(weight=5))
    assert "127.0.0.1:1002" not in snapshot.spread_workers([slow, fast, also_fast])
    # Load-aware weights off: no load signal but the hash's bound on active
    # requests, so unseen heads keep the hash.
    assert snapshot.spread_workers([slow, fast, also_fast], weighted=False) == []
    # One worker left with turns: none to take (the hash sends its weighted share).
    model = cat.add_version(None, "m", "1", 0)
    resources = snapshot.build(
        {"m": model}, [fast, slow], NOW, snapshot.EdgeFlags(), snapshot.ClusterOptions()
    )
    routes = resources.by_type[ROUTE_TYPE]["edge"]["virtual_hosts"][0]["routes"]
    assert not any("metadata" in r for r in routes)


def test_smooth_round_robin_spreads_each_names_turns_over_the_cycle():
    assert snapshot.smooth_round_robin({"a": 2, "b": 1}) == ["a", "b", "a"]
    cycle = snapshot.smooth_round_robin({"a": 4, "b": 3, "c": 1})
    assert collections.Counter(cycle) == {"a": 4, "b": 3, "c": 1}
    assert all(x != y for x, y in itertools.pairwise(cycle))  # no name twice in a row
    assert snapshot.smooth_round_robin({}) == []


def test_pins_turns_and_endpoints_use_each_workers_weight_in_that_versions_cluster():
    # w2 also serves another model, where a faster worker holds it at 10: that was its
    # one weight in m's cluster too, and m's pins and turns went nearly all to w1, as
    # fast as w2 in m.
    model = cat.add_version(None, "m", "1", 0)
    w1 = _worker("w1", "127.0.0.1", 1001, dict.fromkeys(HEADS[:4], 6.0))
    w2 = _worker("w2", "127.0.0.1", 1002, dict.fromkeys(HEADS[4:], 6.0))
    w2 = replace(
        w2,
        models=(("m", "1"), ("other", "1")),
        weight=WeightState(200.0, 10, "lowest in other:1"),
        cluster_weights=(
            ClusterWeight("m", "1", WeightState(200.0, 100, "")),
            ClusterWeight("other", "1", WeightState(200.0, 10, "")),
        ),
    )
    resources = snapshot.build(
        {"m": model}, [w1, w2], NOW, snapshot.EdgeFlags(), snapshot.ClusterOptions()
    )
    assert split(dict(resources.pins[("m", "1")])) == {"127.0.0.1:1001": 4, "127.0.0.1:1002": 4}
    a, b = "127.0.0.1:1001", "127.0.0.1:1002"
    assert snapshot.spread_workers([w1, w2], version=("m", "1")) == [a, b] * 4
    endpoints = resources.by_type[snapshot.ENDPOINT_TYPE]
    weights = [
        e["load_balancing_weight"] for e in endpoints["model:m:1"]["endpoints"][0]["lb_endpoints"]
    ]
    assert weights == [100, 100]
    # Its own weight (the lowest of its clusters') where no version is meant.
    assert sorted(
        e["load_balancing_weight"] for e in endpoints["inference"]["endpoints"][0]["lb_endpoints"]
    ) == [10, 100]
