"""Sampling: greedy, top-k, top-p and seeds."""

from __future__ import annotations

import numpy as np

from services.inference.sampling import sample

LOGITS = np.array([1.0, 3.0, 2.0, 0.5], np.float32)


def _draws(n: int = 400, **kwargs) -> list[int]:
    rng = np.random.default_rng(7)
    return [sample(LOGITS, rng=rng, **kwargs) for _ in range(n)]


def test_temperature_zero_is_argmax():
    assert set(_draws(20, temperature=0, top_k=0, top_p=1.0)) == {1}


def test_top_k_one_is_argmax_and_top_k_two_keeps_two():
    assert set(_draws(temperature=1.0, top_k=1, top_p=1.0)) == {1}
    assert set(_draws(temperature=1.0, top_k=2, top_p=1.0)) == {1, 2}


def test_small_top_p_keeps_only_the_most_likely():
    assert set(_draws(temperature=1.0, top_k=0, top_p=0.1)) == {1}


def test_full_sampling_follows_the_softmax():
    counts = np.bincount(_draws(4000, temperature=1.0, top_k=0, top_p=1.0), minlength=4) / 4000
    expected = np.exp(LOGITS) / np.exp(LOGITS).sum()
    assert np.abs(counts - expected).max() < 0.03


def test_same_seed_same_draws():
    assert _draws(50, temperature=1.0, top_k=0, top_p=1.0) == _draws(
        50, temperature=1.0, top_k=0, top_p=1.0
    )


def test_a_row_samples_the_same_alone_or_in_a_batch():
    from services.inference.sampling import SamplingParams, sample_batch

    logits = np.random.default_rng(1).normal(size=(6, 300)).astype(np.float32)
    params = [SamplingParams(1, 0.8, 0.9, k, None, ()) for k in (0, 5, 50, 0, 299, 1)]
    batched = sample_batch(logits, params, [np.random.default_rng(i) for i in range(6)])
    for i in range(6):
        alone = sample_batch(logits[i : i + 1], [params[i]], [np.random.default_rng(i)])
        assert alone[0] == batched[i]


def _reference(row: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """The textbook draw: softmax, sort, cut to top-k, cut to the nucleus, inverse CDF."""
    scaled = row.astype(np.float64) / temperature
    weights = np.exp(scaled - scaled.max())
    order = np.argsort(-scaled, kind="stable")
    if 0 < top_k < row.size:
        order = order[:top_k]
    probs = weights[order] / weights[order].sum()
    cumulative = np.cumsum(probs)
    probs[(cumulative - probs) >= top_p] = 0.0
    cumulative = np.cumsum(probs)
    return int(order[min(int((cumulative < u * cumulative[-1]).sum()), order.size - 1)])


def test_fast_paths_draw_what_a_full_sort_draws():
    from services.inference.sampling import SamplingParams, sample_batch

    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(16, 4096)) * 4).astype(np.float32)  # peaked: the nucleus window
    for top_k, top_p in ((0, 0.9), (50, 0.95), (0, 0.5), (7, 1.0)):
        params = [SamplingParams(1, 0.8, top_p, top_k, None, ())] * 16
        drawn = sample_batch(logits, params, [np.random.default_rng(i) for i in range(16)])
        expected = [
            _reference(logits[i], 0.8, top_k, top_p, np.random.default_rng(i).random())
            for i in range(16)
        ]
        assert drawn.tolist() == expected, (top_k, top_p)


def test_top_indices_finds_each_rows_largest_logits_with_ties_and_any_vocab():
    from services.inference.sampling import top_indices

    rng = np.random.default_rng(9)
    for vocab in (4096, 4000, 64):
        for width in (1, 2, 50, 256):
            if width >= vocab:
                continue
            logits = (rng.normal(size=(9, vocab)) * 3).astype(np.float32)
            logits[::2] = np.round(logits[::2])  # many ties
            got = np.take_along_axis(logits, top_indices(logits, width), axis=1)
            expected = np.partition(logits, vocab - width, axis=1)[:, vocab - width :]
            assert np.array_equal(np.sort(got, axis=1), np.sort(expected, axis=1)), (vocab, width)


def test_unfiltered_draws_are_the_inverse_cdf_in_vocabulary_order():
    from services.inference.sampling import SamplingParams, sample_batch

    rng = np.random.default_rng(9)
    logits = (rng.normal(size=(16, 4096)) * 3).astype(np.float32)
    temperatures = [0.3 + 0.1 * i for i in range(16)]  # one row's temperature must not leak
    params = [SamplingParams(1, t, 1.0, 0, None, ()) for t in temperatures]
    drawn = sample_batch(logits, params, [np.random.default_rng(i) for i in range(16)])
    expected = []
    for i, temperature in enumerate(temperatures):
        scaled = logits[i].astype(np.float64) / temperature
        cumulative = np.cumsum(np.exp(scaled - scaled.max()))
        u = np.random.default_rng(i).random()
        expected.append(int(np.searchsorted(cumulative, u * cumulative[-1], side="left")))
    assert drawn.tolist() == expected
