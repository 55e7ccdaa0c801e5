"""An unloading scheduler refuses what waits at once and lets what runs finish.

The deterministic test engine on the real engine thread, one slot: a request
waiting for it when the unload began waited until the running one ended, then
ran into the drain timeout, which killed it (MODEL_UNLOADED, billed what it had
computed, not tried again elsewhere). It never started, so it is refused as a
new request is: UNAVAILABLE, MODEL_UNLOADING, at once.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from services.inference.engines.deterministic import DeterministicTestEngine
from services.inference.sampling import SamplingParams
from services.inference.scheduler import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    UNLOADING,
    Finished,
    Scheduler,
    SchedulerLimits,
    Sequence_,
    refused_unstarted,
)
from services.inference.tokenizer import WordTokenizer

TOKENIZER = WordTokenizer()
_LABELS = itertools.count()
RUNNING_TOKENS = 100  # 1 s of 10 ms steps: the refusal comes long before its end


def _params(max_tokens: int) -> SamplingParams:
    values: dict[str, Any] = dict(
        max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=3, stop=()
    )
    return SamplingParams(**values)


def _scheduler(step_s: float = 0.01) -> Scheduler:
    engine = DeterministicTestEngine(
        vocab_size=len(TOKENIZER.words), context_length=512, step_s=step_s
    )
    labels = (f"unload-test-{next(_LABELS)}", "1")
    return Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=1), labels)


async def _end(seq: Sequence_) -> tuple[Finished, int]:
    """Reads `seq`'s outbox to its end: its Finished and the tokens before it."""
    tokens = 0
    async with asyncio.timeout(10):
        while True:
            for item in await seq.outbox.take():
                if isinstance(item, Finished):
                    return item, tokens
                tokens += 1


async def test_an_unload_refuses_the_waiting_requests_at_once_and_finishes_the_running():
    sched = _scheduler()
    await sched.start()
    running = sched.submit([1], _params(RUNNING_TOKENS), PRIORITY_INTERACTIVE, None)
    waiting = [
        sched.submit([2], _params(5), PRIORITY_INTERACTIVE, None),
        sched.submit([3], _params(5), PRIORITY_BATCH, 60.0),
    ]
    await asyncio.wait_for(running.outbox.get(), 5)  # it runs; the others wait
    stopping = asyncio.ensure_future(sched.stop(drain_timeout_s=30))
    for seq in waiting:
        finished, tokens = await _end(seq)
        assert finished.reason == "error" and finished.error is not None
        assert finished.error.reason == UNLOADING
        assert finished.error.retry_after_s == 1.0
        assert tokens == 0 and seq.started_at is None
    # Refused while the running one still runs (it waited for its end before).
    assert running.finished is None and not stopping.done()
    assert sched.stats()["waiting"] == 0
    finished, tokens = await _end(running)
    assert finished == Finished("length")
    assert tokens == RUNNING_TOKENS - 1  # its first token was read above
    await asyncio.wait_for(stopping, 5)
    assert refused_unstarted(waiting)
    assert not refused_unstarted([running])
    assert not refused_unstarted([running, *waiting])  # a sibling ran: billed as before


async def test_a_drain_of_nothing_refuses_the_waiting_and_ends_the_running_unloaded():
    # The worker's own stop (drain 0 s): the running one is cut, the waiting one refused.
    sched = _scheduler()
    await sched.start()
    running = sched.submit([1], _params(RUNNING_TOKENS), PRIORITY_INTERACTIVE, None)
    queued = sched.submit([2], _params(5), PRIORITY_INTERACTIVE, None)
    await asyncio.wait_for(running.outbox.get(), 5)
    await sched.stop(drain_timeout_s=0)
    ran, _ = await _end(running)
    refused, _ = await _end(queued)
    assert ran.error is not None and ran.error.reason == "MODEL_UNLOADED"
    assert refused.error is not None and refused.error.reason == UNLOADING
    assert refused_unstarted([queued]) and not refused_unstarted([running])


async def test_a_request_that_ended_otherwise_is_not_taken_for_refused():
    sched = _scheduler(step_s=0.0)
    await sched.start()
    try:
        done = sched.submit([1], _params(3), PRIORITY_INTERACTIVE, None)
        assert (await _end(done))[0] == Finished("length")
        assert not refused_unstarted([done])
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_drain_that_runs_out_ends_every_running_sequence():
    """Past the drain, stop ended the running sequences in a loop over the list each
    end removed from: every second one got no end, its stream open until its own
    deadline (or for good), no usage, its reservation held."""
    engine = DeterministicTestEngine(
        vocab_size=len(TOKENIZER.words), context_length=512, step_s=0.01
    )
    labels = (f"unload-test-{next(_LABELS)}", "1")
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=4), labels)
    await sched.start()
    running = [
        sched.submit([1 + i], _params(RUNNING_TOKENS), PRIORITY_INTERACTIVE, None) for i in range(4)
    ]
    for seq in running:  # every one has started
        await asyncio.wait_for(seq.outbox.get(), 5)
    await sched.stop(drain_timeout_s=0.05)
    for seq in running:
        finished, _ = await _end(seq)
        assert finished.error is not None and finished.error.reason == "MODEL_UNLOADED"
    assert sched.stats()["running"] == 0
