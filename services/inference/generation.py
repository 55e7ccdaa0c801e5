"""Turns a scheduled sequence's tokens into text deltas for one request.

Reads the sequence's outbox, detokenizes incrementally, enforces stop
sequences (holding back text that may be the start of one), and batches
whatever tokens are already waiting into one delta — the first token is
never held back. The last delta has `finish_reason` set.

A stop ends the choice at the first token whose text completes any stop
sequence; the text is cut where the earliest stop in the text through that
token starts (OpenAI's and vLLM's rule). How many tokens each read finds
waiting never changes the answer, its token ids or its usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from services.inference.scheduler import Finished, Scheduler, Sequence_
from services.inference.tokenizer import IncrementalDecoder, Tokenizer, incremental_decoder

T = TypeVar("T")


@dataclass
class Delta:
    """Delta is the text and token ids generated since the previous delta.

    `unsent`: the text its tokens carry past the answer's end (a stop sequence
    matched: the answer ends where it starts). Never sent as text, but its tokens'
    ids and log-probs are, so output rules judge it too.
    """

    text: str
    token_ids: list[int]
    finish_reason: str = ""
    unsent: str = ""


@dataclass
class GenerationState:
    """GenerationState is what a request reports when it ends."""

    prompt_tokens: int
    completion_tokens: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0

    def total_ms(self) -> float:
        """Returns the milliseconds since submission."""
        return (time.monotonic() - self.submitted_at) * 1000


def held_back(text: str, stops: Sequence[str]) -> int:
    """Returns how many trailing characters of `text` could start a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _split(items: list[int | Finished]) -> tuple[list[int], Finished | None]:
    """Returns an outbox's items as token ids and the `Finished` that ends them, if any.

    Tokens after the `Finished` are not the stream's: `Scheduler.end` puts its error
    in the outbox at once, and the step then running may still hand over a token.
    """
    if len(items) == 1:  # the usual case, once per stream message
        item = items[0]
        return ([item], None) if isinstance(item, int) else ([], item)
    for index, item in enumerate(items):
        if isinstance(item, Finished):
            return cast(list[int], items[:index]), item
    return cast(list[int], items), None


async def stream_deltas(
    scheduler: Scheduler,
    seq: Sequence_,
    tokenizer: Tokenizer,
    stops: Sequence[str],
    state: GenerationState,
) -> AsyncGenerator[Delta, None]:
    """Yields deltas until the sequence ends; cancels it if the caller stops early."""
    tagged = tagged_deltas(None, scheduler, seq, tokenizer, stops, state)
    try:
        async for _, delta in tagged:
            yield delta
    finally:
        await tagged.aclose()


async def tagged_deltas(
    tag: T,
    scheduler: Scheduler,
    seq: Sequence_,
    tokenizer: Tokenizer,
    stops: Sequence[str],
    state: GenerationState,
) -> AsyncGenerator[tuple[T, Delta], None]:
    """Yields (tag, delta) as `stream_deltas` yields deltas.

    A caller that needs each delta paired with its choice reads this directly:
    a pairing generator around `stream_deltas` would cost every stream message
    another async-generator hop.
    """
    decoder = incremental_decoder(tokenizer)
    text = ""  # decoded but not yet sent
    finished = False
    try:
        while True:
            tokens, end = _split(await seq.outbox.take())
            if tokens and state.completion_tokens == 0:
                _mark_first_token(seq, state)
            before, mark = text, decoder.mark() if stops else None
            text += decoder.push(tokens)
            stop_at = _first_stop(text, stops) if stops else -1
            if stop_at >= 0 and len(tokens) > 1 and mark is not None:
                # A reader a step behind gets several tokens at once. The answer
                # must be the one a reader that kept up sends: it ends at the first
                # token that completes a stop, its text cut where a stop in the text
                # through that token starts. The tokens after it were never part of
                # the answer (not sent, not billed), nor is a stop they complete.
                head = _through_stop(decoder.rewound(mark), before, tokens, stops)
                if head is not None:
                    tokens, text = head
                    stop_at = _first_stop(text, stops)
            if end is not None and stop_at < 0:
                # The rest of an incomplete character, only once no token completed
                # a stop: a stop it completes comes after every token, however the
                # tokens were grouped into reads.
                text += decoder.flush()
                stop_at = _first_stop(text, stops) if stops else -1
            state.completion_tokens += len(tokens)
            if stop_at >= 0:
                finished = True
                scheduler.cancel(seq)  # frees the slot; the request ends with "stop"
                yield tag, Delta(text[:stop_at], tokens, "stop", text[stop_at:])
                return
            if end is not None:
                finished = True
                if end.error is not None:
                    if tokens or text:  # handed over before the error: read them first
                        yield tag, Delta(text, tokens)
                    raise end.error
                yield tag, Delta(text, tokens, end.reason)
                return
            if not stops:  # nothing to hold back (most streams: one message each step)
                yield tag, Delta(text, tokens)
                text = ""
                continue
            keep = held_back(text, stops)
            yield tag, Delta(text[: len(text) - keep], tokens)
            text = text[len(text) - keep :]
    finally:
        if not finished:
            scheduler.cancel(seq)


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Returns where the earliest stop sequence in `text` starts (-1: none)."""
    return min((i for s in stops if (i := text.find(s)) >= 0), default=-1)


def _through_stop(
    decoder: IncrementalDecoder, text: str, tokens: Sequence[int], stops: Sequence[str]
) -> tuple[list[int], str] | None:
    """Returns the shortest head of `tokens` whose text (after `text`) completes a
    stop, and `text` followed by that head's text, decoded token by token as a
    reader that kept up decodes it (None: no head completes one)."""
    for count, token in enumerate(tokens, 1):
        text += decoder.push([token])
        if any(stop in text for stop in stops):
            return list(tokens[:count]), text
    return None


def _mark_first_token(seq: Sequence_, state: GenerationState) -> None:
    started = seq.started_at or seq.submitted_at
    first = seq.first_token_at or time.monotonic()
    state.queue_ms = (started - seq.submitted_at) * 1000
    state.time_to_first_token_ms = (first - seq.submitted_at) * 1000
