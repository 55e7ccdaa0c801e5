"""FairThreads: blocking calls on threads of their own, the owners (tenants) taking
turns, each owner's waiting calls bounded, a cancelled caller's call never run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from services.inference.pipeline.fair_threads import FairThreads, QueueFull


async def _until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def _holding(started: threading.Event, gate: threading.Event) -> Callable[[], bool]:
    """Returns a call that says it runs, then holds its thread until `gate` opens."""

    def run() -> bool:
        started.set()
        return gate.wait(10)

    return run


async def test_a_tenant_with_one_call_waits_for_one_call_of_a_busy_tenant_not_its_backlog():
    pool = FairThreads(1, 16, "t-fair")
    gate = threading.Event()
    ran: list[str] = []

    def call(name: str) -> Callable[[], str]:
        def run() -> str:
            gate.wait(10)
            ran.append(name)
            return name

        return run

    started = threading.Event()

    def first() -> str:
        started.set()
        return call("a0")()

    busy = [asyncio.ensure_future(pool.run("a", first))]
    await _until(started.is_set)
    busy += [asyncio.ensure_future(pool.run("a", call(f"a{i}"))) for i in range(1, 6)]
    await _until(lambda: pool.waiting("a") == 5)  # a0 running, five waiting
    late = asyncio.ensure_future(pool.run("b", call("b0")))
    await _until(lambda: pool.waiting("b") == 1)
    gate.set()
    assert await late == "b0"
    await asyncio.gather(*busy)
    # First come first served ran b0 last; in turns it runs right after a1.
    assert ran == ["a0", "a1", "b0", "a2", "a3", "a4", "a5"]


async def test_an_owner_past_its_waiting_bound_is_refused_at_once_others_are_not():
    pool = FairThreads(1, 2, "t-bound")
    gate = threading.Event()
    started = threading.Event()
    calls = [asyncio.ensure_future(pool.run("a", _holding(started, gate)))]
    await _until(started.is_set)
    calls += [asyncio.ensure_future(pool.run("a", lambda: gate.wait(10))) for _ in range(2)]
    await _until(lambda: pool.waiting("a") == 2)  # one running, two waiting
    with pytest.raises(QueueFull):
        await pool.run("a", lambda: True)
    other = asyncio.ensure_future(pool.run("b", lambda: "b"))
    gate.set()
    assert await other == "b"
    assert await asyncio.gather(*calls) == [True, True, True]


async def test_a_cancelled_callers_waiting_call_never_runs_and_errors_reach_the_caller():
    pool = FairThreads(1, 8, "t-cancel")
    gate = threading.Event()
    ran: list[str] = []
    started = threading.Event()
    running = asyncio.ensure_future(pool.run("a", _holding(started, gate)))
    await _until(started.is_set)
    waiting = asyncio.ensure_future(pool.run("a", lambda: ran.append("cancelled one")))
    await _until(lambda: pool.waiting("a") == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.waiting() == 0
    gate.set()
    await running

    def fails() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        await pool.run("a", fails)
    assert ran == []
