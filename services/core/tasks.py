"""Background tasks: supervised while they run, stopped reliably.

Every long-running task of a service is started through a `Supervisor`:

    Supervisor (one per service; owns the restart policy)
     └── SupervisedTask (one per loop: meter, shipper, registration, ...)
          └── the task's coroutine, created anew on each restart
    HealthGate (one per service): SERVING while every condition holds
     ├── "task <name>" conditions, reported by the supervisor
     └── other conditions, e.g. "redis" from the RedisHealthMonitor

A task that raises is logged with its context, counted in
`tokenmesh_background_task_restarts_total{service,task}` and restarted after
an exponential, capped backoff. A task that keeps failing (`unhealthy_after`
failures in a row, none after a healthy run) turns its condition false, so the
service reports NOT_SERVING and Kubernetes and Envoy take it out; it is still
restarted, and once a run lasts `healthy_after_s` the condition holds again.
A task that returns has finished its work and is not restarted. Expected,
absorbed conditions (a Redis outage a spool rides out) are the task's own
business; what reaches the supervisor is a failure.

A blocking call that nothing can interrupt (a model's engine build) runs in
`to_daemon_thread`: a stop abandons it instead of waiting for it to return.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import Counter

logger = logging.getLogger(__name__)
T = TypeVar("T")
RECANCEL_EVERY_S = 0.05
RESTARTS = Counter(
    "tokenmesh_background_task_restarts_total",
    "Background tasks restarted after a failure, by service and task.",
    ["service", "task"],
)

#: TaskFactory returns a new run of a task (a fresh coroutine) each time it is called.
TaskFactory = Callable[[], Awaitable[None]]
#: HealthSink applies a service's overall serving state (e.g. RunningServer.set_serving).
HealthSink = Callable[[bool], Awaitable[None]]


async def cancel_and_wait(task: asyncio.Task[Any], timeout_s: float) -> None:
    """Cancels `task` and waits (up to `timeout_s`) until it has ended.

    One cancel() is not always enough: redis-py can lose a cancellation that
    lands while its own read timeout fires (the read returns, or raises a
    Redis TimeoutError that an outage handler retries), and a loop that
    catches that goes on forever. Cancelling again at short intervals
    reaches it at its next await.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=min(RECANCEL_EVERY_S, deadline - loop.time()))
    if not task.done():
        # It outlives whatever the caller closes next (a Redis pool: its next command
        # opens a connection nothing closes): named, so the owner can be found.
        logger.warning("task %s still runs %.1f s after its cancel", task.get_name(), timeout_s)
    elif not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()  # retrieved: no "exception was never retrieved" noise


# Threads of `to_daemon_thread` whose caller stopped waiting and that may still run.
_abandoned: set[threading.Thread] = set()


async def to_daemon_thread(name: str, func: Callable[..., T], /, *args: Any) -> T:
    """Runs `func(*args)` on a daemon thread of its own; returns what it returns.

    For a long call nothing can interrupt (a model's engine build): the threads of
    asyncio.to_thread are joined at exit (the loop's shutdown_default_executor,
    then the interpreter's), so a process stopped during such a call stayed up
    until the call returned. Cancelling the caller abandons the thread instead:
    it runs on, what it returns or raises is dropped, and the process's exit
    does not wait for it (`exit_past_abandoned_threads`).
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    context = contextvars.copy_context()  # as asyncio.to_thread: the caller's log context

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = context.run(func, *args)
        except BaseException as exc:  # the caller's to handle, as an executor hands it over
            future.set_exception(exc)
        else:
            future.set_result(result)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        _abandoned.difference_update([t for t in _abandoned if not t.is_alive()])
        _abandoned.add(thread)
        raise


def abandoned_threads() -> list[str]:
    """Returns the names of the abandoned `to_daemon_thread` calls that still run."""
    return sorted(thread.name for thread in _abandoned if thread.is_alive())


def exit_past_abandoned_threads(code: int) -> None:
    """Ends the process with `code` at once if an abandoned `to_daemon_thread` call
    still runs; returns otherwise.

    The interpreter's own exit destroys the C++ runtime's statics under such a
    thread: ONNX Runtime, in the middle of a session build, then aborted the
    process ("terminate called without an active exception") or crashed it
    (SIGSEGV) in 2 of 7 stops measured. The atexit handlers run first (logs
    and traces flushed), as at a normal exit; only the finalization is skipped.
    """
    running = abandoned_threads()
    if not running:
        return
    logger.info("exiting without waiting for abandoned threads: %s", ", ".join(running))
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a broken pipe, a closed stream
            stream.flush()
    os._exit(code)


@dataclass(frozen=True)
class RestartPolicy:
    """RestartPolicy says how soon a failed task restarts and when it counts as broken.

    Attributes:
        first_backoff_s: the wait before the first restart; it doubles per failure.
        max_backoff_s: the cap on that wait (a broken task is retried this often).
        unhealthy_after: failures in a row after which the task's condition fails.
        healthy_after_s: a run this long without failing ends a row of failures.
    """

    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    unhealthy_after: int = 5
    healthy_after_s: float = 2.0

    def backoff_s(self, failures: int) -> float:
        """Returns the wait before restarting after `failures` failures in a row (>= 1)."""
        return min(self.max_backoff_s, self.first_backoff_s * 2.0 ** min(failures - 1, 32))


class HealthGate:
    """HealthGate is SERVING while every condition reported to it holds.

    Several parts of a service decide its health (Redis reachability, each
    supervised task); each reports its own condition and none overrides the
    others. Until a sink is attached, reports only update the state.
    """

    def __init__(self) -> None:
        self._failing: set[str] = set()
        self._sink: HealthSink | None = None
        self._applied: bool | None = None
        self._lock = asyncio.Lock()

    @property
    def serving(self) -> bool:
        """Tells whether every condition holds."""
        return not self._failing

    def failing(self) -> frozenset[str]:
        """Returns the conditions that do not hold."""
        return frozenset(self._failing)

    def attach(self, sink: HealthSink) -> None:
        """Sends later changes of the overall state to `sink`, from the state now (which
        the service reports once started: Service.report_serving)."""
        self._sink = sink
        # The state now, not SERVING: a condition that failed before the sink was
        # attached never changed state again, so its recovery never reached the sink.
        self._applied = self.serving

    async def report(self, condition: str, ok: bool) -> None:
        """Records whether `condition` holds; applies the overall state when it changed."""
        if ok:
            self._failing.discard(condition)
        else:
            self._failing.add(condition)
        async with self._lock:
            # The state now, not the one reported: reports that raced apply the latest.
            serving = self.serving
            if self._sink is not None and serving != self._applied:
                await self._sink(serving)
                self._applied = serving


class SupervisedTask:
    """SupervisedTask is one background task under a supervisor (see `Supervisor.spawn`)."""

    def __init__(
        self, service: str, name: str, run: TaskFactory, policy: RestartPolicy, gate: HealthGate
    ) -> None:
        self.service = service
        self.name = name
        self.condition = f"task {name}"
        self._run = run
        self._policy = policy
        self._gate = gate
        self._restarts = RESTARTS.labels(service, name)
        self.failures = 0  # in a row, reset by a healthy run
        self._task = asyncio.create_task(self._supervise(), name=f"{service}:{name}")

    def done(self) -> bool:
        """Tells whether the task has ended (finished, or stopped)."""
        return self._task.done()

    def cancel(self) -> None:
        """Asks the task to stop without waiting (it is not restarted)."""
        self._task.cancel()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the task and waits (up to `timeout_s`) until it has ended."""
        await cancel_and_wait(self._task, timeout_s)

    async def _supervise(self) -> None:
        while True:
            timer = asyncio.create_task(self._healthy_after(self._policy.healthy_after_s))
            try:
                await self._run()
            except Exception as exc:
                timer.cancel()
                await self._failed(exc)
                continue
            finally:
                timer.cancel()
            logger.info("%s: background task %s finished", self.service, self.name)
            await self._gate.report(self.condition, True)
            return

    async def _healthy_after(self, delay_s: float) -> None:
        """Ends a row of failures once the current run has lasted `delay_s`."""
        await asyncio.sleep(delay_s)
        if self.failures:
            logger.info("%s: background task %s runs again", self.service, self.name)
        self.failures = 0
        await self._gate.report(self.condition, True)

    async def _failed(self, exc: Exception) -> None:
        """Logs and counts a failure; fails the condition when it persists; backs off."""
        self.failures += 1
        self._restarts.inc()
        backoff_s = self._policy.backoff_s(self.failures)
        # The supervisor is where a task's failure is finally handled: log it here,
        # with the traceback once per row of failures (an outage repeats the same one).
        logger.error(
            "%s: background task %s failed (%d in a row): %s: %s; restarting in %.1fs",
            self.service,
            self.name,
            self.failures,
            type(exc).__name__,
            exc,
            backoff_s,
            exc_info=exc if self.failures == 1 else None,
        )
        if self.failures >= self._policy.unhealthy_after:
            if self.failures == self._policy.unhealthy_after:
                logger.error(
                    "%s: background task %s cannot recover; reporting NOT_SERVING",
                    self.service,
                    self.name,
                )
            await self._gate.report(self.condition, False)
        await asyncio.sleep(backoff_s)


class Supervisor:
    """Supervisor starts, restarts and stops one service's background tasks.

    Args:
        service: the service's short name (the metric's `service` label).
        gate: where tasks that cannot recover report; a private one if omitted.
        policy: backoff and health thresholds shared by the service's tasks.
    """

    def __init__(
        self, service: str, gate: HealthGate | None = None, policy: RestartPolicy | None = None
    ) -> None:
        self.service = service
        self.gate = gate if gate is not None else HealthGate()
        self.policy = policy if policy is not None else RestartPolicy()
        self._tasks: list[SupervisedTask] = []

    def spawn(self, name: str, run: TaskFactory) -> SupervisedTask:
        """Starts `run()` in the background, restarting it whenever it raises.

        Args:
            name: the task's name in logs, health conditions and the metric.
            run: called for each run; must return a new coroutine every time.

        Returns:
            The task's handle (stop it with `stop`, or all of them with `Supervisor.stop`).
        """
        self._tasks = [t for t in self._tasks if not t.done()]
        task = SupervisedTask(self.service, name, run, self.policy, self.gate)
        self._tasks.append(task)
        return task

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stops every task still running, each within `timeout_s`."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await task.stop(timeout_s)
