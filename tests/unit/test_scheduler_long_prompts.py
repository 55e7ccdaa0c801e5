"""Prompts longer than the prefill budget, on the deterministic test engine.

Real continuous batching (the engine thread, slots, the prefill budget,
tenant fairness). Covers: a prompt longer than max_prefill_tokens starts
while others run, as the only prefill of its step, and the requests behind it
start meanwhile instead of waiting for the running batch to drain.
"""

from __future__ import annotations

import asyncio

from services.inference.engines.base import StepItem
from services.inference.scheduler import (
    PRIORITY_INTERACTIVE,
    Finished,
    Scheduler,
    SchedulerLimits,
    Sequence_,
)
from tests.unit.test_scheduler_liveness import RecordingEngine, _finished, _labels, _params

BUDGET = 16


def _prefill_step(engine: RecordingEngine, prompt: list[int]) -> int:
    """Returns the index of the (only) step that prefilled `prompt`."""
    (index,) = [
        i
        for i, batch in enumerate(engine.batches)
        if any(item.start == 0 and list(item.token_ids) == prompt for item in batch)
    ]
    return index


def _prefill_steps(engine: RecordingEngine) -> list[list[StepItem]]:
    return [batch for batch in engine.batches if all(item.start == 0 for item in batch)]


async def test_a_prompt_longer_than_the_prefill_budget_starts_alone_and_blocks_nobody() -> None:
    # The reviewer's reproduction: 8 slots, a 16-token prefill budget, one stream
    # running. A 19-token prompt never fits what is left of a step's budget: it
    # waited at the head of the queue for an empty batch, and every request
    # behind it (free slots, other tenants, 1-token prompts) waited with it until
    # the running stream had ended.
    engine = RecordingEngine(step_s=0.002)
    limits = SchedulerLimits(max_sequences=8, max_prefill_tokens=BUDGET)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()

    def submit(prompt: list[int], max_tokens: int, tenant: str) -> Sequence_:
        params = _params(max_tokens=max_tokens)
        return sched.submit(prompt, params, PRIORITY_INTERACTIVE, None, tenant=tenant)

    try:
        long = submit([1, 2], 100, "a")
        assert isinstance(await asyncio.wait_for(long.outbox.get(), 5), int)
        # Two short prompts rank first (lower ids, equally served tenants): the long
        # one finds the budget partly spent, then starts at a later boundary.
        short_prompts = [[3 + i] for i in range(4)]
        big_prompt = list(range(1, BUDGET + 4))
        early = [submit(p, 1, f"c{i}") for i, p in enumerate(short_prompts[:2])]
        big = submit(big_prompt, 1, "b")
        late = [submit(p, 1, f"d{i}") for i, p in enumerate(short_prompts[2:])]
        for seq in (*early, big, *late):
            assert await _finished(seq) == Finished("length")
        assert await _finished(long) == Finished("length")

        big_step = _prefill_step(engine, big_prompt)
        assert len(engine.batches[big_step]) == 1  # the only prefill of its step
        others = [b for b in _prefill_steps(engine) if b is not engine.batches[big_step]]
        assert all(sum(len(item.token_ids) for item in b) <= BUDGET for b in others)
        # Everything started while the long stream was still decoding: it has
        # decode steps after the last of their prefills.
        last = max(_prefill_step(engine, p) for p in [*short_prompts, big_prompt])
        assert any(item.start > 0 for b in engine.batches[last + 1 :] for item in b)
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_waiting_requests_start_in_the_order_they_rank_around_a_long_prompt() -> None:
    # One tenant, first come first served: the long prompt waits for a boundary
    # with no other prefill, and the prompts that arrived after it start after
    # it (it is not overtaken, so it cannot starve), all while the stream runs.
    engine = RecordingEngine(step_s=0.002)
    limits = SchedulerLimits(max_sequences=8, max_prefill_tokens=BUDGET)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        long = sched.submit([1, 2], _params(max_tokens=60), PRIORITY_INTERACTIVE, None)
        assert isinstance(await asyncio.wait_for(long.outbox.get(), 5), int)
        prompts = [[5], list(range(1, 3 * BUDGET)), [6], [7]]
        queued = [
            sched.submit(p, _params(max_tokens=1), PRIORITY_INTERACTIVE, None) for p in prompts
        ]
        for seq in queued:
            assert await _finished(seq) == Finished("length")
        assert await _finished(long) == Finished("length")
        order = [_prefill_step(engine, p) for p in prompts]
        assert order[0] < order[1] < order[2] <= order[3]
        assert len(engine.batches[order[1]]) == 1
        assert any(item.start > 0 for b in engine.batches[order[3] + 1 :] for item in b)
    finally:
        await sched.stop(drain_timeout_s=0)
