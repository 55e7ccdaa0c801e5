"""Load-aware endpoint weights: the pure function from load reports to EDS weights."""

from __future__ import annotations

import pytest

from services.inference.load_report import TTFT_BOUNDS_MS, VersionOutcomes, percentile
from services.router import load_weights as lw
from services.router.load_weights import LoadReport, WeightState
from services.router.registry import WorkerEntry


def report(ttft_p50_ms: float, queue: int = 0, slots: int = 32, kv: float = 0.0) -> LoadReport:
    return LoadReport(
        queue_depth=queue,
        slots=slots,
        kv_utilization=kv,
        ttft_samples=20,
        ttft_p50_ms=ttft_p50_ms,
        ttft_p99_ms=ttft_p50_ms * 2,
    )


def run(state: WeightState, load: LoadReport | None, others: list[float | None], beats: int):
    weights = []
    for _ in range(beats):
        state = lw.update(state, load, others)
        weights.append(state.weight)
    return state, weights


def test_a_worker_without_a_report_or_recent_requests_keeps_the_neutral_weight():
    assert lw.update(WeightState(), None, [40.0]).weight == lw.NEUTRAL_WEIGHT
    idle = LoadReport(queue_depth=0, slots=32, ttft_samples=0)
    state = lw.update(WeightState(), idle, [40.0])
    assert state.weight == lw.NEUTRAL_WEIGHT and state.cost is None
    assert "no recent requests" in state.reason


def test_a_slow_worker_drops_in_bounded_steps_to_its_share_of_the_best_cost():
    state, weights = run(WeightState(), report(200.0), [40.0], beats=6)
    # 40/200 of the neutral weight, reached no faster than MAX_STEP per heartbeat.
    assert weights[-1] == 20
    steps = [a - b for a, b in zip([lw.NEUTRAL_WEIGHT, *weights], weights, strict=False)]
    assert all(0 <= s <= lw.MAX_STEP for s in steps)
    assert weights[0] == lw.NEUTRAL_WEIGHT - lw.MAX_STEP
    assert "cost 200ms vs best 40ms" in state.reason


def test_the_fastest_worker_and_equal_workers_stay_neutral():
    assert run(WeightState(), report(40.0), [200.0, 45.0], beats=5)[0].weight == 100
    assert run(WeightState(), report(41.0), [40.0], beats=5)[0].weight == 100


def test_fast_workers_a_few_ms_apart_stay_neutral_whatever_the_ratio():
    # Seen in the test mesh: 12 vs 11 ms and 9 vs 5 ms moved weights every heartbeat.
    assert run(WeightState(), report(12.0), [11.0], beats=5)[0].weight == 100
    assert run(WeightState(), report(9.0), [5.0], beats=5)[0].weight == 100
    assert lw.target_weight(14.9, 5.0) == 100
    assert lw.target_weight(15.0, 5.0) == 33  # 10 ms or more: the ratio decides


def test_noise_within_the_deadband_does_not_move_the_weight():
    state = WeightState(cost=100.0, weight=40, reason="")
    # The target wobbles around 40 (38..45): no change at all.
    for ttft in (105.0, 95.0, 100.0, 110.0, 90.0):
        state = lw.update(state, report(ttft), [40.0])
        assert state.weight == 40


def test_costs_are_smoothed_so_one_odd_report_moves_little():
    state = WeightState(cost=40.0, weight=100, reason="")
    spiked = lw.update(state, report(400.0), [40.0])
    assert spiked.cost == lw.EWMA_ALPHA * 400 + (1 - lw.EWMA_ALPHA) * 40
    assert spiked.weight == 100 - lw.MAX_STEP  # bounded, not the target of 18
    _, after = run(spiked, report(40.0), [40.0], beats=8)
    assert after[-1] == 100  # the spike fades from the average, the weight comes back


def test_queue_and_kv_pressure_raise_the_cost():
    assert report(50.0, queue=32, slots=32).cost() == 100.0
    assert report(50.0, kv=1.0).cost() == pytest.approx(100.0)
    assert report(50.0, kv=0.5).cost() == 50.0
    assert lw.target_weight(report(50.0, queue=96).cost(), 50.0) == 25


def test_weights_never_leave_their_bounds():
    state, _ = run(WeightState(), report(100_000.0), [1.0], beats=20)
    assert state.weight == lw.MIN_WEIGHT
    assert lw.stepped(lw.MIN_WEIGHT, 0) == lw.MIN_WEIGHT
    assert lw.stepped(95, 200) == 100


def test_worker_entries_keep_their_load_and_weight_and_read_old_entries():
    entry = WorkerEntry("w", "127.0.0.1", 1, (("m", "1"),), load=report(40.0))
    entry = WorkerEntry(**{**entry.__dict__, "weight": WeightState(40.0, 55, "why")})
    assert WorkerEntry.from_json("w", entry.to_json()) == entry
    old = '{"host": "h", "port": 1, "models": [["m", "1"]], "state": "serving", '
    old += '"lease_expires_at": 1.0}'
    parsed = WorkerEntry.from_json("w", old)
    assert parsed.load is None and parsed.weight == WeightState()


def test_worker_outcomes_count_errors_and_bucket_ttfts_with_a_recent_window():
    outcomes = VersionOutcomes()
    outcomes.observe("stop", 10.0, now=0.0)
    outcomes.observe("error", 0.0, now=0.0)
    outcomes.observe("length", 30.0, now=40.0)
    assert (outcomes.requests, outcomes.errors) == (3, 1)
    assert sum(outcomes.ttft_counts) == 2
    assert len(outcomes.ttft_counts) == len(TTFT_BOUNDS_MS) + 1
    assert outcomes.recent_ttfts(now=45.0) == [30.0]  # the first left the 30 s window
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile(list(map(float, range(1, 101))), 0.99) == 99.0
    assert percentile([], 0.99) == 0.0
    # Each load of a version counts afresh, under a run id of its own (a rollout's
    # gate tells a restart from growth by it).
    assert outcomes.counters_id and VersionOutcomes().counters_id != outcomes.counters_id


def test_a_ttft_that_is_not_a_finite_number_is_no_evidence():
    # inf - inf made NaN, and round(NaN) raised in every heartbeat of the worker.
    for ttft in (float("inf"), float("nan")):
        assert LoadReport(ttft_samples=3, ttft_p50_ms=ttft).cost() is None
        state = lw.update(WeightState(), LoadReport(ttft_samples=3, ttft_p50_ms=ttft), [])
        assert state == lw.update(WeightState(), LoadReport(), [])
    assert LoadReport(ttft_samples=3, ttft_p50_ms=1e300, queue_depth=1 << 30).cost() is None
    assert lw.target_weight(float("inf"), float("inf")) == lw.NEUTRAL_WEIGHT
    # A cost an earlier router stored as Infinity is forgotten, not kept forever.
    assert lw.smoothed_cost(float("inf"), report(40.0)) == 40.0


def test_a_workers_own_weight_is_its_lowest_of_its_clusters():
    low = WeightState(200.0, 10, "cost 200ms vs best 20ms")
    clusters = [
        lw.ClusterWeight("m1", "1", WeightState(200.0, 100, "cost 200ms vs best 200ms")),
        lw.ClusterWeight("m2", "1", low),
    ]
    assert lw.overall(200.0, clusters) == WeightState(
        200.0, 10, "lowest in m2:1: cost 200ms vs best 20ms"
    )
    assert lw.overall(200.0, clusters[1:]) == low  # one cluster: its own


def test_worker_entries_keep_their_cluster_weights_and_old_entries_use_their_own():
    clusters = (lw.ClusterWeight("m", "1", WeightState(40.0, 55, "why")),)
    entry = WorkerEntry("w", "127.0.0.1", 1, (("m", "1"), ("n", "1")), cluster_weights=clusters)
    entry = WorkerEntry(**{**entry.__dict__, "weight": WeightState(40.0, 30, "own")})
    assert WorkerEntry.from_json("w", entry.to_json()) == entry
    assert entry.weight_in("m", "1").weight == 55
    assert entry.weight_in("n", "1").weight == 30  # none there yet: its own


def stalled(queue: int, running: int = 8, slots: int = 8, kv: float = 0.0) -> LoadReport:
    """A busy worker none of whose requests finished within the report's window."""
    return LoadReport(queue_depth=queue, running=running, slots=slots, kv_utilization=kv)


def test_a_busy_worker_with_no_finished_request_keeps_its_cost_and_does_not_climb():
    # Held at the floor for being slow, its engine then stalls: nothing finishes, so
    # no TTFT sample, while its queue grows. Counted as idle, it went 5, 35, 65, 95,
    # 100 and took half of its version's new requests.
    state = WeightState(cost=3600.0, weight=lw.MIN_WEIGHT, reason="")
    for queue in (100, 120, 140, 160):
        state = lw.update(state, stalled(queue, kv=1.0), [40.0])
        assert state.weight == lw.MIN_WEIGHT
        assert state.cost == 3600.0  # kept, not dropped, and the raise is not compounded
    assert "no request finished lately, 160 queued, 8 running" in state.reason
    assert "last cost 3600ms x pressure" in state.reason


def test_a_worker_running_at_its_slots_without_samples_holds_its_weight():
    # Every slot busy with long generations and nothing queued: no faster than its history.
    state = WeightState(cost=400.0, weight=10, reason="")
    _, weights = run(state, stalled(0), [40.0], beats=5)
    assert weights == [10] * 5


def test_the_pressure_of_a_busy_worker_without_samples_lowers_its_weight():
    # Neutral until now (as fast as the best), it stalls with a queue as deep as its
    # slots: at least twice the best's cost, 50, reached in steps of at most MAX_STEP.
    state = WeightState(cost=40.0, weight=lw.NEUTRAL_WEIGHT, reason="")
    state, weights = run(state, stalled(8), [40.0], beats=3)
    assert weights == [70, 50, 50]
    assert state.cost == 40.0


def test_a_busy_worker_without_any_history_is_no_faster_than_the_best():
    # No cost of its own yet (it joined, or was idle): its queue behind the best's cost.
    state, weights = run(WeightState(), stalled(24), [40.0], beats=4)
    assert weights == [70, 40, 25, 25]  # 100 / pressure 4
    assert state.cost is None and "best cost x pressure 4.00" in state.reason
    # Nobody's cost known: nothing to compare with.
    alone = lw.update(WeightState(), stalled(24), [None])
    assert alone.weight == lw.NEUTRAL_WEIGHT and "no cost known" in alone.reason


def test_an_idle_worker_without_samples_is_neutral_and_forgets_its_history():
    state = lw.update(WeightState(cost=3600.0, weight=lw.MIN_WEIGHT), LoadReport(slots=8), [40.0])
    assert state.cost is None and state.weight == lw.MIN_WEIGHT + lw.MAX_STEP
    assert "no recent requests: neutral" in state.reason


def test_requests_finishing_again_smooth_on_from_the_held_cost():
    state = WeightState(cost=3600.0, weight=lw.MIN_WEIGHT, reason="")
    for _ in range(10):
        state = lw.update(state, stalled(100, kv=1.0), [40.0])
    state = lw.update(state, report(40.0), [40.0])
    assert state.cost == lw.EWMA_ALPHA * 40.0 + (1 - lw.EWMA_ALPHA) * 3600.0


def test_a_raised_cost_past_any_float_is_the_floor_not_no_evidence():
    state = lw.update(WeightState(cost=1e300, weight=lw.MIN_WEIGHT), stalled(1 << 30), [1.0])
    assert state.weight == lw.MIN_WEIGHT and state.cost == 1e300
