"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

RECANCEL_EVERY_S = 0.05


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
    if task.done() and not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()  # retrieved: no "exception was never retrieved" noise
