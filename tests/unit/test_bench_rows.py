"""The benchmark's rows table, scenario selection and process placement."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import pytest

from bench import peer, routing, serving
from bench.__main__ import BUDGET_S, MIN_SCALE, pace
from bench.pinning import LOAD, SUT, CpuMeter, Layout, Placement, cpu_seconds, layout
from bench.registry import SCENARIOS, select
from bench.report import placement_table, public
from bench.rows import TARGET_IDS, Row, all_rows, row, table


def test_every_target_prints_a_row_starting_with_its_id_and_ending_with_its_result() -> None:
    rows = all_rows([row("S1", "90%", True), row("S3", "2.0x", False)])
    lines = table(rows).splitlines()[2:]
    assert [line.split(" | ")[0].lstrip("| ") for line in lines] == list(TARGET_IDS)
    results = {line.split(" | ")[0].lstrip("| "): line.rsplit(" | ", 1)[1] for line in lines}
    assert results["S1"] == "PASS |"
    assert results["S3"] == "FAIL |"
    assert results["E3"] == "not run |"


def test_extra_rows_follow_the_targets_and_a_figure_without_a_goal_is_reported() -> None:
    extra = Row("T1", "templates", "faster", "4x")
    rows = all_rows([extra, row("E3", "120 µs/request", None)])
    assert rows[-1] is extra
    assert next(r for r in rows if r.id == "E3").result == "reported"


def test_only_selects_scenarios_by_row_id_or_name_and_rejects_unknown_ones() -> None:
    assert [s.name for s in select("S1,S3")] == ["serving"]
    assert [s.name for s in select("inference")] == ["serving"]
    assert {s.name for s in select("R1,edge")} == {"edge", "usage"}
    assert [s.name for s in select(None)] == [s.name for s in SCENARIOS if s.default]
    with pytest.raises(SystemExit, match="unknown"):
        select("S9")


def test_a_run_behind_time_shortens_the_remaining_windows_within_bounds() -> None:
    default = [s for s in SCENARIOS if s.default]
    planned = sum(s.seconds for s in default)
    assert planned <= BUDGET_S  # a quiet VM runs every window in full
    assert pace(0.0, default) == 1.0
    # A slow VM that used 480 s by the last four scenarios' start (planned: ~400).
    rest = default[-4:]
    behind = pace(480.0, rest)
    assert behind == pytest.approx((BUDGET_S - 480.0) / sum(s.seconds for s in rest))
    assert behind < 1.0
    assert pace(BUDGET_S + 100, rest) == MIN_SCALE  # never below: shorter windows are noise
    assert pace(0.0, []) == 1.0


def test_pacing_scales_windows_and_counts_not_rounds() -> None:
    full = routing.Plan.of(quick=False)
    paced = full.paced(0.75)
    assert (paced.rounds, paced.control_rounds) == (full.rounds, full.control_rounds)
    assert paced.window_s == full.window_s * 0.75
    assert paced.paced_window_s == full.paced_window_s * 0.75
    assert serving.Plan.of(quick=False).paced(0.5).window_s == serving.Plan.of(False).window_s / 2
    assert peer.Plan.of(quick=False).paced(0.8).calls == 120
    assert routing.Plan.of(quick=False).paced(1.0) == full


def test_k2_runs_each_mode_first_equally_often_after_an_opening() -> None:
    # Rounds flip the modes' order: with an odd count one mode ran first twice,
    # and the first phase after K1 read the lowest rate in five runs out of five.
    for quick in (True, False):
        plan = routing.Plan.of(quick)
        assert plan.control_rounds % 2 == 0
        assert plan.control_opening_s > 0
    assert routing.Plan.of(False).paced(0.5).control_opening_s == 1.5


def test_report_json_leaves_out_raw_objects() -> None:
    assert public({"serving": {"_records": [object()], "s1": 0.9}, "quick": False}) == {
        "serving": {"s1": 0.9},
        "quick": False,
    }


def test_layout_gives_load_and_system_under_test_a_core_each_when_there_are_two() -> None:
    lay = layout()
    if len(os.sched_getaffinity(0)) < 2:
        assert not lay.pinned
    else:
        assert lay.pinned
        assert len(lay.load) == len(lay.sut) == 1
        assert lay.taskset(SUT) == ["taskset", "-c", str(next(iter(lay.sut)))]


def test_unpinned_layout_starts_commands_as_they_are() -> None:
    both = frozenset({0, 1})
    lay = Layout(both, both)
    assert not lay.pinned
    assert lay.taskset(SUT) == []
    assert lay.threads(LOAD) == 2


def test_placement_records_each_process_once_and_prints_it() -> None:
    placement = Placement(Layout(frozenset({0}), frozenset({1})))
    placement.record("worker", 42, SUT, 1)
    placement.record("worker", 43, SUT, 1)
    text = placement_table(placement.to_json())
    assert "system under test and its baselines on core 1" in text
    assert text.count("| worker | 42 |") == 1


def test_cpu_meter_counts_what_a_process_used_inside_it() -> None:
    script = (
        "import time\ninput()\nend = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\ninput()"
    )
    busy = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    assert busy.stdin is not None
    try:
        with CpuMeter({"busy": busy.pid}) as meter:
            started = cpu_seconds(busy.pid)
            busy.stdin.write("go\n")
            busy.stdin.flush()
            while cpu_seconds(busy.pid) < started + 0.2:  # its busy loop is under way
                pass
        assert meter.used["busy"] >= 0.2
    finally:
        busy.kill()
        busy.wait()
        busy.stdin.close()


def _edge_results(complete: Mapping[str, object]) -> dict[str, object]:
    latency = {
        name: {"p50_ms": p50}
        for name, p50 in (
            ("direct", 1.0),
            ("edge-jwt", 2.0),
            ("edge-api-key", 2.0),
            ("envoy", 1.5),
            ("edge-api-key-no-cache", 4.0),
        )
    }
    # Each path's CPU per request, round by round (the judge takes the medians).
    per_request = {"envoy": 400.0, "auth": 5.0, "usage": 3.0, "inference-0": 450.0}
    cpu = {"direct": [per_request], "edge-jwt": [per_request], "edge-api-key": [per_request]}
    return {
        "latency": latency,
        "requests_per_s": {},
        "cpu_us_per_request": cpu,
        "complete_rps": complete,
    }


def test_e2_prints_the_bare_proxy_floor_and_each_process_s_cpu_per_complete() -> None:
    from bench.registry import _edge_judge

    complete = {
        "direct": [100.0, 110.0, 90.0],
        "edge-jwt": [80.0, 70.0, 75.0],
        "envoy": [95.0, 99.0, 97.0],
        "cpu_us_per_request": {
            "direct": {"inference-0": 5000.0, "usage": 100.0},
            "edge-jwt": {"envoy": 800.0, "inference-0": 5400.0},
        },
    }
    e2 = next(r for r in _edge_judge(_edge_results(complete)) if r.id == "E2")
    assert e2.measured.startswith("75% (75 req/s") and e2.passed is False
    assert e2.baseline == "direct 100 req/s (bare Envoy proxy 97 req/s: 97%)"
    assert e2.cpu == (
        "direct 5100 µs/req (inference-0 5000, usage 100);"
        " edge-jwt 6200 µs/req (envoy 800, inference-0 5400)"
    )
    # Results of runs before the bare-proxy path still judge.
    older = _edge_results({"direct": [100.0], "edge-jwt": [95.0]})
    e2 = next(r for r in _edge_judge(older) if r.id == "E2")
    assert e2.passed is True and e2.baseline == "direct 100 req/s" and e2.cpu == ""


def test_k1_compares_ttft_at_one_offered_load_and_throughput_in_the_closed_loop() -> None:
    from bench import routing

    def mode(ttft_ms: float, paced_ttft_ms: float, rps: float) -> dict[str, object]:
        samples = [routing.Sample(ttft_ms, 440, 400)] * 10
        summary = routing._summary(samples, [rps], [], [{"worker": 1e6 / rps}])
        paced = [routing.Sample(paced_ttft_ms, 440, 400)] * 10
        return {**summary, "paced": {"offered_rps": 7.5, **routing._outcomes(paced, [])}}

    def k1(affinity: dict[str, object], round_robin: dict[str, object]) -> Row:
        control = mode(100, 100, 10)
        results = {
            "prefix_heavy": {"affinity": affinity, "round_robin": round_robin},
            "distinct": {"affinity": control, "round_robin": control},
        }
        return routing.judge(results)[0]

    # The closed loop's TTFT (the clients' own queue) does not decide the row.
    assert k1(mode(200, 50, 20), mode(200, 160, 10)).passed
    assert not k1(mode(50, 60, 20), mode(200, 160, 10)).passed  # 2.7x at the same load
    assert not k1(mode(200, 50, 12), mode(200, 160, 10)).passed  # 1.2x throughput
    # Identical samples: the bootstrap interval is the ratio itself.
    assert (
        "(3.2x lower; 95% bootstrap interval 3.2-3.2x)"
        in k1(mode(200, 50, 20), mode(200, 160, 10)).measured
    )


def test_k1_paces_at_round_robins_mean_rate_of_its_first_two_rounds() -> None:
    from bench import routing

    # One round alone put the paced load at 64-97% of round robin's later rounds.
    assert routing._offered([26.0, 20.0, 21.0]) == routing.PACED_LOAD * 23.0
    assert routing._offered([20.0]) == routing.PACED_LOAD * 20.0
