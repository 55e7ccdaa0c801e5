"""The generation loop enforces max_tokens and stop sequences on a real engine."""

from __future__ import annotations

from typing import Any

from services.inference.engine import SamplingParams
from services.inference.generation import Delta, GenerationState, _held_back, generate
from services.inference.models import deterministic_test_model


def _params(**overrides) -> SamplingParams:
    values: dict[str, Any] = dict(
        max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, seed=3, stop=()
    )
    values.update(overrides)
    return SamplingParams(**values)


async def _run(
    params: SamplingParams, prompt: str = "hello mesh"
) -> tuple[list[Delta], GenerationState]:
    model = deterministic_test_model("t", "1", step_s=0)
    ids = model.tokenizer.encode(prompt)
    state = GenerationState(prompt_tokens=len(ids))
    deltas = [d async for d in generate(model, ids, params, state)]
    return deltas, state


async def test_max_tokens_ends_with_length():
    deltas, state = await _run(_params(max_tokens=5))
    assert deltas[-1].finish_reason == "length"
    assert state.completion_tokens == 5
    assert sum(len(d.token_ids) for d in deltas) == 5
    assert all(d.finish_reason == "" for d in deltas[:-1])


async def test_same_seed_same_text_different_seed_differs():
    first, _ = await _run(_params(seed=1))
    again, _ = await _run(_params(seed=1))
    other, _ = await _run(_params(seed=2))
    text = "".join(d.text for d in first)
    assert text == "".join(d.text for d in again)
    assert text != "".join(d.text for d in other)


async def test_stop_sequence_truncates_and_never_leaks():
    full, _ = await _run(_params(max_tokens=30))
    text = "".join(d.text for d in full)
    word = text.split()[3]  # a word the engine will produce with this seed
    deltas, _ = await _run(_params(max_tokens=30, stop=(word,)))
    stopped = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    assert word not in stopped
    assert text.startswith(stopped)


def test_held_back_keeps_possible_stop_prefixes():
    assert _held_back("abc EN", ["END"]) == 2
    assert _held_back("abc", ["END"]) == 0
    assert _held_back("abcE", ["xyz", "END"]) == 1
