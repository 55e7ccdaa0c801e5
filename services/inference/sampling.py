"""Token sampling for a whole batch at once: temperature, top-k, top-p, seeds.

Each sequence draws exactly one uniform number per token from its own
generator, so a seeded request gives the same text whatever else shares its
batch. The rest is vectorised numpy over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """SamplingParams are the validated sampling settings of one request."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


def sample_batch(
    logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """Returns one token id per row of `logits` [batch, vocab].

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    """
    batch, vocab = logits.shape
    tokens: np.ndarray = np.argmax(logits, axis=1)
    rows = np.array([i for i, p in enumerate(params) if p.temperature > 0], dtype=np.int64)
    if rows.size == 0:
        return tokens
    uniforms = np.array([rngs[i].random() for i in rows])
    temps = np.array([params[i].temperature for i in rows])[:, None]
    ks = np.array([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows])
    top_ps = np.array([params[i].top_p for i in rows])[:, None]
    scaled = logits[rows].astype(np.float64) / temps
    width = int(ks.max())
    if width < vocab:  # only the k best can be drawn: look at those alone
        candidates = np.argpartition(-scaled, width - 1, axis=1)[:, :width]
    else:
        candidates = np.broadcast_to(np.arange(vocab), (rows.size, vocab))
    values = np.take_along_axis(scaled, candidates, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    candidates = np.take_along_axis(candidates, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    values[np.arange(width)[None, :] >= ks[:, None]] = -np.inf  # rows with a smaller k
    probs = np.exp(values - values[:, :1])
    probs /= probs.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(probs, axis=1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p.
    probs[(cumulative - probs) >= top_ps] = 0.0
    cumulative = np.cumsum(probs, axis=1)
    picks = (cumulative < uniforms[:, None] * cumulative[:, -1:]).sum(axis=1)
    picks = np.minimum(picks, width - 1)
    tokens[rows] = candidates[np.arange(rows.size), picks]
    return tokens


def sample(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator
) -> int:
    """Returns one token id for one row of logits (see `sample_batch`)."""
    params = SamplingParams(1, temperature, top_p, top_k, None, ())
    return int(sample_batch(logits[None, :], [params], [rng])[0])
