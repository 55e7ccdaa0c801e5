"""Runs one generation request against an engine.

Enforces max_tokens and stop sequences, holds back text that may be the start
of a stop sequence, and measures timing. Yields `Delta`s; the last one has
`finish_reason` set.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from services.inference.engine import SamplingParams
from services.inference.models import LoadedModel


@dataclass
class Timings:
    """Timings measured from admission, in milliseconds."""

    admitted: float = field(default_factory=time.perf_counter)
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0

    def since_admission_ms(self) -> float:
        """Returns the milliseconds elapsed since admission."""
        return (time.perf_counter() - self.admitted) * 1000


@dataclass
class Delta:
    """Delta is the text and token ids generated since the previous delta."""

    text: str
    token_ids: list[int]
    finish_reason: str = ""


@dataclass
class GenerationState:
    """GenerationState is what the servicer reports at the end of a request."""

    prompt_tokens: int
    completion_tokens: int = 0
    timings: Timings = field(default_factory=Timings)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Returns how many trailing characters of `text` could start a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


async def generate(
    model: LoadedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    state: GenerationState,
) -> AsyncIterator[Delta]:
    """Yields deltas for one request; `state` is updated as tokens arrive."""
    text = ""  # generated text not yet sent
    pending_ids: list[int] = []
    state.timings.queue_ms = state.timings.since_admission_ms()
    async for token_id in model.engine.generate(prompt_ids, params):
        if state.completion_tokens == 0:
            state.timings.time_to_first_token_ms = state.timings.since_admission_ms()
        if token_id == model.engine.eos_token_id:
            yield Delta(text, pending_ids, "stop")
            return
        state.completion_tokens += 1
        pending_ids.append(token_id)
        text += model.tokenizer.decode([token_id])
        stop_at = min((i for s in params.stop if (i := text.find(s)) >= 0), default=-1)
        if stop_at >= 0:
            yield Delta(text[:stop_at], pending_ids, "stop")
            return
        if state.completion_tokens >= params.max_tokens:
            yield Delta(text, pending_ids, "length")
            return
        keep = _held_back(text, params.stop)
        if len(text) > keep:
            yield Delta(text[: len(text) - keep], pending_ids)
            text, pending_ids = text[len(text) - keep :], []
    yield Delta(text, pending_ids, "stop")
