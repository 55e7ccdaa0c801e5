"""The scheduler's liveness and bookkeeping on the deterministic test engine.

Real continuous batching (the engine thread, slots, the queue); only the
logits are synthetic. Covers: decoding streams progress while prompts keep
arriving, an empty prompt is refused alone, stop() with leftovers leaves no
sequence counted in flight, and a zero queue still serves free slots.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest

from services.core.errors import InvalidArgument, ResourceExhausted
from services.inference.engines.base import StepItem
from services.inference.engines.deterministic import DeterministicTestEngine
from services.inference.prestop import in_flight
from services.inference.sampling import SamplingParams
from services.inference.scheduler import (
    PRIORITY_INTERACTIVE,
    Finished,
    Scheduler,
    SchedulerLimits,
    Sequence_,
)
from services.inference.tokenizer import WordTokenizer

TOKENIZER = WordTokenizer()
_LABELS = itertools.count()


class RecordingEngine(DeterministicTestEngine):
    """The test engine, recording the slots of each step's batch."""

    def __init__(self, step_s: float = 0.0) -> None:
        super().__init__(vocab_size=len(TOKENIZER.words), context_length=512, step_s=step_s)
        self.batches: list[list[StepItem]] = []

    def warm_up(self, max_slots: int = 1) -> None:
        super().warm_up(max_slots)
        self.batches.clear()

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        self.batches.append(list(items))
        return super().forward(items)


def _params(**overrides: Any) -> SamplingParams:
    values: dict[str, Any] = dict(
        max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, seed=3, stop=()
    )
    values.update(overrides)
    return SamplingParams(**values)


def _labels() -> tuple[str, str]:
    """Returns metric labels no other scheduler of this process uses."""
    return (f"liveness-{next(_LABELS)}", "1")


async def _finished(seq: Sequence_, timeout_s: float = 10.0) -> Finished:
    """Reads `seq`'s outbox until its Finished (bounded in time)."""
    async with asyncio.timeout(timeout_s):
        while True:
            for item in await seq.outbox.take():
                if isinstance(item, Finished):
                    return item


async def test_a_decoding_stream_progresses_while_one_token_requests_keep_arriving() -> None:
    # The reviewer's reproduction: 10 ms steps, 8 slots, a max_tokens=1 request
    # every 5 ms. Each short one ends in its own prefill step and frees its
    # slot, so a new prompt is waiting at every step boundary; a prefill-only
    # step each time starved the long stream (1 token in 1.5 s).
    engine = RecordingEngine(step_s=0.01)
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=8), _labels())
    await sched.start()
    try:
        ids = TOKENIZER.encode("hello mesh")
        long = sched.submit(ids, _params(max_tokens=20), PRIORITY_INTERACTIVE, None)
        first = await asyncio.wait_for(long.outbox.get(), 5)
        assert isinstance(first, int)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0  # unloaded: 20 steps, ~0.2 s
        short: list[Sequence_] = []
        while long.finished is None and loop.time() < deadline and len(short) < 1000:
            short.append(sched.submit([7], _params(max_tokens=1), PRIORITY_INTERACTIVE, None))
            await asyncio.sleep(0.005)  # the arrival rate of the load, not a wait for state
        assert long.finished == Finished("length"), f"{len(long.generated)} tokens in 3 s"
        assert len(short) >= 10  # the load really overlapped the stream
        # Structurally: from its first decode on, the long stream's slot is in
        # at least every second step until its last token.
        steps = [[item.slot for item in batch if item.start > 0] for batch in engine.batches]
        with_long = [i for i, slots in enumerate(steps) if long.slot in slots]
        assert len(with_long) == 19  # 20 tokens: one prefill, 19 decodes
        assert max(b - a for a, b in itertools.pairwise(with_long)) <= 2
        for seq in short:  # and the load was served
            assert await _finished(seq) == Finished("length")
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_prompts_that_arrive_after_a_prefill_wait_at_most_one_decode_step() -> None:
    engine = RecordingEngine(step_s=0.002)
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=4), _labels())
    await sched.start()
    try:
        long = sched.submit([1, 2], _params(max_tokens=200), PRIORITY_INTERACTIVE, None)
        await asyncio.wait_for(long.outbox.get(), 5)
        short = sched.submit([3], _params(max_tokens=2), PRIORITY_INTERACTIVE, None)
        assert await _finished(short) == Finished("length")
        prefill = next(i for i, b in enumerate(engine.batches) if b[0].token_ids == [3])
        # A prefill-only step of its own, at most one step after it joined.
        assert [item.start for item in engine.batches[prefill]] == [0]
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_an_empty_prompt_is_refused_and_the_others_in_its_step_complete() -> None:
    engine = RecordingEngine(step_s=0.005)
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=4), _labels())
    await sched.start()
    try:
        valid = sched.submit([5, 6, 7], _params(max_tokens=3), PRIORITY_INTERACTIVE, None)
        with pytest.raises(InvalidArgument) as refused:
            sched.submit([], _params(max_tokens=3), PRIORITY_INTERACTIVE, None)
        assert refused.value.reason == "EMPTY_PROMPT"
        assert [v.field for v in refused.value.violations] == ["prompt"]
        assert await _finished(valid) == Finished("length")
        assert len(valid.generated) == 3
    finally:
        await sched.stop(drain_timeout_s=0)


def _in_flight_of(labels: tuple[str, str]) -> float:
    """Returns what the preStop hook reads from /metrics, for this scheduler's series."""
    text = generate_latest(REGISTRY).decode()
    mine = (f'model="{labels[0]}"', f'version="{labels[1]}"')  # labels are sorted by name
    return in_flight(
        "\n".join(
            line
            for line in text.splitlines()
            if line.startswith("#") or all(label in line for label in mine)
        )
        + "\n"
    )


async def test_stop_with_leftovers_leaves_nothing_counted_in_flight() -> None:
    engine = RecordingEngine(step_s=0.01)
    labels = _labels()
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=1), labels)
    await sched.start()
    running = sched.submit([1], _params(max_tokens=500), PRIORITY_INTERACTIVE, None)
    waiting = sched.submit([2], _params(max_tokens=500), PRIORITY_INTERACTIVE, None)
    await asyncio.wait_for(running.outbox.get(), 5)
    async with asyncio.timeout(5):  # both counted: one running, one queued
        while _in_flight_of(labels) < 2:
            await asyncio.sleep(0.01)
    await sched.stop(drain_timeout_s=0.1)  # neither can finish in 0.1 s: leftovers
    for seq, reason in ((running, "MODEL_UNLOADED"), (waiting, "MODEL_UNLOADING")):
        finished = await _finished(seq)
        assert finished.reason == "error" and finished.error is not None
        assert finished.error.reason == reason  # the waiting one was refused, never ran
    # The stopped version's series are gone (not left at their last values).
    assert (
        REGISTRY.get_sample_value("tokenmesh_running_sequences", dict(model=labels[0], version="1"))
        is None
    )
    for priority in ("interactive", "batch"):
        series = dict(model=labels[0], version="1", priority=priority)
        assert REGISTRY.get_sample_value("tokenmesh_queue_depth", series) is None
    assert _in_flight_of(labels) == 0
    assert sched.stats()["waiting"] == 0 and sched.stats()["running"] == 0


async def test_a_zero_queue_admits_what_free_slots_take_and_refuses_the_rest() -> None:
    engine = RecordingEngine(step_s=0.01)
    limits = SchedulerLimits(max_sequences=2, max_queue=0)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        first = sched.submit([1], _params(max_tokens=300), PRIORITY_INTERACTIVE, None)
        second = sched.submit([2], _params(max_tokens=300), PRIORITY_INTERACTIVE, None)
        with pytest.raises(ResourceExhausted) as refused:  # both slots are spoken for
            sched.submit([3], _params(max_tokens=1), PRIORITY_INTERACTIVE, None)
        assert refused.value.reason == "QUEUE_FULL"
        for seq in (first, second):
            assert isinstance(await asyncio.wait_for(seq.outbox.get(), 5), int)
        sched.cancel(first)
        assert await _finished(first) == Finished("cancelled")
        async with asyncio.timeout(5):  # the slot is free again once the step reaped it
            while sched.stats()["slots_free"] == 0:
                await asyncio.sleep(0.005)
        third = sched.submit([3], _params(max_tokens=1), PRIORITY_INTERACTIVE, None)
        assert await _finished(third) == Finished("length")
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_prefill_step_never_carries_more_than_the_prefill_budget() -> None:
    # Prompts admitted at a boundary before a forced decode step waited, unprefilled,
    # while the next boundary admitted a full budget more: the next prefill step
    # carried twice max_prefill_tokens (twice the ITL hit it bounds).
    engine = RecordingEngine(step_s=0.002)
    limits = SchedulerLimits(max_sequences=16, max_prefill_tokens=8)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        long = sched.submit([1, 2], _params(max_tokens=100), PRIORITY_INTERACTIVE, None)
        await asyncio.wait_for(long.outbox.get(), 5)
        prompts = [
            sched.submit([3, 4, 5, 6, 7], _params(max_tokens=40), PRIORITY_INTERACTIVE, None)
            for _ in range(12)
        ]
        for seq in prompts:
            assert await _finished(seq) == Finished("length")
        prefills = [b for b in engine.batches if all(item.start == 0 for item in b)]
        assert sum(1 for b in prefills for i in b if i.token_ids == [3, 4, 5, 6, 7]) == 12
        oversized = [b for b in prefills if len(b) > 1 and sum(len(i.token_ids) for i in b) > 8]
        assert oversized == []
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_step_that_keeps_failing_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    """A fault that stays (every step fails) was retried at once, forever: the engine
    thread spun at a whole core and logged ~5,000 tracebacks a second."""
    engine = RecordingEngine()
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=1), _labels())
    steps = 0

    def broken() -> None:
        nonlocal steps
        steps += 1
        raise RuntimeError("a fault that stays")

    sched._iterate = broken  # type: ignore[method-assign]
    await sched.start()
    try:
        seq = sched.submit([1], _params(), PRIORITY_INTERACTIVE, None)
        finished = await _finished(seq)  # failed at once, not after the backoff
        assert finished.reason == "error"
        await asyncio.sleep(1.0)  # how often it tries again (the fault stays)
    finally:
        await sched.stop(drain_timeout_s=0)
    assert steps <= 15, steps  # 10 ms doubling to 1 s: ~8 in a second
    logged = [r for r in caplog.records if "scheduler step failed" in r.getMessage()]
    assert len(logged) <= 3
