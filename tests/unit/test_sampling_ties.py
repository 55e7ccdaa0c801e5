"""Tied logits: the sampler and logprobs keep the same tokens (equal values: lower id first).

FP16 engines (TensorRT) tie often. When the sampler broke ties in the order
argpartition returned its candidates and logprobs broke them by id, a tie at
the top-k or nucleus edge drew tokens that logprobs had filtered out: -inf.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.inference.logprobs import row_logprobs, token_logprob
from services.inference.sampling import SamplingParams, sample_batch

VOCAB = 4096
TIE_PARAMS = (
    SamplingParams(1, 1.0, 1.0, 2, None, ()),  # the top-k edge inside three equal maxima
    SamplingParams(1, 1.0, 0.5, 0, None, ()),  # the nucleus edge inside them
    SamplingParams(1, 1.0, 0.6, 50, None, ()),
    SamplingParams(1, 0.8, 0.95, 50, None, ()),
)


def _three_equal_maxima(rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(0, 2, VOCAB).astype(np.float32)
    top = np.argsort(-logits)[:3]
    logits[top] = logits[top[0]]
    return logits


def _nucleus_splits_the_tie(rng: np.random.Generator) -> np.ndarray:
    """Three equal maxima of ~0.3 of the mass each: top_p 0.5 keeps two of the three."""
    logits = rng.normal(0, 1, VOCAB).astype(np.float32)
    tied = rng.choice(VOCAB, 3, replace=False)
    rest = np.delete(logits, tied).astype(np.float64)
    logits[tied] = np.float32(math.log(3 * np.exp(rest).sum()))
    return logits


def _kept(logits: np.ndarray, params: SamplingParams) -> set[int]:
    return set(np.flatnonzero(np.isfinite(row_logprobs(logits, params))).tolist())


@pytest.mark.parametrize("make", [_three_equal_maxima, _nucleus_splits_the_tie])
def test_a_token_drawn_from_tied_logits_has_a_finite_logprob_in_the_kept_set(make):
    rng = np.random.default_rng(0)
    for trial in range(150):
        logits = make(rng)
        for params in TIE_PARAMS:
            kept = _kept(logits, params)
            for seed in (trial, trial + 1000):
                token = int(sample_batch(logits[None], [params], [np.random.default_rng(seed)])[0])
                assert token in kept, (trial, seed, params)
                assert math.isfinite(token_logprob(logits, params, token, 5).logprob)


def test_of_tied_maxima_the_filters_keep_the_lowest_ids_on_both_sides():
    logits = np.zeros(VOCAB, np.float32)
    logits[[3000, 17, 900]] = 5.0  # three equal maxima, ids not in order
    drawn = {
        int(sample_batch(logits[None], [TIE_PARAMS[0]], [np.random.default_rng(s)])[0])
        for s in range(200)
    }
    assert drawn == _kept(logits, TIE_PARAMS[0]) == {17, 900}
    split = _nucleus_splits_the_tie(np.random.default_rng(3))
    tied = np.flatnonzero(split == split.max())
    drawn = {
        int(sample_batch(split[None], [TIE_PARAMS[1]], [np.random.default_rng(s)])[0])
        for s in range(200)
    }
    assert drawn == _kept(split, TIE_PARAMS[1]) == set(tied[:2].tolist())


def test_batched_fp16_logits_draw_only_tokens_with_finite_logprobs():
    """Coarse (FP16-like) logits tie inside the candidates and at the spare's edge."""
    rng = np.random.default_rng(1)
    top_k = [
        SamplingParams(1, t, p, k, None, ())
        for t, p, k in ((1.0, 1.0, 2), (1.0, 1.0, 3), (1.0, 0.6, 50), (0.8, 0.95, 50))
    ]
    # A row without k makes the batch look at its nucleus window or the vocabulary.
    mixed = [
        *top_k,
        SamplingParams(1, 1.0, 0.5, 0, None, ()),
        SamplingParams(1, 1.3, 0.9, 0, None, ()),
    ]
    for step in range(60):
        scale = (1, 4, 8)[step % 3]  # peaked rows: the nucleus fits the 256-token window
        logits = (rng.normal(0, 3 * scale, (16, VOCAB)) * 8).round() / 8  # ties everywhere
        logits = logits.astype(np.float16).astype(np.float32)
        choices = top_k if step % 2 else mixed
        params = [choices[(step + i) % len(choices)] for i in range(16)]
        rngs = [np.random.default_rng(step * 16 + i) for i in range(16)]
        for i, token in enumerate(sample_batch(logits, params, rngs)):
            assert int(token) in _kept(logits[i], params[i]), (step, i, params[i])


def _reference(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.lexsort((np.arange(row.size), -row.astype(np.float64)))[:k]]


def test_best_first_ranks_equal_values_by_lower_id():
    from services.inference.sampling import best_first

    rng = np.random.default_rng(2)
    for _ in range(50):
        row = rng.integers(-20, 20, 1000).astype(np.float32) / 4
        for k in (0, 1, 2, 3, 50, 999, 1000, 1200):
            assert best_first(row, k).tolist() == _reference(row, k), k


@pytest.mark.parametrize("width", [2, 50, 256])
def test_the_samplers_candidates_are_each_rows_best_with_ties_by_lower_id(width):
    from services.inference.sampling import _best_candidates

    rng = np.random.default_rng(width)
    for scale in (1, 4, 1000):  # heavy ties, some ties, none
        logits = (rng.normal(0, 3, (8, VOCAB)) * scale).round().astype(np.float32)
        candidates, values = _best_candidates(logits, width)
        for i in range(8):
            assert candidates[i].tolist() == _reference(logits[i], width)
            assert values[i].tolist() == logits[i, candidates[i]].tolist()


# Drawn by the sampler before ties were ranked by id: tie-free logits draw the same.
LOGITS = (np.random.default_rng(2024).normal(size=(8, 4096)) * 3).astype(np.float32)
BEFORE = {
    (0.8, 0.95, 50): [937, 2537, 348, 3262, 1399, 3573, 2711, 1198],
    (1.0, 0.9, 0): [156, 2779, 2926, 911, 168, 3491, 2011, 2210],
    (0.7, 1.0, 7): [660, 2913, 348, 2845, 3654, 3573, 2591, 1198],
    (1.0, 0.999, 0): [375, 1288, 2926, 217, 2086, 3825, 361, 891],
    (1.2, 1.0, 0): [3214, 3581, 348, 1557, 3211, 3546, 4003, 2897],
}
MIXED_BEFORE = [761, 1297, 2926, 2571, 1705, 3573, 2720, 3253]


def test_seeded_draws_on_tie_free_logits_are_those_of_before():
    for (temperature, top_p, top_k), tokens in BEFORE.items():
        params = [SamplingParams(1, temperature, top_p, top_k, None, ())] * 8
        rngs = [np.random.default_rng(100 + i) for i in range(8)]
        assert sample_batch(LOGITS, params, rngs).tolist() == tokens
    mixed = [SamplingParams(1, t, p, k, None, ()) for t, p, k in BEFORE] + [
        SamplingParams(1, 0.5, 0.6, 300, None, ()),
        SamplingParams(1, 0, 1.0, 0, None, ()),
        SamplingParams(1, 0.9, 0.3, 2, None, ()),
    ]
    rngs = [np.random.default_rng(200 + i) for i in range(8)]
    assert sample_batch(LOGITS, mixed, rngs).tolist() == MIXED_BEFORE
