"""SLO-gated rollouts: the decision rules and the step windows (pure parts)."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.inference.load_report import TTFT_BOUNDS_MS
from services.router import rollouts as ro
from services.router.registry import VersionCounts, WorkerEntry

POLICY = ro.Policy(steps=(5, 25, 50, 100), step_s=60, min_requests=50)
NOW = 1_800_000_000.0


def rollout(step_index: int = 0, policy: ro.Policy = POLICY, **changes: object) -> ro.Rollout:
    fields = dict(
        model="m", version="2", stable="1", policy=policy, state=ro.RUNNING,
        step_index=step_index, step_started_at=NOW, created_at=NOW,
    )  # fmt: skip
    return ro.Rollout(**{**fields, **changes})  # type: ignore[arg-type]


def ttfts(ms: float, count: int) -> tuple[int, ...]:
    counts = [0] * (len(TTFT_BOUNDS_MS) + 1)
    counts[next(i for i, b in enumerate(TTFT_BOUNDS_MS) if b >= ms)] = count
    return tuple(counts)


def window(requests: int, errors: int = 0, ttft_ms: float = 10.0) -> ro.Window:
    return ro.Window(requests, errors, TTFT_BOUNDS_MS, ttfts(ttft_ms, requests - errors))


def test_policies_are_validated():
    ro.Policy().check()
    for bad in (
        ro.Policy(steps=(50, 25, 100)),
        ro.Policy(steps=(5, 50)),
        ro.Policy(steps=(0, 100)),
        ro.Policy(step_s=0.5),
        ro.Policy(max_error_rate=0),
        ro.Policy(max_ttft_p99_ratio=0.5),
        ro.Policy(min_requests=0),
        ro.Policy(steps=(100,)),
    ):
        with pytest.raises(InvalidArgument):
            bad.check()


def test_a_first_step_of_100_is_refused_saying_why():
    # All traffic on the canary at once left the stable window empty: the gates
    # compared it with nothing and a canary at ~7.5 s TTFT succeeded.
    with pytest.raises(InvalidArgument, match="first step must be below 100"):
        ro.Policy(steps=(100,)).check()
    ro.Policy(steps=(99, 100)).check()


def test_errors_roll_back_mid_step_once_even_all_missing_requests_could_not_save_it():
    # 5 errors in 10 requests: with 40 more successes it would be 5/50 = 0.1, which a
    # version at the policy's 1% makes over 50 requests 0.02% of the time.
    action, reason = ro.decide(rollout(), window(10, errors=5), window(100), NOW + 1)
    assert action == "rollback" and "error rate 0.500 > 0.01 with 99.9% confidence" in reason
    # A canary failing every request goes at its fifth.
    assert ro.decide(rollout(), window(4, errors=4), window(100), NOW + 1)[0] == "hold"
    assert ro.decide(rollout(), window(5, errors=5), window(100), NOW + 1)[0] == "rollback"


def test_a_few_errors_within_what_the_policy_allows_do_not_roll_back():
    # The observed rate alone rolled back: one error among a step's first 50 requests
    # (budget 0.5) did, for a canary whose true rate was half the policy's 22% of the
    # time, while the stable version's thousands of requests showed a lower rate.
    assert ro.decide(rollout(), window(20, errors=1), window(2000, errors=8), NOW + 1)[0] == "hold"
    assert ro.decide(rollout(), window(300, errors=6), window(6000, errors=30), NOW + 1)[0] == (
        "hold"
    )
    # Past what chance explains: 20 of 300 (6.7%); 11 show it (a 1% version: 0.1%).
    action, _ = ro.decide(rollout(), window(300, errors=20), window(6000, errors=30), NOW + 1)
    assert action == "rollback"


def test_an_error_rate_policy_of_100_percent_never_rolls_back_for_errors():
    policy = ro.Policy(max_error_rate=1.0)
    assert not ro.error_breach(policy, window(10, errors=10), window(100))


def test_errors_no_worse_than_the_stable_versions_are_not_the_canarys_fault():
    action, _ = ro.decide(rollout(), window(60, errors=30), window(60, errors=40), NOW + 1)
    assert action == "hold"


def test_a_step_holds_until_its_time_and_its_requests_then_advances():
    assert ro.decide(rollout(), window(100), window(100), NOW + 30)[0] == "hold"
    action, reason = ro.decide(rollout(), window(20), window(100), NOW + 61)
    assert action == "hold" and reason == "waiting for traffic: 20/50 requests"
    action, reason = ro.decide(rollout(), window(60), window(600), NOW + 61)
    assert action == "advance" and "over 60 requests" in reason


def test_the_step_before_100_succeeds_the_rollout():
    assert ro.decide(rollout(step_index=2), window(60), window(60), NOW + 61)[0] == "succeed"


def test_a_slow_canary_rolls_back_at_the_end_of_the_step():
    action, reason = ro.decide(rollout(), window(60, ttft_ms=40), window(60), NOW + 61)
    assert action == "rollback" and "ttft p99" in reason and "1.5 x stable" in reason
    # Within the ratio: fine.
    assert ro.decide(rollout(), window(60, ttft_ms=12), window(60), NOW + 61)[0] == "advance"


def test_windows_count_since_the_step_began_and_survive_worker_restarts():
    def counts(requests: int, errors: int) -> VersionCounts:
        return VersionCounts("m", "2", requests, errors, TTFT_BOUNDS_MS, ttfts(10, requests))

    def worker(name: str, c: VersionCounts) -> WorkerEntry:
        return WorkerEntry(name, "h", 1, (("m", "2"),), outcomes=(c,))

    started = rollout(baseline={"a": (counts(100, 5),), "b": (counts(50, 0),)})
    workers = [
        worker("a", counts(130, 7)),  # 30 more, 2 errors
        worker("b", counts(10, 1)),  # restarted since: all 10 count
        worker("c", counts(4, 0)),  # new: all count
    ]
    found = ro.window(started, workers, "2")
    assert (found.requests, found.errors) == (44, 3)
    assert found.ttft_samples == 30 + 10 + 4


def test_rollouts_round_trip_through_json_and_weights_follow_the_state():
    stored = rollout(step_index=1, reason="r").decided(ro.Decision(NOW, "advance", 25, "ok"))
    assert ro.Rollout.from_json(stored.to_json()) == stored
    assert stored.weight == 25
    assert ro.Rollout.from_json(stored.to_json()).decisions[-1].reason == "ok"
    from dataclasses import replace

    assert replace(stored, state=ro.ROLLED_BACK).weight == 0


def test_a_worker_that_restarted_under_its_id_counts_from_its_restart():
    # Requests alone told a restart: one that served past its old count read as
    # 50 requests and -8 errors, hiding other workers' errors from the gate.
    def counts(requests: int, errors: int) -> VersionCounts:
        return VersionCounts("m", "2", requests, errors, TTFT_BOUNDS_MS, ttfts(10, requests))

    summed = ro.Window().plus(counts(150, 2), counts(100, 10))
    assert (summed.requests, summed.errors) == (150, 2)


def test_a_worker_whose_counters_run_changed_counts_from_its_restart():
    # Restarted early in a step, a canary's counters overtook the step's starting
    # ones: (1000, 8) then (1005, 9) read as 5 requests and 1 error (20%), and a
    # healthy canary (0.9% since its restart) rolled back.
    def counts(requests: int, errors: int, run: str) -> VersionCounts:
        timed = ttfts(10, requests - errors)
        return VersionCounts("m", "2", requests, errors, TTFT_BOUNDS_MS, timed, counters_id=run)

    summed = ro.Window().plus(counts(1005, 9, "after"), counts(1000, 8, "before"))
    assert (summed.requests, summed.errors) == (1005, 9)
    same = ro.Window().plus(counts(1005, 9, "run"), counts(1000, 8, "run"))
    assert (same.requests, same.errors) == (5, 1)


def test_a_histogram_without_bounds_reads_no_p99_instead_of_failing():
    # A heartbeat with counts and no bounds made the rollout driver raise at every
    # tick (IndexError), and no rollout after that model was ever checked.
    assert ro.Window(10, 0, (), (10,)).ttft_p99_ms() == 0.0


def test_a_canary_no_worker_serves_rolls_back_instead_of_waiting_for_traffic():
    # Its share failed at the edge (503, no upstream), where no worker counted it:
    # the step held at "waiting for traffic 0/50" for good.
    started = rollout()
    later = NOW + max(POLICY.step_s, ro.NO_WORKER_GRACE_S)
    action, reason = ro.decide(started, ro.Window(), window(100), later, canary_workers=0)
    assert action == "rollback" and "no worker served 2" in reason
    assert ro.decide(started, ro.Window(), window(100), NOW + 1, canary_workers=0)[0] == "hold"
    assert ro.decide(started, ro.Window(), window(100), later, canary_workers=1)[0] == "hold"


def test_a_step_holds_while_no_worker_of_the_new_version_is_routable():
    # Its only worker draining (still heartbeating), or dead within the grace: the
    # step advanced, or succeeded to 100%, onto a version with no endpoint, and every
    # request of the model failed 503 under a rollout that read SUCCEEDED.
    last = rollout(step_index=len(POLICY.steps) - 2)
    ended = NOW + POLICY.step_s
    assert ro.decide(last, window(500), window(500), ended)[0] == "succeed"
    action, reason = ro.decide(last, window(500), window(500), ended, canary_routable=0)
    assert action == "hold" and "routable worker of 2" in reason
    assert ro.decide(rollout(), window(500), window(500), ended, canary_routable=0)[0] == "hold"
    draining = WorkerEntry("c", "127.0.0.1", 1, (("m", "2"),), "draining", ended + 30)
    assert ro._canary_routable(last, [draining], ended) == 0


def test_a_moment_without_a_canary_worker_does_not_roll_it_back():
    # A restart, a drain or a late heartbeat leaves no routable canary worker for a
    # tick: counted at that tick alone, a healthy canary rolled back.
    started = rollout()
    later = NOW + max(POLICY.step_s, ro.NO_WORKER_GRACE_S) + 1
    restarting = WorkerEntry("c", "127.0.0.1", 1, (("m", "2"),), "draining", later - 5)
    stable = WorkerEntry("s", "127.0.0.1", 2, (("m", "1"),), "serving", later + 5)
    assert ro._canary_seen(started, [restarting, stable], later) == 1
    gone = WorkerEntry("c", "127.0.0.1", 1, (("m", "2"),), "serving", later - 61)
    assert ro._canary_seen(started, [gone, stable], later) == 0
    # Just after a Redis outage every lease lapsed: nothing is judged.
    lapsed = WorkerEntry("s", "127.0.0.1", 2, (("m", "1"),), "serving", later - 120)
    assert ro._canary_seen(started, [gone, lapsed], later) == 1


def test_a_worker_reporting_no_bounds_does_not_switch_the_ttft_gate_off():
    # The first worker's bucket count (and the last one's bounds) were taken as
    # everyone's: one reporting counts without bounds, added first, left every other
    # worker out and read the version's p99 as 0, so a slow canary passed the gate.
    slow = VersionCounts("m", "2", 100, 0, TTFT_BOUNDS_MS, ttfts(5000, 100))
    bad = VersionCounts("m", "2", 10, 0, (), (10,))
    summed = ro.Window().plus(bad, None).plus(slow, None)  # the bad one comes first
    assert summed.ttft_p99_ms() >= 5000
    assert summed.requests == 100  # the bad report is left out whole


ZEROS = tuple([0] * (len(TTFT_BOUNDS_MS) + 1))


def untimed_window(requests: int, timed: int, ttft_ms: float = 10.0) -> ro.Window:
    """`requests` of which only `timed` got a first token (the rest were cancelled, or
    passed their deadline, before it: no TTFT sample, no error)."""
    return ro.Window(requests, 0, TTFT_BOUNDS_MS, ttfts(ttft_ms, timed))


def test_a_canary_that_never_gets_a_first_token_is_not_promoted():
    # Slower than every client's deadline: each request cancelled before its first
    # token, recorded without a TTFT and without an error. The gate read a p99 of 0
    # and advanced (succeeded at the last step).
    hung = ro.Window(100, 0, TTFT_BOUNDS_MS, ZEROS)
    action, reason = ro.decide(rollout(), hung, window(600), NOW + 61)
    assert action == "rollback", reason
    assert "no first token" in reason and "without a first token" in reason
    assert ro.decide(rollout(step_index=2), hung, window(600), NOW + 61)[0] == "rollback"
    # Half of them hung, half fast: the slowest requests are the ones left out.
    action, reason = ro.decide(rollout(), untimed_window(100, 50), window(600), NOW + 61)
    assert action == "rollback", reason


def test_cancels_the_stable_version_has_as_often_do_not_block_a_rollout():
    # Clients cancel 30% of requests before the first token on both versions alike.
    canary, stable = untimed_window(100, 70), untimed_window(1000, 700)
    action, reason = ro.decide(rollout(), canary, stable, NOW + 61)
    assert action == "advance", reason
    assert reason.endswith("over 100 requests, 30 without a first token (stable 300 of 1000)")


def test_no_first_tokens_on_either_version_is_no_ttft_to_compare():
    # An embedding model (or a mesh where every request was cancelled): no TTFT at all.
    quiet = ro.Window(100, 0, TTFT_BOUNDS_MS, ZEROS)
    assert ro.decide(rollout(), quiet, ro.Window(600, 0, TTFT_BOUNDS_MS, ZEROS), NOW + 61)[0] == (
        "advance"
    )


def test_a_step_with_too_few_timed_canary_requests_holds():
    # 60% cancelled on both: 40 timed canary requests say little of its TTFT.
    canary, stable = untimed_window(100, 40), untimed_window(1000, 400)
    action, reason = ro.decide(rollout(), canary, stable, NOW + 61)
    assert action == "hold", reason
    assert reason.startswith("waiting for timed requests: 40/50")
    assert ro.decide(rollout(), untimed_window(130, 52), stable, NOW + 61)[0] == "advance"


def test_without_the_stable_versions_requests_or_first_tokens_a_step_holds():
    # A generative canary compared with an empty stable window (steps (100,), stored
    # before they were refused), or one whose requests got no first token: the gate
    # passed it unchecked.
    slow = window(100, ttft_ms=7500)
    action, reason = ro.decide(rollout(), slow, ro.Window(), NOW + 61)
    assert action == "hold" and "the stable version's traffic" in reason
    no_first_tokens = ro.Window(600, 0, TTFT_BOUNDS_MS, ZEROS)
    action, reason = ro.decide(rollout(), slow, no_first_tokens, NOW + 61)
    assert action == "hold" and "the stable version's first tokens" in reason
    # A stored one-step rollout no longer succeeds blindly.
    one_step = rollout(policy=ro.Policy(steps=(100,), step_s=60, min_requests=50))
    assert ro.decide(one_step, slow, ro.Window(), NOW + 61)[0] == "hold"


def test_job_items_are_summed_apart_and_read_a_restart_when_they_go_down() -> None:
    base = VersionCounts(
        "m", "2", 30, 2, TTFT_BOUNDS_MS, ttfts(10, 10), batch_requests=20, batch_errors=1
    )
    now = VersionCounts(
        "m", "2", 90, 5, TTFT_BOUNDS_MS, ttfts(10, 40), batch_requests=50, batch_errors=3
    )
    assert VersionCounts.from_json(now.to_json()) == now  # as the registry stores them
    step = ro.Window().plus(now, base)
    assert (step.requests, step.errors, step.batch_requests, step.batch_errors) == (60, 3, 30, 2)
    assert (step.ttft_samples, step.completed) == (30, 29)
    # Fewer job items than at the step's start: the worker's counters started again.
    restarted = VersionCounts("m", "2", 95, 5, TTFT_BOUNDS_MS, ttfts(10, 90), batch_requests=5)
    assert ro.Window().plus(restarted, base).requests == 95


def test_a_heartbeat_with_impossible_job_item_counts_is_dropped() -> None:
    from services.router.servicer import outcomes_from_pb
    from tokenmesh.router.v1 import router_pb2
    from tokenmesh.type.v1 import types_pb2

    def report(requests: int, batch: int, batch_errors: int, timed: int) -> router_pb2.WorkerLoad:
        counts = [timed] + [0] * len(TTFT_BOUNDS_MS)
        version = router_pb2.VersionOutcomes(
            model=types_pb2.ModelRef(name="m", version="2"), requests=requests, errors=1,
            ttft_bucket_counts=counts, ttft_bucket_bounds_ms=TTFT_BOUNDS_MS,
            batch_requests=batch, batch_errors=batch_errors,
        )  # fmt: skip
        return router_pb2.WorkerLoad(versions=[version])

    assert len(outcomes_from_pb(report(10, 4, 1, 6), 0.0)) == 1
    assert outcomes_from_pb(report(10, 11, 0, 0), 0.0) == []  # more job items than requests
    assert outcomes_from_pb(report(10, 4, 2, 6), 0.0) == []  # more job item errors than errors
    assert outcomes_from_pb(report(10, 4, 0, 7), 0.0) == []  # job items in the histogram


def _serving(run: str, requests: int, state: str = "serving") -> WorkerEntry:
    """The canary's one worker, its counters' run `run` having served `requests`."""
    counts = VersionCounts(
        "m", "2", requests, 0, TTFT_BOUNDS_MS, ttfts(10, requests), counters_id=run
    )
    return WorkerEntry("c", "h", 1, (("m", "2"),), state, outcomes=(counts,))


def test_a_canary_that_keeps_crashing_is_rolled_back_not_left_waiting_for_traffic():
    # A restarted worker counts from 0: the step counted its new run alone. A canary
    # crashing every 29 requests waited "for traffic: 29/50" at its share for good
    # (the review's run of the real decide); one crashing every 60 advanced.
    start = rollout(baseline={"c": (_serving("run-0", 0).outcomes[0],)})
    last_seen: ro.LastSeen = {}
    current, action = start, "hold"
    for crash in range(1, 12):
        for served in (10, 20, 29):  # the heartbeats of a run, then it dies
            workers = [_serving(f"run-{crash - 1}", served)]
            current = ro.carry_restarts(current, workers, last_seen)
        workers = [_serving(f"run-{crash}", 0)]  # it came back, counters from 0
        current = ro.carry_restarts(current, workers, last_seen)
        canary = ro.window(current, workers, "2")
        assert canary.requests == 30 * crash  # each run's 29, and the request it cut
        action, reason = ro.decide(current, canary, window(5000), NOW + 1)
        if action != "hold":
            break
    # One failed request a crash (1 in 30, 3.3%: 3x the policy's 1%) shows with 99.9%
    # confidence by the eleventh (11 of 330).
    assert action == "rollback" and "with 99.9% confidence" in reason, (crash, reason)
    assert crash == 11


def test_a_worker_that_drained_before_it_restarted_carries_its_counts_without_an_error():
    start = rollout(baseline={"c": (_serving("run-0", 0).outcomes[0],)})
    last_seen: ro.LastSeen = {}
    current = ro.carry_restarts(start, [_serving("run-0", 40)], last_seen)
    assert current is start  # nothing ended: the same rollout, nothing to store
    current = ro.carry_restarts(current, [_serving("run-0", 45, "draining")], last_seen)
    current = ro.carry_restarts(current, [_serving("run-1", 8)], last_seen)
    canary = ro.window(current, [_serving("run-1", 8)], "2")
    assert (canary.requests, canary.errors, canary.ttft_samples) == (53, 0, 53)
    # Stored and read back as it was (a takeover carries on from it).
    assert ro.Rollout.from_json(current.to_json()) == current
    # The next step starts from nothing carried.
    assert ro._restarted(current, 1, NOW + 61, [_serving("run-1", 8)]).carried == {}
