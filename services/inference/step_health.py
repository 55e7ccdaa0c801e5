"""Whether a model version's engine steps keep failing: its health, as a circuit breaker.

An engine whose every step fails (a lost GPU, a corrupt engine file, a runtime
fault that stays) failed each request INTERNAL while the version stayed
SERVING: the edge kept routing to it, ahead of healthy workers and the
model's fallback. After FAILING_AFTER failed steps in a row the version turns
NOT_SERVING (the edge's health checks take this worker out of the version's
cluster: other workers, else the fallback, else UNAVAILABLE with retry-after);
after a pause (FIRST_PAUSE_S, doubling while it keeps failing, at most
MAX_PAUSE_S) it turns SERVING again to be tried (half-open): one more failed
step trips it again, one step that succeeds closes it (and resets the pause).

One failed step is not enough: a step fails every sequence of its batch, so
FAILING_AFTER in a row means as many batches failed, not one bad input. It is
for an engine that is broken, not one that is bad: a version failing half its
requests (5 in a row came every ~32 prefills, and it flapped out of service,
its canary's errors unseen by the rollout that should roll it back) is the
SLO-gated rollout's to judge; 20 in a row at a 50% failure rate is a one in a
million run.
The engine thread drives it (`failed`, `succeeded`, `poll`); each returns
the health to publish when it changed, else None.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FAILING_AFTER = 20
FIRST_PAUSE_S = 5.0
MAX_PAUSE_S = 60.0


class StepHealth:
    """StepHealth is one version's breaker over its engine steps (engine thread only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures = 0  # in a row
        self._pause_s = FIRST_PAUSE_S
        self._open_until: float | None = None  # NOT_SERVING until then
        self._half_open = False

    @property
    def failing(self) -> bool:
        """Tells whether the version is out of service (NOT_SERVING) for its failures."""
        return self._open_until is not None

    @property
    def broken(self) -> bool:
        """Tells whether its steps failed and none has worked since: out of service, or
        tried again (half-open) without a step yet (what the failing gauge shows)."""
        return self._open_until is not None or self._half_open

    def failed(self) -> bool | None:
        """Records a failed step; returns False when the version must turn NOT_SERVING."""
        self._failures += 1
        if self._open_until is not None:
            return None
        if self._half_open or self._failures >= FAILING_AFTER:
            if self._half_open:
                self._pause_s = min(self._pause_s * 2, MAX_PAUSE_S)
            self._half_open = False
            self._open_until = self._clock() + self._pause_s
            return False
        return None

    def succeeded(self) -> bool | None:
        """Records a step that succeeded; returns True when it mended a broken version
        (out of service, where a request still running succeeded; or tried again)."""
        mended = self.broken
        self._failures = 0
        self._pause_s = FIRST_PAUSE_S
        self._half_open = False
        self._open_until = None
        return True if mended else None

    def poll(self) -> bool | None:
        """Returns True when the pause is over: the version is tried again (half-open)."""
        if self._open_until is None or self._clock() < self._open_until:
            return None
        self._open_until = None
        self._half_open = True
        return True
