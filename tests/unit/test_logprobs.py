"""Log-probabilities come from the distribution the sampler actually draws from."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.inference.logprobs import Confidence, row_logprobs, token_logprob
from services.inference.sampling import SamplingParams, sample_batch


def _params(temperature=1.0, top_p=1.0, top_k=0):
    return SamplingParams(16, temperature, top_p, top_k, None, ())


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)


def _reference(logits, temperature, top_k, top_p):
    """A plain, slow restatement of the sampler's distribution."""
    scaled = [v / temperature for v in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if 0 < top_k < len(scaled) else order
    total = sum(math.exp(scaled[i]) for i in kept)
    probs = {i: math.exp(scaled[i]) / total for i in kept}
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    total = sum(probs[i] for i in nucleus)
    return {i: math.log(probs[i] / total) for i in nucleus}


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 4, 0.6)],
)
def test_logprobs_match_a_reference_of_the_sampled_distribution(temperature, top_k, top_p):
    got = row_logprobs(LOGITS, _params(temperature, top_p, top_k))
    expected = _reference(LOGITS.tolist(), temperature, top_k, top_p)
    for token, logprob in enumerate(got):
        if token in expected:
            assert logprob == pytest.approx(expected[token], abs=1e-9)
        else:
            assert logprob == -np.inf
    assert np.exp(got[np.isfinite(got)]).sum() == pytest.approx(1.0)


def test_greedy_reports_the_plain_softmax_and_the_sampled_token_is_the_top_one():
    params = _params(temperature=0.0)
    token = int(sample_batch(LOGITS[None, :], [params], [np.random.default_rng(0)])[0])
    item = token_logprob(LOGITS, params, token, top_n=3)
    assert item.top[0][0] == token == 0
    softmax = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    assert item.logprob == pytest.approx(math.log(softmax[0]), abs=1e-6)


def test_top_lists_are_sorted_hold_the_sampled_token_and_only_drawable_ones():
    params = _params(temperature=1.0, top_k=3)
    for token in (0, 1, 2):
        item = token_logprob(LOGITS, params, token, top_n=5)
        values = [lp for _, lp in item.top]
        assert values == sorted(values, reverse=True)
        assert len(item.top) == 3  # only the top-k can be drawn
        assert token in [t for t, _ in item.top]
        assert all(lp <= 0 for lp in values) and item.logprob <= 0


def test_drawn_frequencies_follow_the_reported_probabilities():
    params = _params(temperature=0.8, top_p=0.9, top_k=5)
    rngs = [np.random.default_rng(seed) for seed in range(4000)]
    logits = np.repeat(LOGITS[None, :], len(rngs), axis=0)
    drawn = sample_batch(logits, [params] * len(rngs), rngs)
    reported = np.exp(row_logprobs(LOGITS, params))
    counts = np.bincount(drawn, minlength=len(LOGITS)) / len(rngs)
    assert np.all(counts[reported == 0] == 0)  # nothing outside the filters is drawn
    assert np.abs(counts - reported).max() < 0.03


def test_confidence_is_the_geometric_mean_probability():
    confidence = Confidence()
    assert confidence.score == 1.0
    confidence.add([token_logprob(LOGITS, _params(0.0), t, 0) for t in (0, 1)])
    assert 0 <= confidence.score <= 1
    assert confidence.score == pytest.approx(math.exp(confidence.mean_logprob))


def test_top_n_is_bounded():
    with pytest.raises(ValueError):
        token_logprob(LOGITS, _params(), 0, top_n=21)
