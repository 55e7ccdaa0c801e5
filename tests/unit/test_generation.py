"""The scheduler and the text stream on the deterministic test engine.

These run the real continuous-batching loop (engine compute in its thread,
sampling, slots, budgets); only the logits are synthetic.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.core.errors import DeadlineExceeded, ResourceExhausted
from services.inference.engines.base import StepItem
from services.inference.engines.deterministic import DeterministicTestEngine
from services.inference.generation import GenerationState, held_back, stream_deltas
from services.inference.sampling import SamplingParams
from services.inference.scheduler import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    Scheduler,
    SchedulerLimits,
)
from services.inference.tokenizer import (
    ByteDecoder,
    HuggingFaceTokenizer,
    WindowDecoder,
    WordTokenizer,
    _byte_level_pieces,
    incremental_decoder,
)

TOKENIZER = WordTokenizer()


class RecordingEngine(DeterministicTestEngine):
    """The test engine, recording each step's batch (what the scheduler fed it)."""

    def __init__(self, step_s: float = 0.0, fail: bool = False) -> None:
        super().__init__(vocab_size=len(TOKENIZER.words), context_length=512, step_s=step_s)
        self.batches: list[list[StepItem]] = []
        self.fail = fail

    def warm_up(self, max_slots: int = 1) -> None:
        super().warm_up(max_slots)
        self.batches.clear()  # record what requests made the scheduler run

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        self.batches.append(list(items))
        if self.fail and len(self.batches) > 2:  # two real steps, then it breaks
            raise RuntimeError("engine exploded")
        return super().forward(items)


def _params(**overrides: Any) -> SamplingParams:
    values: dict[str, Any] = dict(
        max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, seed=3, stop=()
    )
    values.update(overrides)
    return SamplingParams(**values)


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    engine = RecordingEngine()
    sched = Scheduler(
        engine, engine.eos_token_id, SchedulerLimits(max_sequences=8, max_queue=16), ("t", "1")
    )
    await sched.start()
    yield sched
    await sched.stop(drain_timeout_s=0)


async def _text(
    scheduler: Scheduler, params: SamplingParams, prompt: str = "hello mesh"
) -> tuple[str, str, int]:
    ids = TOKENIZER.encode(prompt)
    state = GenerationState(prompt_tokens=len(ids))
    seq = scheduler.submit(ids, params, PRIORITY_INTERACTIVE, None)
    deltas = [d async for d in stream_deltas(scheduler, seq, TOKENIZER, params.stop, state)]
    return "".join(d.text for d in deltas), deltas[-1].finish_reason, state.completion_tokens


async def test_max_tokens_ends_with_length(scheduler):
    text, reason, tokens = await _text(scheduler, _params(max_tokens=5))
    assert reason == "length" and tokens == 5 and len(text.split()) == 5


async def test_same_seed_same_text_different_seed_differs(scheduler):
    first, _, _ = await _text(scheduler, _params(seed=1))
    again, _, _ = await _text(scheduler, _params(seed=1))
    other, _, _ = await _text(scheduler, _params(seed=2))
    assert first == again and first != other


async def test_greedy_ignores_the_seed(scheduler):
    a, _, _ = await _text(scheduler, _params(temperature=0, seed=1))
    b, _, _ = await _text(scheduler, _params(temperature=0, seed=2))
    assert a == b


class EndsAtOnceEngine(DeterministicTestEngine):
    """The test engine whose every step's likeliest token is the end of sequence."""

    def __init__(self) -> None:
        super().__init__(vocab_size=len(TOKENIZER.words), context_length=512)

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        logits = super().forward(items).copy()
        logits[:, self.eos_token_id] = 100.0
        return logits


async def test_an_empty_answer_has_its_first_token_time():
    """An answer whose first token was the end of sequence finished with no first-token
    time: its TTFT was reported 0 (v2 timing, usage events) and the router's rollout
    gate counted it as a request that never got a first token (slower than any bound),
    though it was answered at once."""
    engine = EndsAtOnceEngine()
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=2), ("t", "1"))
    await sched.start()
    try:
        ids = TOKENIZER.encode("hello mesh")
        seq = sched.submit(ids, _params(temperature=0), PRIORITY_INTERACTIVE, None)
        state = GenerationState(prompt_tokens=len(ids))
        deltas = [d async for d in stream_deltas(sched, seq, TOKENIZER, (), state)]
        assert [(d.text, d.finish_reason) for d in deltas] == [("", "stop")]
        assert seq.first_token_at is not None and seq.first_token_at >= seq.submitted_at
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_stop_sequence_truncates_and_never_leaks(scheduler):
    full, _, _ = await _text(scheduler, _params(max_tokens=30))
    word = full.split()[3]
    stopped, reason, _ = await _text(scheduler, _params(max_tokens=30, stop=(word,)))
    assert reason == "stop" and word not in stopped and full.startswith(stopped)


def test_held_back_keeps_possible_stop_prefixes():
    assert held_back("abc EN", ["END"]) == 2
    assert held_back("abc", ["END"]) == 0
    assert held_back("abcE", ["xyz", "END"]) == 1


async def test_sequences_are_batched_together():
    # Steps take 2 ms, so the first of the six cannot finish before the last joins
    # (with 0 ms steps an event-loop stall let it: about one run in eight failed).
    engine = RecordingEngine(step_s=0.002)
    scheduler = Scheduler(
        engine, engine.eos_token_id, SchedulerLimits(max_sequences=8, max_queue=16), ("t", "1")
    )
    await scheduler.start()
    try:
        results = await asyncio.gather(
            *(_text(scheduler, _params(max_tokens=10 + i, seed=i)) for i in range(6))
        )
        assert [r[2] for r in results] == [10 + i for i in range(6)]
        assert max(len(batch) for batch in engine.batches) == 6  # one step served all six
        stats = scheduler.stats()
        assert stats["slots_free"] == 8 and stats["kv_tokens_reserved"] == 0
    finally:
        await scheduler.stop(drain_timeout_s=0)


async def test_sequences_join_and_leave_between_steps():
    # Steps take 2 ms, so the long sequence runs for at least 0.4 s whatever the load.
    engine = RecordingEngine(step_s=0.002)
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=2), ("t", "1"))
    await sched.start()
    try:
        long = asyncio.create_task(_text(sched, _params(max_tokens=200)))
        while sched.stats()["running"] == 0:  # the long one is decoding
            await asyncio.sleep(0.001)
        short = await _text(sched, _params(max_tokens=2))
        assert short[2] == 2 and not long.done()  # the short one joined and left mid-way
        assert max(len(batch) for batch in engine.batches) == 2  # they shared steps
        # Its prompt had a step of its own: the first token did not wait for
        # the long one's decode.
        prefills = [batch for batch in engine.batches if any(it.start == 0 for it in batch)]
        assert len(prefills) == 2 and all(len(batch) == 1 for batch in prefills)
        assert (await long)[2] == 200
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_cancellation_frees_the_slot_within_one_step():
    engine = RecordingEngine(step_s=0.005)
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=2), ("t", "1"))
    await sched.start()
    try:
        seq = sched.submit([1, 2], _params(max_tokens=500), PRIORITY_INTERACTIVE, None)
        await seq.outbox.get()
        sched.cancel(seq)
        steps_at_cancel = len(engine.batches)
        while sched.stats()["running"]:
            await asyncio.sleep(0.001)
        assert len(engine.batches) - steps_at_cancel <= 1
        assert sched.stats()["cancelled_total"] == 1 and sched.stats()["slots_free"] == 2
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_full_queue_is_resource_exhausted_with_retry(scheduler):
    blocker = RecordingEngine(step_s=0.01)
    sched = Scheduler(blocker, 0, SchedulerLimits(max_sequences=1, max_queue=1), ("t", "1"))
    await sched.start()
    try:
        sched.submit([1], _params(max_tokens=50), PRIORITY_INTERACTIVE, None)
        await asyncio.sleep(0.02)  # the first one is running
        sched.submit([1], _params(), PRIORITY_INTERACTIVE, None)  # waits
        with pytest.raises(ResourceExhausted) as info:
            sched.submit([1], _params(), PRIORITY_INTERACTIVE, None)
        assert info.value.retry_after_s and info.value.reason == "QUEUE_FULL"
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_interactive_requests_overtake_batch_ones():
    engine = RecordingEngine(step_s=0.002)
    sched = Scheduler(engine, 0, SchedulerLimits(max_sequences=1), ("t", "1"))
    await sched.start()
    try:
        running = sched.submit([1], _params(max_tokens=20), PRIORITY_INTERACTIVE, None)
        await running.outbox.get()
        batch = sched.submit([2], _params(max_tokens=1), PRIORITY_BATCH, None)
        interactive = sched.submit([3], _params(max_tokens=1), PRIORITY_INTERACTIVE, None)
        while batch.finished is None:
            await asyncio.sleep(0.002)
        assert interactive.started_at is not None and batch.started_at is not None
        assert interactive.started_at < batch.started_at
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_kv_budget_holds_back_what_does_not_fit():
    engine = RecordingEngine(step_s=0.002)
    sched = Scheduler(engine, 0, SchedulerLimits(max_sequences=4, max_kv_tokens=30), ("t", "1"))
    await sched.start()
    try:
        first = sched.submit(
            [1] * 5, _params(max_tokens=20), PRIORITY_INTERACTIVE, None
        )  # 25 tokens
        second = sched.submit([1] * 5, _params(max_tokens=20), PRIORITY_INTERACTIVE, None)
        await first.outbox.get()
        assert second.started_at is None  # 25 + 25 > 30: waits for the first to finish
        while second.finished is None:
            await asyncio.sleep(0.002)
        assert second.started_at is not None and first.finished is not None
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_deadline_that_passes_in_the_queue_ends_the_request():
    engine = RecordingEngine(step_s=0.01)
    sched = Scheduler(engine, 0, SchedulerLimits(max_sequences=1), ("t", "1"))
    await sched.start()
    try:
        sched.submit([1], _params(max_tokens=30), PRIORITY_INTERACTIVE, None)
        late = sched.submit([1], _params(), PRIORITY_INTERACTIVE, timeout_s=0.02)
        finished = None
        while finished is None:
            item = await late.outbox.get()
            finished = item if not isinstance(item, int) else None
        assert finished.reason == "error" and isinstance(finished.error, DeadlineExceeded)
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_an_engine_failure_ends_running_sequences_with_an_error():
    engine = RecordingEngine(fail=True)
    sched = Scheduler(engine, 0, SchedulerLimits(max_sequences=2), ("t", "1"))
    await sched.start()
    try:
        seq = sched.submit([1], _params(max_tokens=50), PRIORITY_INTERACTIVE, None)
        items = []
        while not items or isinstance(items[-1], int):
            items.append(await seq.outbox.get())
        assert items[-1].reason == "error" and len(items) >= 2  # tokens first, then the failure
        ok = sched.submit(
            [1], _params(max_tokens=1), PRIORITY_INTERACTIVE, None
        )  # the loop lives on
        assert ok.finished is None
    finally:
        await sched.stop(drain_timeout_s=0)


MODELS = Path(__file__).resolve().parents[2] / "models"


def _demo_tokenizer() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(MODELS / "demo-lm" / "1" / "tokenizer.json")


@pytest.mark.parametrize("kind", [ByteDecoder, WindowDecoder])
def test_incremental_decoding_equals_decoding_everything_at_once(kind: type) -> None:
    tokenizer = _demo_tokenizer()
    text = "In the beginning God created the heaven — and the earth. Ünïcödé 😀 works too."
    ids = tokenizer.encode(text)
    pieces_table = tokenizer.piece_bytes()
    assert pieces_table is not None  # demo-lm is byte-level BPE
    decoder = ByteDecoder(pieces_table) if kind is ByteDecoder else WindowDecoder(tokenizer)
    pieces = [decoder.push([token]) for token in ids]
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_byte_decoding_equals_the_tokenizers_for_any_ids_and_any_split() -> None:
    tokenizer = _demo_tokenizer()
    rng = random.Random(7)
    size = len(tokenizer.piece_bytes() or ())
    for _ in range(300):
        # Any ids, broken UTF-8 and the special <|endoftext|> (id 0) included.
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 20))]
        decoder = incremental_decoder(tokenizer)
        assert isinstance(decoder, ByteDecoder)
        cut, text = 0, ""
        while cut < len(ids):
            step = rng.randrange(1, 4)
            text += decoder.push(ids[cut : cut + step])
            cut += step
        assert text + decoder.flush() == tokenizer.decode(ids)


def test_a_byte_decoder_rewound_to_a_mark_continues_from_there() -> None:
    tokenizer = _demo_tokenizer()
    ids = tokenizer.encode("café 😀 done")
    decoder = incremental_decoder(tokenizer)
    head = "".join(decoder.push([i]) for i in ids[:3])
    mark = decoder.mark()
    rest = "".join(decoder.push([i]) for i in ids[3:]) + decoder.flush()
    again = decoder.rewound(mark)
    assert head + "".join(again.push([i]) for i in ids[3:]) + again.flush() == head + rest
    assert head + rest == "café 😀 done"


def test_ids_past_the_vocabulary_have_no_text() -> None:
    tokenizer = _demo_tokenizer()
    decoder = incremental_decoder(tokenizer)
    ids = tokenizer.encode(" ok")
    assert decoder.push([*ids, 10**6]) == tokenizer.decode([*ids, 10**6]) == " ok"


def test_tokenizers_that_are_not_byte_level_decode_windows() -> None:
    wordpiece = HuggingFaceTokenizer(MODELS / "all-minilm-l6-v2" / "1" / "tokenizer.json")
    assert wordpiece.piece_bytes() is None
    decoder = incremental_decoder(wordpiece)
    assert isinstance(decoder, WindowDecoder)
    ids = wordpiece.encode("routing tokens")
    assert "".join(decoder.push([i]) for i in ids) + decoder.flush() == wordpiece.decode(ids)


def test_a_vocabulary_the_byte_table_reads_wrong_keeps_window_decoding() -> None:
    tokenizer = _demo_tokenizer()
    wrong = {5: "!!"}  # a tokenizer whose id 5 decodes unlike its byte-level token

    def decode_batch(batch: list[list[int]]) -> list[str]:
        return ["".join(wrong.get(i, tokenizer.decode([i])) for i in ids) for ids in batch]

    def right(batch: list[list[int]]) -> list[str]:
        return [tokenizer.decode(ids) for ids in batch]

    assert _byte_level_pieces(tokenizer._tokenizer, decode_batch) is None
    assert _byte_level_pieces(tokenizer._tokenizer, right) is not None


def test_the_test_tokenizer_decodes_bytes_alike() -> None:
    tokenizer = WordTokenizer()
    ids = tokenizer.encode("the mesh routes tokens") + [0]
    decoder = incremental_decoder(tokenizer)
    assert isinstance(decoder, ByteDecoder)
    assert "".join(decoder.push([i]) for i in ids) == tokenizer.decode(ids)


async def test_under_load_streams_get_tokens_in_batches_but_the_first_at_once():
    engine = RecordingEngine(step_s=0.001)
    limits = SchedulerLimits(max_sequences=4, messages_per_step=1)  # 4 running: every 4th step
    sched = Scheduler(engine, engine.eos_token_id, limits, ("t", "1"))
    await sched.start()

    async def token_counts(seed: int) -> list[int]:
        ids = TOKENIZER.encode("hello mesh")
        state = GenerationState(prompt_tokens=len(ids))
        seq = sched.submit(ids, _params(max_tokens=14, seed=seed), PRIORITY_INTERACTIVE, None)
        return [len(d.token_ids) async for d in stream_deltas(sched, seq, TOKENIZER, (), state)]

    try:
        streams = await asyncio.gather(*(token_counts(seed) for seed in range(4)))
    finally:
        await sched.stop(drain_timeout_s=0)
    for counts in streams:
        assert sum(counts) == 14 and counts[0] == 1  # the first token is never held
        assert all(n % 4 == 0 for n in counts[1:-1]), counts  # then four steps at a time


async def test_logprobs_are_recorded_per_token_only_when_asked(scheduler):
    ids = TOKENIZER.encode("hello mesh")
    plain = scheduler.submit(ids, _params(max_tokens=6), PRIORITY_INTERACTIVE, None)
    asked = scheduler.submit(
        ids, _params(max_tokens=6, top_k=4), PRIORITY_INTERACTIVE, None, top_logprobs=3
    )
    for seq in (plain, asked):
        state = GenerationState(prompt_tokens=len(ids))
        _ = [d async for d in stream_deltas(scheduler, seq, TOKENIZER, (), state)]
    assert plain.token_logprobs == []
    assert len(asked.token_logprobs) >= len(asked.generated) == 6
    for token, item in zip(asked.generated, asked.token_logprobs, strict=False):
        assert item.token_id == token and item.logprob <= 0
        alternatives = [t for t, _ in item.top]
        values = [lp for _, lp in item.top]
        assert len(item.top) == 3 and values == sorted(values, reverse=True)
        # top-k 4: the sampled token is one of the 4 drawable ones; if it ranks
        # in the best 3 it is listed, with the same log-probability.
        if token in alternatives:
            assert dict(item.top)[token] == pytest.approx(item.logprob)


async def test_a_reader_that_falls_behind_gets_and_pays_no_token_after_the_stop(scheduler):
    full, _, _ = await _text(scheduler, _params(max_tokens=12))
    word = full.split()[3]
    assert full.split().index(word) == 3  # the stop completes with the 4th token
    ids = TOKENIZER.encode("hello mesh")
    state = GenerationState(prompt_tokens=len(ids))
    params = _params(max_tokens=12, stop=(word,))
    seq = scheduler.submit(ids, params, PRIORITY_INTERACTIVE, None)
    # Let the whole generation land in the outbox before reading: the reader
    # then takes every token at once, the ones after the stop included.
    deadline = asyncio.get_running_loop().time() + 10
    while not any(not isinstance(i, int) for i in seq.outbox._items):
        assert asyncio.get_running_loop().time() < deadline, "the sequence never finished"
        await asyncio.sleep(0.005)
    deltas = [d async for d in stream_deltas(scheduler, seq, TOKENIZER, params.stop, state)]
    assert deltas[-1].finish_reason == "stop"
    assert state.completion_tokens == 4
    assert sum(len(d.token_ids) for d in deltas) == 4
    assert full.startswith("".join(d.text for d in deltas))
