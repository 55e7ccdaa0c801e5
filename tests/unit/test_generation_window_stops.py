"""Stop sequences with a tokenizer that is not byte-level (the window decoder).

demo-lm's tokenizer with its byte table turned off stands in for SentencePiece
and added-token vocabularies: streams then decode windows with the tokenizer
itself (WindowDecoder). Covers: the window decoder returns each character as
soon as it is complete, as the byte decoder does, and a stream whose stop
sequence is followed by an incomplete character is cut, sent and billed at
the stop, through the real scheduler.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from services.inference.engines.base import GenerativeEngine, StepItem
from services.inference.generation import Delta, GenerationState, stream_deltas
from services.inference.scheduler import (
    PRIORITY_INTERACTIVE,
    Scheduler,
    SchedulerLimits,
    Sequence_,
)
from services.inference.tokenizer import (
    ByteDecoder,
    HuggingFaceTokenizer,
    Tokenizer,
    WindowDecoder,
    incremental_decoder,
)
from tests.unit.test_scheduler_liveness import _labels, _params

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "demo-lm" / "1" / "tokenizer.json"


class WindowOnlyTokenizer(HuggingFaceTokenizer):
    """demo-lm's tokenizer, offering no byte table: streams decode windows."""

    def piece_bytes(self) -> Sequence[bytes] | None:
        return None


def _byte_level() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(DEMO_TOKENIZER)


def _id(pieces: Sequence[bytes], piece: bytes) -> int:
    return list(pieces).index(piece)


def test_a_window_decoder_returns_each_character_when_the_byte_decoder_does() -> None:
    # It held back a whole message's text while its last character was
    # incomplete, complete characters included: a stop sequence among them was
    # found only with a later message, after its tokens had been sent and billed.
    window_tokenizer, pieces = WindowOnlyTokenizer(DEMO_TOKENIZER), _byte_level().piece_bytes()
    assert pieces is not None
    assert isinstance(incremental_decoder(window_tokenizer), WindowDecoder)
    rng = random.Random(23)
    # Lone bytes of multi-byte characters (lead and continuation), words, and
    # whole characters split into bytes, so most messages end inside a character.
    partial = [i for i, piece in enumerate(pieces) if len(piece) == 1 and piece[0] >= 0x80]
    whole = window_tokenizer.encode("café — 😀 naïve")

    def pick() -> int:
        roll = rng.random()
        if roll < 0.4:
            return rng.choice(partial)
        return rng.choice(whole) if roll < 0.7 else rng.randrange(len(pieces))

    for _ in range(300):
        ids = [pick() for _ in range(rng.randrange(1, 24))]
        window, byte = WindowDecoder(window_tokenizer), ByteDecoder(pieces)
        window_text = byte_text = ""
        cut = 0
        while cut < len(ids):
            step = rng.randrange(1, 6)
            window_text += window.push(ids[cut : cut + step])
            byte_text += byte.push(ids[cut : cut + step])
            cut += step
            # The byte decoder returns a definitely invalid byte's U+FFFD at once; the
            # window decoder cannot tell it from an incomplete character yet.
            assert window_text.rstrip("\ufffd") == byte_text.rstrip("\ufffd"), ids[:cut]
        assert window_text + window.flush() == byte_text + byte.flush()


def test_a_rewound_window_decoder_continues_mid_character() -> None:
    tokenizer = WindowOnlyTokenizer(DEMO_TOKENIZER)
    ids = tokenizer.encode(" the ch—a 😀 done")
    decoder = incremental_decoder(tokenizer)
    texts = [decoder.push([i]) for i in ids]
    for cut in range(len(ids) + 1):
        replay = incremental_decoder(tokenizer)
        head = "".join(replay.push([i]) for i in ids[:cut])
        again = replay.rewound(replay.mark())
        tail = "".join(again.push([i]) for i in ids[cut:]) + again.flush()
        assert head + tail == tokenizer.decode(ids) == "".join(texts) + decoder.flush()


class ScriptedEngine(GenerativeEngine):
    """Synthetic logits whose greedy token at each position is the script's.

    Every sequence of a one-token prompt generates `script` (then `filler`).
    """

    name = "scripted-test"

    def __init__(self, script: Sequence[int], filler: int, vocab_size: int) -> None:
        self.script, self.filler = list(script), filler
        self.vocab_size = vocab_size
        self.context_length = 512
        self.step_s = 0.003  # messages reach the stream a step or more apart

    def allocate(self, max_slots: int) -> None:
        """Nothing to reserve: the logits depend only on positions."""

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        time.sleep(self.step_s)  # simulated compute, in the engine thread
        logits = np.zeros((len(items), self.vocab_size), np.float32)
        for row, item in enumerate(items):
            position = item.start + len(item.token_ids) - 1
            script = self.script
            logits[row, script[position] if position < len(script) else self.filler] = 10.0
        return logits


@pytest.mark.parametrize("window", [True, False], ids=["window-decoder", "byte-decoder"])
async def test_a_stop_before_an_incomplete_character_bills_the_tokens_through_the_stop(
    window: bool,
) -> None:
    # " the" "ch" then lone lead bytes (each makes the one before invalid: the
    # text ends inside a character until " the" comes). Stop "ch": two tokens.
    # Two streams and one message per step: each stream gets its tokens two at a
    # time after the first, so "ch" arrives with the lead byte after it, and the
    # window decoder sent and billed every token until the text was complete again.
    tokenizer: Tokenizer = WindowOnlyTokenizer(DEMO_TOKENIZER) if window else _byte_level()
    pieces = _byte_level().piece_bytes()
    assert pieces is not None
    the, ch, lead = _id(pieces, b" the"), _id(pieces, b"ch"), _id(pieces, b"\xe2")
    engine = ScriptedEngine([the, ch, *[lead] * 6, the], the, len(pieces))
    limits = SchedulerLimits(max_sequences=2, messages_per_step=1)
    sched = Scheduler(engine, -1, limits, _labels())
    await sched.start()
    try:
        params = _params(max_tokens=20, temperature=0.0, stop=("ch",))
        states = [GenerationState(prompt_tokens=1) for _ in range(2)]
        seqs = [sched.submit([the], params, PRIORITY_INTERACTIVE, None) for _ in states]

        async def read(seq: Sequence_, state: GenerationState) -> list[Delta]:
            return [d async for d in stream_deltas(sched, seq, tokenizer, params.stop, state)]

        streams = await asyncio.gather(*(map(read, seqs, states)))
        for deltas, state in zip(streams, states, strict=True):
            assert "".join(d.text for d in deltas) == " the"
            assert [t for d in deltas for t in d.token_ids] == [the, ch]
            assert state.completion_tokens == 2
            assert deltas[-1].finish_reason == "stop"
    finally:
        await sched.stop(drain_timeout_s=0)
