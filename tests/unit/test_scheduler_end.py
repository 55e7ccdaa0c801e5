"""Scheduler.end: a sequence's stream ended now with an error, its slot freed.

The worker's shutdown ends the streams still running this way shortly before
its grace is over (services.inference.pipeline.stream.end_streams), so that
they end with a final message instead of grpc's cancel. The deterministic test
engine on the real engine thread, one slot.
"""

from __future__ import annotations

import asyncio

from services.core.errors import Unavailable
from services.inference.scheduler import PRIORITY_INTERACTIVE, Finished
from tests.unit.test_scheduler_unload import _end, _params, _scheduler


async def test_an_ended_sequence_reads_its_error_at_once_and_frees_its_slot() -> None:
    sched = _scheduler(step_s=0.05)
    await sched.start()
    try:
        running = sched.submit([1], _params(400), PRIORITY_INTERACTIVE, None)  # 20 s
        waiting = sched.submit([2], _params(2), PRIORITY_INTERACTIVE, None)
        await asyncio.wait_for(running.outbox.get(), 5)  # it runs; the other waits
        error = Unavailable("stopping", reason="WORKER_STOPPING")
        sched.end(running, error)
        ended, _ = await _end(running)
        assert ended == Finished("error", error)
        # Its slot went back as a cancelled sequence's: the waiting one runs to its end.
        done, tokens = await _end(waiting)
        assert done == Finished("length") and tokens == 2
        sched.end(waiting, error)  # it ended already: left as it is
        assert waiting.outbox.empty()
    finally:
        await sched.stop(drain_timeout_s=0)
