"""Prefill of a step's prompts: padded calls follow the real tokens, not rows x the longest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.inference.engines.base import StepItem
from services.inference.engines.onnx import (
    PAD_RATIO,
    PAD_SLACK_TOKENS,
    OnnxGenerativeEngine,
    _pad_groups,
)

DEMO_LM = Path(__file__).resolve().parents[2] / "models" / "demo-lm" / "1"
CARD = json.loads((DEMO_LM / "config.json").read_text())
SHAPE = {k: CARD[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}


class RecordingEngine(OnnxGenerativeEngine):
    """demo-lm, recording each call's (rows, width, real tokens, logits shape)."""

    def __init__(self, slots: int) -> None:
        super().__init__(DEMO_LM / "model.onnx", threads=1, **SHAPE)
        self.allocate(slots)
        self.calls: list[tuple[int, int, int, tuple[int, ...]]] = []

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> list[np.ndarray]:
        outputs = super()._run(ids, mask, positions, past)
        rows, width = ids.shape
        self.calls.append((rows, width, int(mask.sum()), outputs[0].shape))
        return outputs


def _within_bound(rows: int, width: int, real: int) -> bool:
    return rows * width <= PAD_RATIO * real + PAD_SLACK_TOKENS


def test_one_long_prompt_among_short_ones_is_not_padded_to_its_length():
    rng = np.random.default_rng(5)
    long = [int(t) for t in rng.integers(1, 4000, 500)]
    shorts = [[int(t) for t in rng.integers(1, 4000, 4)] for _ in range(31)]
    engine = RecordingEngine(32)
    step = [StepItem(0, long, 0)] + [StepItem(s + 1, p, 0) for s, p in enumerate(shorts)]
    logits = engine.forward(step)
    assert engine.calls, "the step ran prefill calls"
    assert sum(real for _, _, real, _ in engine.calls) == 500 + 31 * 4  # each prompt once
    for rows, width, real, shape in engine.calls:
        assert _within_bound(rows, width, real), (rows, width, real)
        assert shape[0] * shape[1] == rows * width  # the logits array follows the same bound
    # Before: one call of 32 x 500 positions (16,000 for 624 real tokens).
    assert sum(rows * width for rows, width, _, _ in engine.calls) <= 1.25 * 624 + 2 * 32
    # Each row's logits and KV are those of the prompt prefilled alone.
    alone = RecordingEngine(1)
    decoded = engine.forward([StepItem(s, [42], len(it.token_ids)) for s, it in enumerate(step)])
    for row, item in enumerate(step):
        expected = alone.forward([StepItem(0, item.token_ids, 0)])[0]
        assert np.abs(logits[row] - expected).max() < 1e-4
        after = alone.forward([StepItem(0, [42], len(item.token_ids))])[0]
        assert np.abs(decoded[row] - after).max() < 1e-4


def test_pad_groups_cover_every_prompt_once_within_the_bound():
    rng = np.random.default_rng(11)
    for _ in range(300):
        lengths = [int(n) for n in rng.choice([1, 2, 4, 9, 30, 64, 200, 511], rng.integers(1, 65))]
        groups = _pad_groups(lengths)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        for group in groups:
            sizes = [lengths[i] for i in group]
            assert _within_bound(len(sizes), max(sizes), sum(sizes)), sizes


def test_prompts_of_equal_lengths_share_one_call():
    assert _pad_groups([7] * 32) == [list(range(32))]
    # Tiny prompts pad a little rather than pay a call each.
    assert len(_pad_groups([4, 3, 3, 2, 1, 1])) == 1
