"""Background tasks stop even when a cancellation gets lost (as redis-py can lose one)."""

from __future__ import annotations

import asyncio

from services.core.tasks import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_still_stops_promptly():
    swallowed = 0

    async def forgetful_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 1:
                    continue  # like a Redis read whose timeout ate the cancellation
                raise

    task = asyncio.create_task(forgetful_loop())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await cancel_and_wait(task, timeout_s=5)
    assert task.cancelled() and swallowed == 2
    assert asyncio.get_running_loop().time() - started < 1


async def test_a_task_that_will_not_stop_is_given_up_on_after_the_timeout():
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await cancel_and_wait(task, timeout_s=0.2)
    assert not task.done() and asyncio.get_running_loop().time() - started < 1
    release.set()
    task.cancel()  # one more wake-up: it sees the release and ends
    await task
