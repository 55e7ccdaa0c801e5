"""Restarts the local mesh's children that die, the way Kubernetes restarts containers.

A child that exits without being asked to (`Child.stopping` unset) is restarted
by its owner's restart function after a backoff that doubles with each crash in
a row (`RestartPolicy`); a child that served for `reset_after_s` starts a new
streak. Every exit is logged and counted (`ChildRecord`); the owner writes the
records to `run/mesh.json`. The supervisor never gives up: a child that keeps
crashing is retried every `max_s` with an error logged each time, as
CrashLoopBackOff does.

One thread watches for exits; each child name's restarts run on a thread of
their own, so a restart that waits long for its child to serve (a worker
waiting for Redis, up to the owner's startup timeout) neither delays the
restart of another child (that Redis) nor the detection of other exits.

NOTE: a process started by a restart thread gets its parent-death signal when
that *thread* ends (prctl PR_SET_PDEATHSIG follows the thread that forked), so
the restart threads (one per child name, not one per restart) live until
`close()`, which the owner calls once it has stopped every child. An error a
restart does not expect (a bug, or `changed` failing to write mesh.json on a
full disk) therefore does not end its thread: it is logged and marks the
supervisor failed (`alive()` turns False), and the owner stops the whole mesh
rather than run on with a name nobody restarts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.launcher.processes import Child, Interrupted

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
        forget: removes a dead child from its owner's list (thread-safe).
        restart: starts a child again by name and waits until it serves; raises
            RuntimeError, TimeoutError or OSError when it does not come up, and
            Interrupted when its owner is stopping. Called from several threads
            at once, never twice at once for one name.
        changed: called after every exit and restart (e.g. to write mesh.json),
            from any of the supervisor's threads.
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
        self._guard = threading.Lock()  # guards _due and _restarting
        self._due: dict[str, float] = {}  # name -> when to restart it (monotonic)
        # Names handed to their restart thread and not done yet: until then a dead
        # child of that name is the restart's to handle, not the watcher's.
        self._restarting: set[str] = set()
        self._restarters: dict[str, queue.SimpleQueue[bool]] = {}  # watcher thread only
        self._restart_threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        # Set when a restart thread met an error it does not handle: that name is
        # no longer supervised, so the owner must stop the mesh (see alive()).
        self._failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-supervisor", daemon=True)

    def start(self) -> None:
        """Starts watching."""
        for child in self._children():
            self.records.setdefault(child.name, ChildRecord())
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops restarting (children that die from now on stay dead); waits up to
        `timeout_s` for the watching thread to end. Restarts under way go on until
        they fail or succeed; their threads stay until `close()`."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops, then ends the restart threads, waiting up to `timeout_s` in all.

        Call it once every child is stopped: a child a restart thread started
        gets SIGTERM when that thread ends.
        """
        deadline = time.monotonic() + timeout_s
        self.stop(timeout_s)  # the watcher starts no restart thread after this
        for requests in list(self._restarters.values()):
            requests.put(False)
        for thread in self._restart_threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def stopping(self) -> bool:
        """Tells whether stop() was called."""
        return self._stopping.is_set()

    def alive(self) -> bool:
        """Tells whether every child is still supervised: the watching thread and
        every restart thread run, and no restart met an error it does not handle.

        False means a child that dies may stay dead: the owner stops the mesh.
        """
        if self._failed.is_set() or not self._thread.is_alive():
            return False
        # A restart thread ends only at close(); one that ended earlier took the
        # child it started with it (PDEATHSIG) and nothing reads its requests.
        return all(thread.is_alive() for thread in list(self._restart_threads))

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_s):
            for child in self._children():
                if self._died_unasked(child):
                    self._on_exit(child)
            for name in self._take_due():
                self._hand_off(name)

    def _died_unasked(self, child: Child) -> bool:
        return (
            not child.alive()
            and not child.stopping
            and not self.stopping
            and child.name not in self._restarting
        )

    def _take_due(self) -> list[str]:
        """Returns the names whose backoff is over, marking them as being restarted."""
        now = time.monotonic()
        with self._guard:
            if self.stopping:
                return []
            # A name still being restarted waits: its thread may schedule it again
            # (a restart that never started) before it is done with the last one.
            due = [n for n, at in self._due.items() if at <= now and n not in self._restarting]
            for name in due:
                del self._due[name]
                self._restarting.add(name)
        return due

    def _hand_off(self, name: str) -> None:
        """Passes a due restart to the name's restart thread (started on first use)."""
        requests = self._restarters.get(name)
        if requests is None:
            requests = self._restarters[name] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._restart_loop,
                args=(name, requests),
                name=f"mesh-restart-{name}",
                daemon=True,
            )
            # Started before it is listed: alive() reads every listed thread, and one
            # listed but not started yet read as a restart thread that had died (the
            # owner stopped the whole mesh, exit 1, on a first restart; seen in CI).
            thread.start()
            self._restart_threads.append(thread)
        requests.put(True)

    def _restart_loop(self, name: str, requests: queue.SimpleQueue[bool]) -> None:
        # Runs until close() (False): the children it started die with this thread.
        while requests.get():
            try:
                if not self.stopping and not self._failed.is_set():
                    self._restart_once(name)
            except Exception:
                # The thread's error boundary: it must not end (the child it started
                # would get SIGTERM) and must not leave the name silently unsupervised.
                # `restart`'s expected failures are handled in _restart_once; this is a
                # bug or `changed` failing (mesh.json on a full disk), as on the watcher
                # thread: the owner stops the mesh (exit 1) once alive() is False.
                logger.exception("restarting %s hit an unexpected error; supervision failed", name)
                self._failed.set()
            finally:
                with self._guard:
                    self._restarting.discard(name)

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
        """Counts an exit in the streak and sets when to restart; returns the delay."""
        # Only a child that was up (not one whose restart failed or hung) may have
        # served long enough to start a new streak.
        served_s = time.monotonic() - record.serving_since if record.state == "running" else 0.0
        if served_s >= self.policy.reset_after_s:
            record.streak = 0
        record.streak += 1
        record.state = "backoff"
        delay = self.policy.delay(record.streak)
        with self._guard:
            self._due[name] = time.monotonic() + delay
        return delay

    def _restart_once(self, name: str) -> None:
        record = self.records[name]
        record.state = "restarting"
        record.restarts += 1
        try:
            self._restart(name)
        except Interrupted as exc:
            # The owner is stopping: what the restart started is the owner's to stop.
            logger.info("restarting %s stopped: %s", name, exc)
            return
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
        if self.stopping:
            return  # the owner stops what is left
        started = [c for c in self._children() if c.name == name and not c.stopping]
        for child in started:
            if child.alive():
                child.process.kill()
        if not started:
            self._schedule(name, record)
