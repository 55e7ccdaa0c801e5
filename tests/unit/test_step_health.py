"""A version's breaker over its engine steps (services/inference/step_health.py)."""

from __future__ import annotations

import random

from services.inference import step_health
from services.inference.step_health import StepHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _tripped() -> tuple[StepHealth, Clock]:
    clock = Clock()
    health = StepHealth(clock)
    for _ in range(step_health.FAILING_AFTER - 1):
        assert health.failed() is None
    assert health.failed() is False
    return health, clock


def test_it_trips_after_failing_after_steps_in_a_row_not_before() -> None:
    health = StepHealth(Clock())
    for _ in range(step_health.FAILING_AFTER - 1):
        assert health.failed() is None
    assert health.succeeded() is None  # a success between: counted from zero again
    for _ in range(step_health.FAILING_AFTER - 1):
        assert health.failed() is None
    assert not health.failing
    assert health.failed() is False
    assert health.failing
    assert health.failed() is None  # already out: no second change


def test_it_is_tried_again_after_its_pause_and_one_failure_trips_it_for_longer() -> None:
    health, clock = _tripped()
    clock.now += step_health.FIRST_PAUSE_S - 0.01
    assert health.poll() is None
    clock.now += 0.02
    assert health.poll() is True  # half-open: serving, to be tried
    assert not health.failing
    assert health.failed() is False  # one failure is enough now
    clock.now += step_health.FIRST_PAUSE_S + 0.01
    assert health.poll() is None  # the pause doubled
    clock.now += step_health.FIRST_PAUSE_S
    assert health.poll() is True


def test_a_step_that_succeeds_closes_it_and_resets_the_pause() -> None:
    health, clock = _tripped()
    clock.now += step_health.FIRST_PAUSE_S
    assert health.poll() is True
    assert health.broken  # serving, to be tried: no step has worked yet
    assert health.succeeded() is True  # mended
    assert not health.broken
    for _ in range(step_health.FAILING_AFTER - 1):
        assert health.failed() is None  # closed again: a run of failures is needed
    assert health.failed() is False
    clock.now += step_health.FIRST_PAUSE_S
    assert health.poll() is True  # the first pause again


def test_a_request_still_running_that_succeeds_serves_the_version_again() -> None:
    health, _ = _tripped()
    assert health.succeeded() is True
    assert not health.failing


def test_the_pause_is_bounded() -> None:
    health, clock = _tripped()
    for _ in range(10):
        clock.now += step_health.MAX_PAUSE_S
        assert health.poll() is True
        assert health.failed() is False
    clock.now += step_health.MAX_PAUSE_S
    assert health.poll() is True


def test_a_version_failing_half_its_steps_stays_in_service() -> None:
    # A bad version (the deterministic engine's faulty one fails half its prefills,
    # seeded as it is) is the SLO-gated rollout's to judge: with 5 in a row it was
    # taken out every ~32 prefills, and its copies and canary traffic went nowhere.
    faults = random.Random(20261122)
    health = StepHealth(Clock())
    for _ in range(2000):
        change = health.failed() if faults.random() < 0.5 else health.succeeded()
        assert change is None
    assert not health.broken
