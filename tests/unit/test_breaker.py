"""The store circuit breaker (services/core/breaker.py), on a test clock."""

from __future__ import annotations

import pytest

from services.core.breaker import PROBE_S, Breaker, BreakerOpen


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _opened(clock: Clock) -> Breaker:
    breaker = Breaker("test", failures=3, span_s=1.0, open_s=1.0, clock=clock)
    for _ in range(3):
        breaker.check()
        breaker.failed()
        clock.now += 0.5
    return breaker


def test_it_opens_after_failures_in_a_row_only() -> None:
    clock = Clock()
    breaker = Breaker("test", failures=3, span_s=1.0, open_s=1.0, clock=clock)
    for _ in range(5):  # a success between failures keeps it closed
        breaker.failed()
        clock.now += 0.6
        breaker.failed()
        breaker.succeeded()
    breaker.check()
    assert not breaker.is_open
    assert _opened(clock).is_open


def test_a_one_off_stall_that_fails_many_calls_at_once_does_not_open_it() -> None:
    # 32 concurrent calls time out together (a fork, an fsync), then Redis answers.
    clock = Clock()
    breaker = Breaker("test", failures=3, span_s=1.0, open_s=1.0, clock=clock)
    for _ in range(32):
        breaker.failed()
    breaker.check()
    assert not breaker.is_open
    clock.now += 1.0
    breaker.failed()  # still failing a second later: hung
    assert breaker.is_open


def test_an_open_breaker_fails_calls_at_once_until_one_probe_goes() -> None:
    clock = Clock()
    breaker = _opened(clock)
    with pytest.raises(BreakerOpen):
        breaker.check()
    clock.now += 1.0
    breaker.check()  # the probe
    with pytest.raises(BreakerOpen):
        breaker.check()  # the others wait for its answer
    breaker.succeeded()
    breaker.check()
    assert not breaker.is_open


def test_a_failed_probe_opens_it_again() -> None:
    clock = Clock()
    breaker = _opened(clock)
    clock.now += 1.0
    breaker.check()
    breaker.failed()
    with pytest.raises(BreakerOpen):
        breaker.check()
    clock.now += 1.0
    breaker.check()  # the next probe


def test_a_probe_that_never_answers_is_replaced() -> None:
    # Cancelled with its request, it reports nothing: the breaker must not stay open.
    clock = Clock()
    breaker = _opened(clock)
    clock.now += 1.0
    breaker.check()
    clock.now += PROBE_S - 0.1
    with pytest.raises(BreakerOpen):
        breaker.check()
    clock.now += 0.2
    breaker.check()


def test_it_is_a_connection_error_so_callers_treat_it_as_an_outage() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    assert issubclass(BreakerOpen, RedisConnectionError)


def test_a_store_that_answers_with_an_error_is_not_hung() -> None:
    # One classification for every caller (the limiter and budgets each had theirs).
    from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from services.core.breaker import store_answered
    from services.usage.script_client import ScriptRefused, ScriptUnavailable

    for answered in (BusyLoadingError(), ReadOnlyError(), OutOfMemoryError(), ScriptRefused()):
        assert store_answered(answered), answered
    for hung in (RedisConnectionError(), RedisTimeoutError(), TimeoutError(), OSError()):
        assert not store_answered(hung), hung
    assert not store_answered(ScriptUnavailable("TimeoutError"))
