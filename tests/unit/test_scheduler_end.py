"""Scheduler.end: a sequence's stream ended now with an error, its slot freed.

The worker's shutdown ends the streams still running this way shortly before
its grace is over (services.inference.pipeline.stream.end_streams), so that
they end with a final message instead of grpc's cancel. The deterministic test
engine on the real engine thread, one slot.
"""

from __future__ import annotations

import asyncio

import pytest

from services.core.errors import Unavailable
from services.inference.generation import GenerationState, _split, stream_deltas
from services.inference.scheduler import PRIORITY_INTERACTIVE, Finished
from tests.unit.test_scheduler_unload import TOKENIZER, _end, _params, _scheduler


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


async def test_the_tokens_handed_over_before_the_end_reach_the_reader_as_text_then_the_error() -> (
    None
):
    # The reader was a step behind when the stream was ended: its outbox held tokens,
    # then the error. They were billed (counted) but their text never sent: the
    # error was raised first.
    sched = _scheduler(step_s=0.02)
    await sched.start()
    try:
        seq = sched.submit([1], _params(400), PRIORITY_INTERACTIVE, None)
        async with asyncio.timeout(5):
            while seq.outbox.empty():  # unread tokens wait
                await asyncio.sleep(0.005)
        error = Unavailable("stopping", reason="WORKER_STOPPING")
        sched.end(seq, error)
        state = GenerationState(prompt_tokens=1)
        sent: list[int] = []
        text = ""
        with pytest.raises(Unavailable):
            async for delta in stream_deltas(sched, seq, TOKENIZER, (), state):
                sent += delta.token_ids
                text += delta.text
        assert sent and len(sent) == state.completion_tokens
        assert text == TOKENIZER.decode(sent)
    finally:
        await sched.stop(drain_timeout_s=0)


def test_tokens_after_the_end_are_not_the_streams() -> None:
    # Scheduler.end's error lands at once; the step then running may still hand
    # over a token after it, which was counted (billed) though never sent.
    error = Finished("error", Unavailable("stopping"))
    assert _split([4, 5, error, 6]) == ([4, 5], error)
    assert _split([4, 5]) == ([4, 5], None)
    assert _split([error]) == ([], error)
