"""A choice's stop does not depend on how many tokens its reader found waiting.

The real scheduler runs a scripted engine whose steps the test releases, so
each delivery (one token per read, two, all at once) is exact, not a timing
accident; the stream then decodes with demo-lm's real tokenizer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import pytest

from services.inference.engines.base import StepItem
from services.inference.generation import Delta, GenerationState, stream_deltas
from services.inference.scheduler import (
    PRIORITY_INTERACTIVE,
    Finished,
    Scheduler,
    SchedulerLimits,
    Sequence_,
)
from services.inference.tokenizer import HuggingFaceTokenizer, Tokenizer
from tests.unit.test_generation_window_stops import (
    DEMO_TOKENIZER,
    ScriptedEngine,
    WindowOnlyTokenizer,
)
from tests.unit.test_scheduler_liveness import _labels, _params

# " and t" starts before "and" but is completed only by " there", a token
# after the one ("and") that completes "and": the choice ends at " and".
STOPS = (" and t", "and")
ANSWER = " be light: and there was light"
EXPECTED_TEXT = " be light: "
DEADLINE_S = 10.0


class GatedEngine(ScriptedEngine):
    """ScriptedEngine whose steps wait for `release` once `gated` (warm-up runs free)."""

    def __init__(self, script: Sequence[int], filler: int, vocab_size: int) -> None:
        super().__init__(script, filler, vocab_size)
        self.step_s = 0.0
        self.gated = False
        self._steps = threading.Semaphore(0)

    def release(self, steps: int = 1) -> None:
        self._steps.release(steps)

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        # Bounded: a step the test never releases (after the stop) must not
        # hang the scheduler's shutdown.
        if self.gated and not self._steps.acquire(timeout=DEADLINE_S):
            raise TimeoutError("the test released no step")
        return super().forward(items)


Reader = Callable[[Sequence_, GenerationState], Coroutine[Any, Any, list[Delta]]]


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.001)


async def _one_token_per_read(
    engine: GatedEngine, seqs: list[Sequence_], states: list[GenerationState], read: Reader
) -> list[list[Delta]]:
    # The next step runs only once the reader has taken (and counted) every
    # token so far: each read finds exactly one.
    reading = asyncio.create_task(read(seqs[0], states[0]))
    released = 0
    while not reading.done():
        engine.release()
        released += 1
        await _until(_took(reading, states[0], released), f"the reader never took {released}")
    return [await reading]


async def _two_tokens_per_read(
    engine: GatedEngine, seqs: list[Sequence_], states: list[GenerationState], read: Reader
) -> list[list[Delta]]:
    # Two running sequences and one stream message a step: each stream gets
    # its tokens two at a time after the first (more if its reader lags).
    engine.release(1000)
    return list(await asyncio.gather(*map(read, seqs, states)))


async def _all_at_once(
    engine: GatedEngine, seqs: list[Sequence_], states: list[GenerationState], read: Reader
) -> list[list[Delta]]:
    # The whole answer lands in the outbox before the first read.
    engine.release(1000)
    await _until(
        lambda: any(isinstance(i, Finished) for i in seqs[0].outbox._items),
        "the sequence never finished",
    )
    return [await read(seqs[0], states[0])]


def _took(
    reading: asyncio.Task[list[Delta]], state: GenerationState, count: int
) -> Callable[[], bool]:
    """Returns a condition: the reader is done, or has taken `count` tokens."""
    return lambda: reading.done() or state.completion_tokens == count


# delivery: (how, streams, tokens per read until the stop; two-per-read: the usual ones)
DELIVERIES = {
    "one-per-read": (_one_token_per_read, 1, [[1, 1, 1, 1]]),
    "two-per-read": (_two_tokens_per_read, 2, [[1, 2, 1], [1, 2, 1]]),
    "all-at-once": (_all_at_once, 1, [[4]]),
}


async def _answers(
    tokenizer: Tokenizer, script: list[int], delivery: str
) -> tuple[list[tuple[str, list[int], str, int]], list[list[int]]]:
    """Returns each stream's (text, token ids, finish reason, billed tokens), and
    how many tokens each of its reads took."""
    deliver, streams, _ = DELIVERIES[delivery]
    engine = GatedEngine(script, script[-1], _vocab_size())
    limits = SchedulerLimits(max_sequences=streams, messages_per_step=1)
    sched = Scheduler(engine, -1, limits, _labels())
    await sched.start()
    engine.gated = True
    try:
        params = _params(max_tokens=len(script), temperature=0.0, stop=STOPS)
        states = [GenerationState(prompt_tokens=1) for _ in range(streams)]
        seqs = [sched.submit([script[0]], params, PRIORITY_INTERACTIVE, None) for _ in states]

        async def read(seq: Sequence_, state: GenerationState) -> list[Delta]:
            return [d async for d in stream_deltas(sched, seq, tokenizer, params.stop, state)]

        results = await deliver(engine, seqs, states, read)
    finally:
        engine.release(1000)
        await sched.stop(drain_timeout_s=0)
    answers = [
        (
            "".join(d.text for d in deltas),
            [t for d in deltas for t in d.token_ids],
            deltas[-1].finish_reason,
            state.completion_tokens,
        )
        for deltas, state in zip(results, states, strict=True)
    ]
    # Every read yields one delta (held-back text makes it empty, not absent).
    return answers, [[len(d.token_ids) for d in deltas] for deltas in results]


def _vocab_size() -> int:
    pieces = HuggingFaceTokenizer(DEMO_TOKENIZER).piece_bytes()
    assert pieces is not None
    return len(pieces)


@pytest.mark.parametrize("window", [False, True], ids=["byte-decoder", "window-decoder"])
@pytest.mark.parametrize("delivery", list(DELIVERIES))
async def test_a_stop_ends_the_choice_alike_however_its_tokens_are_read(
    window: bool, delivery: str
) -> None:
    tokenizer: Tokenizer = (
        WindowOnlyTokenizer(DEMO_TOKENIZER) if window else HuggingFaceTokenizer(DEMO_TOKENIZER)
    )
    script = tokenizer.encode(ANSWER)
    assert [tokenizer.decode([t]) for t in script[:5]] == [" be", " light", ":", " and", " there"]
    through_and = script[:4]  # "and" is complete with " and"; " and t" needs " there"
    answers, reads = await _answers(tokenizer, script, delivery)
    if delivery == "two-per-read":  # a lagging reader there may take more at once
        assert all(len(r) < len(through_and) for r in reads), reads
    else:
        assert reads == DELIVERIES[delivery][2]
    for answer in answers:
        assert answer == (EXPECTED_TEXT, through_and, "stop", len(through_and))
