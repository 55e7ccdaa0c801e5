"""Request coalescing: identical cacheable requests in flight share one computation.

A `Flight` runs one computation (an async iterator of items: a Generate
stream's messages, or one CompleteResponse) in a task of its own, so that no
caller's cancellation reaches it, and keeps what it produced; every waiter
(the request that started it included) reads the items from the start at
its own pace. A waiter leaving stops only its own reading; when the last one
leaves before the end, the computation is cancelled (its sequences free their
slots). A flight stays joinable until its answer is stored, so a request
arriving in between joins instead of computing again.

A flight also carries what its computation's content policy did: `stops`,
the output rule that stopped each stopped choice. The request that computed
recorded those hits; every waiter that receives a choice's filtered final
records its rule as a hit of its own (services.inference.pipeline.generate).

Coalescing is per worker: prefix-affinity routing sends identical prompts to
the same worker, so identical requests meet here; two that land on two
workers (a worker draining, weights shifting) compute twice, and the second
answer refreshes the cache entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Generic, TypeVar

import numpy as np

from services.inference.pipeline.policy import OutputMatch

T = TypeVar("T")


class LeaderLeft(Exception):
    """LeaderLeft: the computation was cancelled before it ended (its waiters compute
    their own answers)."""


class Flight(Generic[T]):
    """Flight is one computation and what it produced so far (module docstring)."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self.done = False
        self.error: BaseException | None = None
        # It never started: its leader was refused (`fail`) or left. Its waiters then
        # compute their own answer; the computation's own error is theirs too.
        self.refused = False
        self.waiters = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False
        self._release: Callable[[], None] = lambda: None
        # The output rule that stopped each stopped choice, by choice index: the
        # computing request's own (live) record, read by waiters, never written.
        self.stops: Mapping[int, OutputMatch] = {}

    def _publish(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(
        self, items: AsyncIterator[T], finish: Callable[[Flight[T]], Awaitable[None]]
    ) -> None:
        try:
            async for item in items:
                self.items.append(item)
                self._publish()
        except asyncio.CancelledError:
            self.error = LeaderLeft()  # an Exception: a late waiter computes its own
            raise
        except Exception as exc:  # handed to every waiter, which raises it in its own RPC
            self.error = exc
        finally:
            self.done = True
            self._publish()
            close = getattr(items, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            try:
                await finish(self)
            finally:
                self._release()  # stored (or not): no longer joinable

    def start(
        self, items: AsyncIterator[T], finish: Callable[[Flight[T]], Awaitable[None]]
    ) -> None:
        """Starts computing `items`; `finish(flight)` runs once it has ended (stores it)."""
        self._task = asyncio.create_task(self._run(items, finish))

    def fail(self, error: BaseException) -> None:
        """Ends a flight that could not start (its leader was refused): waiters get `error`,
        or LeaderLeft if the leader was cancelled (a waiter then computes its own answer:
        raised as is, its caller's RPC ended as cancelled, although that caller stayed)."""
        self.error = error if isinstance(error, Exception) else LeaderLeft()
        self.refused = True
        self.done = True
        self._publish()
        self._release()

    @property
    def cancelled(self) -> bool:
        """Tells whether its last waiter left before the end (it is being cancelled)."""
        return self._cancelled

    def left_to_waiters(self, error: BaseException) -> bool:
        """Tells whether a waiter that got `error` before any item computes its own
        answer: its leader was refused or left (`refused`, LeaderLeft). Else it is the
        computation's failure, which the waiter's identical request shares: each
        waiter computing again put as many computations on a failing model."""
        return self.refused or isinstance(error, LeaderLeft)

    def follow(self) -> AsyncIterator[T]:
        """Returns a reader of every item from the first (raising the computation's error).

        The waiter counts from this call on: iterate it (or close it) right away.
        """
        self.waiters += 1
        return self._read()

    async def _read(self) -> AsyncIterator[T]:
        position = 0
        try:
            while True:
                changed = self._changed
                if position < len(self.items):
                    item = self.items[position]
                    position += 1
                    yield item
                elif self.done:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    await changed.wait()
        finally:
            self.waiters -= 1
            if self.waiters == 0 and not self.done and self._task is not None:
                self._cancelled = True
                self._task.cancel()  # the last waiter left: nobody wants the rest


class Flights(Generic[T]):
    """Flights are the computations in flight on this worker, by cache key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str) -> Flight[T] | None:
        """Returns the flight computing `key` that a new waiter may still join (None: none)."""
        flight = self._flights.get(key)
        if flight is None or flight.cancelled or (flight.done and flight.error is not None):
            return None
        return flight

    def open(self, key: str, *, register: bool = True) -> Flight[T]:
        """Returns a new flight for `key`, joinable at once (`start` it, or `fail` it).

        Args:
            key: the cache key.
            register: let identical requests join it (False: a no-cache refresh
                while another flight of the key runs).
        """
        flight: Flight[T] = Flight()
        if register:
            self._flights[key] = flight

        def release() -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]

        flight._release = release
        return flight


class EmbeddingInputs:
    """EmbeddingInputs are the embedding inputs being computed on this worker, by cache key.

    A request needing one awaits its future instead of computing it again;
    the computation runs in a task of its own (kept here until it ends), so
    the request that started it may leave without failing the others.
    """

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[np.ndarray]] = {}
        # Computations whose inputs went from pending to stored: a cache read that
        # spans one reads again (see pipeline.embed, `_read_cache`).
        self.stored = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def keep(self, task: asyncio.Task[None]) -> None:
        """Holds a computation's task until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
