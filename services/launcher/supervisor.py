"""Restarts the local mesh's children that die, the way Kubernetes restarts containers.

A child that exits without being asked to (`Child.stopping` unset) is restarted
by its owner's restart function after a backoff that doubles with each crash in
a row (`RestartPolicy`); a child that served for `reset_after_s` starts a new
streak. Every exit is logged and counted (`ChildRecord`); the owner writes the
records to `run/mesh.json`. The supervisor never gives up: a child that keeps
crashing is retried every `max_s` with an error logged each time, as
CrashLoopBackOff does.

NOTE: a process started by the supervisor thread gets its parent-death signal
when that *thread* ends (prctl PR_SET_PDEATHSIG follows the thread that forked),
so the thread lives until the owner has stopped every child.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.launcher.processes import Child

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """RestartPolicy says how long to wait before restarting a child that died."""

    base_s: float = 0.5  # the delay before the first restart of a streak
    max_s: float = 30.0  # the delay doubles per crash in a row up to this
    reset_after_s: float = 10.0  # a child that ran this long starts a new streak

    def delay(self, streak: int) -> float:
        """Returns the delay before restart number `streak` (1, 2, ...) of a streak."""
        return float(min(self.base_s * 2 ** max(streak - 1, 0), self.max_s))


@dataclass
class ChildRecord:
    """ChildRecord is what the supervisor knows about one child name."""

    restarts: int = 0  # restarts done by the supervisor
    last_exit_code: int | None = None  # of the last unexpected exit (negative: a signal)
    streak: int = 0  # unexpected exits in a row (reset once a child runs reset_after_s)
    state: str = "running"  # running | backoff | restarting
    # When the child last came up (served), not when it was spawned: one whose start
    # takes reset_after_s (a worker loading its models) and which dies once up would
    # otherwise start a new streak at every crash and be restarted at base_s forever.
    serving_since: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        """Returns the record as mesh.json shows it."""
        return {
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "state": self.state,
        }


class Supervisor:
    """Supervisor watches children from one thread and restarts those that die.

    Args:
        children: returns a snapshot of the running children (thread-safe).
        forget: removes a dead child from its owner's list.
        restart: starts a child again by name and waits until it serves; raises
            RuntimeError, TimeoutError or OSError when it does not come up.
        changed: called after every exit and restart (e.g. to write mesh.json).
        policy: the backoff.
    """

    def __init__(
        self,
        children: Callable[[], list[Child]],
        forget: Callable[[Child], None],
        restart: Callable[[str], None],
        changed: Callable[[], None],
        policy: RestartPolicy,
        poll_s: float = 0.1,
    ) -> None:
        self._children = children
        self._forget = forget
        self._restart = restart
        self._changed = changed
        self.policy = policy
        self._poll_s = poll_s
        self.records: dict[str, ChildRecord] = {}
        self._due: dict[str, float] = {}  # name -> when to restart it (monotonic)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-supervisor", daemon=True)

    def start(self) -> None:
        """Starts watching."""
        for child in self._children():
            self.records.setdefault(child.name, ChildRecord())
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops restarting (children that die from now on stay dead) and ends the thread."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def stopping(self) -> bool:
        """Tells whether stop() was called."""
        return self._stopping.is_set()

    def alive(self) -> bool:
        """Tells whether the watching thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_s):
            for child in self._children():
                if not child.alive() and not child.stopping and not self.stopping:
                    self._on_exit(child)
            for name, due in list(self._due.items()):
                if due <= time.monotonic() and not self.stopping:
                    del self._due[name]
                    self._restart_once(name)

    def _on_exit(self, child: Child) -> None:
        self._forget(child)
        record = self.records.setdefault(child.name, ChildRecord())
        record.last_exit_code = child.process.returncode
        delay = self._schedule(child.name, record)
        log = logger.warning if record.streak == 1 else logger.error
        log(
            "%s (pid %d) exited with %s; restarting in %.1fs (exit %d in a row)",
            child.name,
            child.pid,
            child.process.returncode,
            delay,
            record.streak,
        )
        self._changed()

    def _schedule(self, name: str, record: ChildRecord) -> float:
        # Only a child that was up (not one whose restart failed or hung) may have
        # served long enough to start a new streak.
        served_s = time.monotonic() - record.serving_since if record.state == "running" else 0.0
        if served_s >= self.policy.reset_after_s:
            record.streak = 0
        record.streak += 1
        record.state = "backoff"
        delay = self.policy.delay(record.streak)
        self._due[name] = time.monotonic() + delay
        return delay

    def _restart_once(self, name: str) -> None:
        record = self.records[name]
        record.state = "restarting"
        record.restarts += 1
        try:
            self._restart(name)
        except (RuntimeError, TimeoutError, OSError) as exc:
            logger.error("restarting %s failed: %s", name, exc)
            self._after_failed_restart(name, record)
            self._changed()
            return
        record.serving_since = time.monotonic()
        record.state = "running"
        logger.info("restarted %s (restart %d)", name, record.restarts)
        self._changed()

    def _after_failed_restart(self, name: str, record: ChildRecord) -> None:
        # A child that hangs is killed: the next poll finds it dead and backs
        # off further. One that never started is scheduled again here.
        started = [c for c in self._children() if c.name == name and not c.stopping]
        for child in started:
            if child.alive():
                child.process.kill()
        if not started:
            self._schedule(name, record)
