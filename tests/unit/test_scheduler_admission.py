"""What the scheduler admits and counts, on the deterministic test engine and demo-lm.

Real continuous batching (the engine thread, slots, the KV budget, the queue).
Covers: max_queue bounds the requests that cannot start at the next
admission (free slots the KV budget keeps unusable are no capacity), a
request submitted while an admission is under way sees its slots and the
waiting count change together, what tokenmesh_tokens_total counts, and the
cached prompt tokens a failed prefill leaves behind in its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.core.errors import ResourceExhausted
from services.inference.engines.base import StepItem
from services.inference.engines.deterministic import DeterministicTestEngine
from services.inference.engines.onnx import OnnxGenerativeEngine
from services.inference.fairness import TenantAccount
from services.inference.generation import GenerationState, stream_deltas
from services.inference.scheduler import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    SHADOW_COPY,
    Finished,
    Scheduler,
    SchedulerLimits,
    Sequence_,
)
from services.inference.tokenizer import WordTokenizer
from tests.unit.test_scheduler_liveness import _params

TOKENIZER = WordTokenizer()
DEMO_LM = Path(__file__).resolve().parents[2] / "models" / "demo-lm" / "1"
_LABELS = itertools.count()


class GatedEngine(DeterministicTestEngine):
    """The test engine, recording each step; `hold()` stops the next step inside forward."""

    def __init__(self, step_s: float = 0.0) -> None:
        super().__init__(vocab_size=len(TOKENIZER.words), context_length=512, step_s=step_s)
        self.batches: list[list[StepItem]] = []
        self.inside = threading.Event()  # a held step is inside forward
        self._released = threading.Event()
        self._hold_next = False

    def warm_up(self, max_slots: int = 1) -> None:
        super().warm_up(max_slots)
        self.batches.clear()

    def hold(self) -> None:
        """Makes the next step wait inside forward until `release()`."""
        self.inside.clear()
        self._released.clear()
        self._hold_next = True

    def release(self) -> None:
        self._released.set()

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        self.batches.append(list(items))
        if self._hold_next:
            self._hold_next = False
            self.inside.set()
            self._released.wait(10)
        return super().forward(items)


def _labels() -> tuple[str, str]:
    """Returns metric labels no other scheduler of this process uses."""
    return (f"admission-{next(_LABELS)}", "1")


def _submit(sched: Scheduler, prompt: list[int], max_tokens: int) -> Sequence_:
    return sched.submit(prompt, _params(max_tokens=max_tokens), PRIORITY_INTERACTIVE, None)


async def _finished(seq: Sequence_, timeout_s: float = 10.0) -> Finished:
    """Reads `seq`'s outbox until its Finished (bounded in time)."""
    async with asyncio.timeout(timeout_s):
        while True:
            for item in await seq.outbox.take():
                if isinstance(item, Finished):
                    return item


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


async def test_free_slots_the_kv_budget_keeps_unusable_are_no_queue_capacity() -> None:
    # One running sequence reserves the whole KV budget: the three free slots
    # take nobody at the next step, so max_queue=1 lets one request wait, not 1 + 3.
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=4, max_kv_tokens=401, max_queue=1)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        long = _submit(sched, [1], 400)  # reserves 1 + 400 = the whole budget
        assert isinstance(await asyncio.wait_for(long.outbox.get(), 5), int)
        waiting = _submit(sched, [2], 8)
        with pytest.raises(ResourceExhausted) as refused:
            _submit(sched, [3], 8)
        assert refused.value.reason == "QUEUE_FULL"
        await _until(lambda: sched.stats()["waiting"] == 1)  # it really waits
        assert sched.stats()["slots_free"] == 3
        sched.cancel(long)
        assert await _finished(waiting) == Finished("length")  # and starts once KV frees
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_has_room_answers_what_submit_would_do_for_several_requests() -> None:
    # A multi-prompt request asks first (services.inference.pipeline.generate): the
    # answer must be submit's, KV-blocked free slots included, and change nothing.
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=4, max_kv_tokens=401, max_queue=1)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        assert sched.has_room([9, 9, 9, 9, 9])  # four start, one waits
        assert not sched.has_room([9] * 6)
        long = _submit(sched, [1], 400)  # the whole KV budget
        assert isinstance(await asyncio.wait_for(long.outbox.get(), 5), int)
        assert sched.has_room([9]) and not sched.has_room([9, 9])  # one may wait, not two
        _submit(sched, [2], 8)
        assert not sched.has_room([9])
        with pytest.raises(ResourceExhausted):
            _submit(sched, [3], 8)
    finally:
        await sched.stop(drain_timeout_s=0)


def _submit_copy(sched: Scheduler, prompt: list[int], max_tokens: int) -> Sequence_:
    """Submits as a shadow copy's task does (shadow.CopySlots.hold sets the mark)."""
    marked = SHADOW_COPY.set(True)
    try:
        return sched.submit(prompt, _params(max_tokens=max_tokens), PRIORITY_BATCH, None)
    finally:
        SHADOW_COPY.reset(marked)


def _copy_has_room(sched: Scheduler, reserved: list[int]) -> bool:
    marked = SHADOW_COPY.set(True)
    try:
        return sched.has_room(reserved)
    finally:
        SHADOW_COPY.reset(marked)


async def test_queued_shadow_copies_take_no_queue_place_from_live_requests() -> None:
    # One slot, taken, and max_queue=1: a queued copy leaves the live request its place
    # (a live request's bound counts live requests only), also once the engine thread
    # has recounted; a second copy is refused (a copy's bound counts everyone), and so
    # is a second live request. The live request starts first.
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=1, max_queue=1)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        long = _submit(sched, [1], 400)
        assert isinstance(await asyncio.wait_for(long.outbox.get(), 5), int)  # running
        copy = _submit_copy(sched, [2], 8)
        steps = len(engine.batches)
        await _until(lambda: len(engine.batches) >= steps + 2)  # recounted from the truth
        assert sched.has_room([9]) and not _copy_has_room(sched, [9])
        with pytest.raises(ResourceExhausted) as refused:
            _submit_copy(sched, [3], 8)
        assert refused.value.reason == "QUEUE_FULL"
        live = _submit(sched, [4], 8)
        with pytest.raises(ResourceExhausted):
            _submit(sched, [5], 8)
        steps = len(engine.batches)
        await _until(lambda: len(engine.batches) >= steps + 2)
        assert not sched.has_room([9]) and not _copy_has_room(sched, [9])
        assert sched.stats()["waiting"] == 2
        sched.cancel(long)
        assert await _finished(live) == Finished("length")
        assert await _finished(copy) == Finished("length")
        assert live.started_at is not None and copy.started_at is not None
        assert live.started_at < copy.started_at
        _submit(sched, [6], 8)  # nothing waits any more: both counts are free again
        _submit_copy(sched, [7], 8)
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_requests_the_kv_budget_lets_start_are_not_queued_and_the_rest_are() -> None:
    # KV for three of the four slots: three start, the fourth waits (max_queue=1),
    # the fifth is refused, whether or not the engine thread admitted the first ones.
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=4, max_kv_tokens=3 * 301, max_queue=1)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        accepted = [_submit(sched, [1 + i], 300) for i in range(4)]
        with pytest.raises(ResourceExhausted) as refused:
            _submit(sched, [9], 300)
        assert refused.value.reason == "QUEUE_FULL"
        await _until(lambda: sched.stats()["running"] == 3 and sched.stats()["waiting"] == 1)
        with pytest.raises(ResourceExhausted):
            _submit(sched, [9], 300)
        sched.cancel(accepted[0])
        assert await _finished(accepted[0]) == Finished("cancelled")
        await _until(lambda: accepted[3].started_at is not None)  # its KV is free now
        assert sched.stats()["running"] == 3 and sched.stats()["waiting"] == 0
        _submit(sched, [9], 300)  # the queue has room again
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_request_submitted_during_an_admission_sees_slots_and_waiting_change_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # max_queue=0, four slots: r0 runs; r1 and r2 arrive while a step runs and take
    # two free slots at the next admission. A request submitted while r1 is being
    # admitted (from the admission loop itself: the fairness account's charge) fits
    # the fourth; with the waiting count dropped only after the loop, it saw r1's
    # slot taken but r1 still waiting, and was refused as QUEUE_FULL.
    engine = GatedEngine(step_s=0.002)
    limits = SchedulerLimits(max_sequences=4, max_queue=0)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    submitted: list[Sequence_] = []
    refusals: list[ResourceExhausted] = []
    armed = threading.Event()
    charge_prompt = TenantAccount.charge_prompt

    def charge_and_submit(account: TenantAccount[Any], tokens: int, weight: float) -> None:
        charge_prompt(account, tokens, weight)
        if armed.is_set():
            armed.clear()
            try:
                submitted.append(_submit(sched, [7], 3))
            except ResourceExhausted as refusal:
                refusals.append(refusal)

    monkeypatch.setattr(TenantAccount, "charge_prompt", charge_and_submit)
    try:
        engine.hold()
        r0 = _submit(sched, [1], 300)
        assert await asyncio.to_thread(engine.inside.wait, 5)  # r0's prefill step is held
        r1, r2 = _submit(sched, [2], 3), _submit(sched, [3], 3)
        armed.set()
        engine.release()
        for seq in (r1, r2):
            assert await _finished(seq) == Finished("length")
        assert not armed.is_set()  # the hook ran, inside r1's admission
        assert refusals == []
        assert await _finished(submitted[0]) == Finished("length")
        sched.cancel(r0)
    finally:
        engine.release()
        await sched.stop(drain_timeout_s=0)


def _completion_tokens(labels: tuple[str, str]) -> float:
    sample = dict(model=labels[0], version=labels[1], kind="completion")
    return REGISTRY.get_sample_value("tokenmesh_tokens_total", sample) or 0.0


async def test_tokens_total_counts_every_token_the_engine_sampled_not_the_billed_ones() -> None:
    # The documented meaning (engine throughput): a stream cut by a stop sequence
    # is billed for the tokens through the stop, while the engine sampled more
    # (those after it in the same message, until the cancel reached the step).
    engine = GatedEngine(step_s=0.001)
    labels = _labels()
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=2), labels)
    await sched.start()
    try:
        ids = TOKENIZER.encode("hello mesh")
        full = _submit(sched, ids, 30)
        await _finished(full)
        word = TOKENIZER.decode(full.generated[3:4]).strip()
        params = _params(max_tokens=30, stop=(word,), seed=3)
        before, steps_before = _completion_tokens(labels), len(engine.batches)
        state = GenerationState(prompt_tokens=len(ids))
        seq = sched.submit(ids, params, PRIORITY_INTERACTIVE, None)
        deltas = [d async for d in stream_deltas(sched, seq, TOKENIZER, params.stop, state)]
        assert deltas[-1].finish_reason == "stop"
        await _until(lambda: seq.finished is not None)

        def counted() -> float:
            return _completion_tokens(labels) - before

        def sampled() -> int:
            return sum(len(batch) for batch in engine.batches[steps_before:])

        # The step that ended it counts its rows just after: poll the counter.
        with contextlib.suppress(TimeoutError):
            await _until(lambda: counted() == sampled(), timeout_s=2)
        assert counted() == sampled()
        assert state.completion_tokens <= sampled()
    finally:
        await sched.stop(drain_timeout_s=0)


def _demo_lm() -> OnnxGenerativeEngine:
    card = json.loads((DEMO_LM / "config.json").read_text())
    shape = {k: card[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}
    return OnnxGenerativeEngine(
        DEMO_LM / "model.onnx", threads=1, prefix_cache_tokens=1024, **shape
    )


async def test_a_failed_prefill_leaves_no_cached_tokens_to_the_next_prompt_in_its_slot() -> None:
    # demo-lm with a prefix cache. A prompt that shares a stored 16-token block is
    # a partial hit: the cache counts 16 reused tokens for its slot, then computing
    # its tail fails (a token id outside the vocabulary: ONNX Runtime's Gather
    # refuses it). The next prompt in that slot, a miss, reused nothing.
    engine = _demo_lm()
    sched = Scheduler(engine, -1, SchedulerLimits(max_sequences=2), _labels())
    await sched.start()
    try:
        head = list(range(1, 21))
        first = _submit(sched, head, 2)
        assert await _finished(first) == Finished("length")
        failing = _submit(sched, head[:16] + [engine.vocab_size + 5], 2)
        ended = await _finished(failing)
        assert ended.reason == "error" and failing.slot == first.slot
        miss = _submit(sched, [7, 8, 9], 2)
        assert await _finished(miss) == Finished("length")
        assert miss.slot == failing.slot
        assert miss.cached_prompt_tokens == 0
        again = _submit(sched, head, 2)  # and an exact hit still counts its reuse
        assert await _finished(again) == Finished("length")
        assert again.cached_prompt_tokens == len(head)
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_request_that_fits_is_taken_while_others_wait_for_kv() -> None:
    # A batch request waits for KV (max_queue=1 reached); an interactive one that fits
    # the free slots and KV starts ahead of it (admission takes the higher class
    # first), so it must not be refused QUEUE_FULL. (The first version of the
    # KV-aware bound queued everything behind a waiting request and refused it.)
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=4, max_kv_tokens=100, max_queue=1)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        running = _submit(sched, [1], 59)  # 60 of the 100 KV tokens
        assert isinstance(await asyncio.wait_for(running.outbox.get(), 5), int)
        blocked = sched.submit([2], _params(max_tokens=59), PRIORITY_BATCH, None)
        await _until(lambda: sched.stats()["waiting"] == 1 and blocked.started_at is None)
        interactive = _submit(sched, [3], 9)  # 10 tokens: fits the 40 left
        assert await _finished(interactive) == Finished("length")
        assert blocked.started_at is None or running.finished is not None
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_requests_behind_a_head_waiting_for_kv_are_queued_not_taken_past_max_queue() -> None:
    """Admission is head-of-line: a head the KV left cannot hold starts nothing behind
    it. Yet every small request "fit" the free slots and KV, and each step counted
    them afresh: with max_queue=2, 148 requests waited behind such a head."""
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=8, max_kv_tokens=600, max_queue=2)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    taken: list[Sequence_] = []
    refused = 0
    try:
        hold = _submit(sched, [1], 399)  # 400 of the 600 KV tokens
        assert isinstance(await asyncio.wait_for(hold.outbox.get(), 5), int)
        head = _submit(sched, [2], 300)  # 301: waits for KV, and everyone behind it
        for _ in range(2):  # an admission has seen it (the inbox's is taken at a step)
            await _a_step(engine)
        for _ in range(10):  # a wave a step: each step recounted the free slots
            for i in range(8):
                try:
                    taken.append(_submit(sched, [3 + i], 2))
                except ResourceExhausted:
                    refused += 1
            await _a_step(engine)
        assert sched.stats()["waiting"] <= limits.max_queue + 1, sched.stats()
        assert head.started_at is None and refused >= 70
        # A higher class is admitted first: an interactive request still starts past a
        # batch head waiting for KV (tests above), not past an interactive one.
        sched.cancel(hold)
        assert await _finished(head) == Finished("length")
    finally:
        await sched.stop(drain_timeout_s=0)


async def _a_step(engine: GatedEngine) -> None:
    """Waits for the engine's next step."""
    steps = len(engine.batches)
    await _until(lambda: len(engine.batches) > steps)


async def test_batch_requests_waiting_take_no_queue_place_from_an_interactive_one() -> None:
    """Batch requests (job items) wait behind every interactive request, yet they took
    its `max_queue` places: with two waiting, an interactive request was refused
    QUEUE_FULL although it would start ahead of both."""
    engine = GatedEngine(step_s=0.005)
    limits = SchedulerLimits(max_sequences=1, max_queue=2)
    sched = Scheduler(engine, engine.eos_token_id, limits, _labels())
    await sched.start()
    try:
        running = _submit(sched, [1], 400)
        assert isinstance(await asyncio.wait_for(running.outbox.get(), 5), int)
        batch = [
            sched.submit([2 + i], _params(max_tokens=4), PRIORITY_BATCH, None) for i in range(2)
        ]
        with pytest.raises(ResourceExhausted):  # batch requests are bounded by everyone
            sched.submit([9], _params(max_tokens=4), PRIORITY_BATCH, None)
        first = _submit(sched, [5], 4)  # interactive: bounded by interactive requests
        second = _submit(sched, [6], 4)
        with pytest.raises(ResourceExhausted) as refused:
            _submit(sched, [7], 4)
        assert refused.value.reason == "QUEUE_FULL"
        assert sched.has_room([5]) is False and sched.has_room([5], PRIORITY_BATCH) is False
        sched.cancel(running)
        for seq in (first, second, *batch):
            assert await _finished(seq) == Finished("length")
        assert first.started_at is not None and batch[0].started_at is not None
        assert first.started_at < batch[0].started_at  # interactive first
    finally:
        await sched.stop(drain_timeout_s=0)
