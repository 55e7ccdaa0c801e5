"""A few threads of their own that take turns between the tenants waiting for them.

The content stage checks large inputs on threads (services.inference.pipeline.content).
A thread pool serves its queue first come first served: one tenant's burst of large
checks (up to policy.CHECK_BUDGET_S of CPU each) put every other tenant's check
behind all of it, for as long as the burst lasted, and the waiting requests, with
their texts, had no bound. Here each tenant has a queue of its own, bounded, and the
threads take the next call from the tenants in turn (round robin over the tenants
with calls waiting: a tenant with one call waits for at most one call of each other
tenant, whatever their backlogs).

A call whose caller is cancelled (its deadline, the client gone) while it waits is
dropped from its queue and never runs; one already running ends on its own (the
check's CPU budget bounds it), its result discarded.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """QueueFull: the tenant already has `max_waiting` calls waiting."""


@dataclass(eq=False)
class _Call(Generic[T]):
    run: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()


class FairThreads:
    """Runs blocking calls on `threads` daemon threads, taking turns between owners.

    Args:
        threads: calls running at once.
        max_waiting: calls one owner may have waiting (not running); past it `run`
            raises QueueFull at once.
        name: the threads' name prefix.
    """

    def __init__(self, threads: int, max_waiting: int, name: str) -> None:
        self.threads = threads
        self.max_waiting = max_waiting
        self.name = name
        self._ready = threading.Condition()
        self._queues: dict[str, collections.deque[_Call[Any]]] = {}
        self._turns: collections.deque[str] = collections.deque()  # owners with calls waiting
        self._started = 0

    def waiting(self, owner: str | None = None) -> int:
        """Returns the calls waiting for a thread: `owner`'s, or everyone's."""
        with self._ready:
            if owner is not None:
                return len(self._queues.get(owner, ()))
            return sum(len(queue) for queue in self._queues.values())

    async def run(self, owner: str, call: Callable[[], T]) -> T:
        """Runs `call` on a thread when `owner`'s turn comes; returns its result.

        Raises:
            QueueFull: `owner` already has max_waiting calls waiting.
        """
        job: _Call[T] = _Call(call, asyncio.get_running_loop())
        with self._ready:
            queue = self._queues.setdefault(owner, collections.deque())
            if len(queue) >= self.max_waiting:
                raise QueueFull(f"{len(queue)} calls of this tenant are waiting")
            queue.append(job)
            if len(queue) == 1:
                self._turns.append(owner)
            self._start_threads()
            self._ready.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._forget(owner, job)
            raise

    def _start_threads(self) -> None:
        """Starts the threads on first use (under the lock): daemons, so a check still
        running does not hold the process's exit."""
        while self._started < self.threads:
            self._started += 1
            threading.Thread(
                target=self._serve, name=f"{self.name}-{self._started}", daemon=True
            ).start()

    def _forget(self, owner: str, job: _Call[Any]) -> None:
        """Drops a call its caller no longer waits for, if it is still waiting."""
        with self._ready:
            queue = self._queues.get(owner)
            if queue is None or job not in queue:
                return  # running or done: its result is discarded
            queue.remove(job)
            if not queue:
                del self._queues[owner]
                self._turns.remove(owner)

    def _next(self) -> _Call[Any]:
        """Waits for a call; takes the one of the owner whose turn it is (under the lock)."""
        while not self._turns:
            self._ready.wait()
        owner = self._turns.popleft()
        queue = self._queues[owner]
        job = queue.popleft()
        if queue:
            self._turns.append(owner)  # its next call waits for everyone else's turn
        else:
            del self._queues[owner]
        return job

    def _serve(self) -> None:
        while True:
            with self._ready:
                job = self._next()
            try:
                result = job.run()
            except BaseException as exc:  # handed to the caller, as an executor does
                self._settle(job, None, exc)
            else:
                self._settle(job, result, None)

    @staticmethod
    def _settle(job: _Call[Any], result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():  # the caller was cancelled meanwhile
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # its event loop is closed: nobody waits for it
            pass
