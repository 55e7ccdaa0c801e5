"""A circuit breaker for a store the request path waits on (Redis: limits, budgets).

A Redis that hangs (stopped, swapping, a network partition that drops
packets) does not refuse connections: every call waits for its timeout
(1-2 s) before the request fails open. At 32 concurrent requests that is 32
requests every 1-3 s, while the store's answer is known. After `failures`
store failures in a row, over at least `span_s` (a one-off stall, a fork or
an fsync, times out many concurrent calls at once and then passes: it must
not open it), the breaker opens: calls fail at once (the caller's failure
mode applies, as for any outage) for `open_s`; then one call goes through as
a probe, and its answer closes the breaker or opens it again (a probe that
never answers, cancelled with its request, is replaced after `PROBE_S`).
Only timeouts and lost connections are failures: a store that answers, even
with an error, is not hung.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

OPENED = Counter(
    "tokenmesh_store_breaker_opened_total",
    "Times a store's circuit breaker opened (its calls failed at once for a while).",
    ["store"],
)
SHORT_CIRCUITED = Counter(
    "tokenmesh_store_breaker_short_circuits_total",
    "Calls a store's open circuit breaker failed at once, without waiting for the store.",
    ["store"],
)
PROBE_S = 10.0  # longer than any store call's timeout


class BreakerOpen(RedisConnectionError):
    """BreakerOpen: the store failed its last calls; this one was not tried.

    A connection error, so every caller's outage handling (fail open, spool,
    the failure mode) applies unchanged.
    """


class StoreAnswered(Exception):
    """Mixin for a client's errors that carry the store's own answer (it is up, only
    refusing for now): not a failure to the breaker (e.g. ScriptRefused)."""


def store_answered(exc: BaseException) -> bool:
    """Whether a failed call's error is the store's answer (an error reply, "loading"),
    not a timeout or a lost connection."""
    if isinstance(exc, BusyLoadingError | StoreAnswered):
        return True
    return isinstance(exc, RedisError) and not isinstance(
        exc, RedisConnectionError | RedisTimeoutError
    )


class Breaker:
    """Breaker fails a store's calls at once while the store keeps failing (see module).

    Args:
        store: the store's name, in metrics ("ratelimit", "budgets").
        failures: store failures in a row that open it...
        span_s: ... from the first of them to the last at least.
        open_s: how long it stays open before a probe.
        clock: monotonic seconds (tests pass another).
    """

    def __init__(
        self,
        store: str,
        failures: int = 3,
        span_s: float = 1.0,
        open_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.span_s = span_s
        self.open_s = open_s
        self._clock = clock
        self._failed = 0
        self._first_failed_at = 0.0
        self._open = False
        self._open_until = 0.0
        self._probe_until = 0.0  # a probe is under way until then
        self._opened = OPENED.labels(store)
        self._short_circuited = SHORT_CIRCUITED.labels(store)

    @property
    def is_open(self) -> bool:
        """Whether calls are failing at once now (a probe may be under way)."""
        return self._open

    def check(self) -> None:
        """Raises BreakerOpen unless this call may go to the store."""
        if not self._open:
            return
        now = self._clock()
        if now < self._open_until or now < self._probe_until:
            self._short_circuited.inc()
            raise BreakerOpen("the store failed its last calls; not tried")
        self._probe_until = now + PROBE_S  # this call probes; the others wait for it

    def succeeded(self) -> None:
        """Records a call the store answered (an error reply too): the breaker closes."""
        self._failed = 0
        self._open = False
        self._probe_until = 0.0

    def failed_with(self, exc: BaseException) -> None:
        """Records a call that raised `exc`: a failure unless the store answered it."""
        if store_answered(exc):
            self.succeeded()
        else:
            self.failed()

    def failed(self) -> None:
        """Records a call the store failed (timed out, connection lost)."""
        now = self._clock()
        if not self._failed:
            self._first_failed_at = now
        self._failed += 1
        self._probe_until = 0.0
        if self._open:  # a probe failed: open again
            self._open_until = now + self.open_s
        elif self._failed >= self.failures and now - self._first_failed_at >= self.span_s:
            self._open = True
            self._opened.inc()
            self._open_until = now + self.open_s
