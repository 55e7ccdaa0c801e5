"""Token sampling for a whole batch at once: temperature, top-k, top-p, seeds.

Each sequence draws exactly one uniform number per token from its own
generator, so a seeded request gives the same text whatever else shares its
batch. The rest is vectorised numpy over the batch. Equal logits rank by
token id, lower first (`best_first`), as in `services.inference.logprobs`,
so both keep the same tokens when logits tie at a filter's edge.
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


# Nucleus sampling without top-k looks at this many best tokens first; only a
# row whose nucleus is wider than that pays for sorting the whole vocabulary.
NUCLEUS_WINDOW = 256


def sample_batch(
    logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """Returns one token id per row of `logits` [batch, vocab].

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Rows
    without filters draw from the whole softmax (no sort); filtered rows find
    their k (or NUCLEUS_WINDOW) best tokens in O(vocab) and sort only those,
    so a full sort happens only for a nucleus wider than the window. Each row
    draws the same token alone or in any batch.
    """
    batch, vocab = logits.shape
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    # The argmax is a pass over the whole batch: only for greedy rows.
    tokens: np.ndarray = (
        np.argmax(logits, axis=1) if len(sampled) < batch else np.zeros(batch, np.intp)
    )
    if not sampled:
        return tokens
    uniforms = np.zeros(batch)
    for i in sampled:  # exactly one draw per sampled token, from the row's own generator
        uniforms[i] = rngs[i].random()
    plain: list[int] = []
    filtered: list[int] = []
    for i in sampled:
        (plain if _unfiltered(params[i], vocab) else filtered).append(i)
    if plain:  # no top-k or nucleus: only the temperatures matter
        temps = np.array([params[i].temperature for i in plain])[:, None]
        tokens[plain] = _sample_unfiltered(logits[plain], temps, uniforms[plain])
    if filtered:
        temps = np.array([params[i].temperature for i in filtered])[:, None]
        ks = np.array([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in filtered])
        top_ps = np.array([params[i].top_p for i in filtered])[:, None]
        tokens[filtered] = _sample_filtered(logits[filtered], temps, ks, top_ps, uniforms[filtered])
    return tokens


def _unfiltered(params: SamplingParams, vocab: int) -> bool:
    return not 0 < params.top_k < vocab and params.top_p >= 1


def _sample_unfiltered(logits: np.ndarray, temps: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from the whole softmax: no filter, so no sort is needed.

    One float64 buffer, updated in place: a fresh [batch, vocab] array per
    step (five of them) cost more than the arithmetic (each is a new mapping
    whose pages fault in; 32 x 4096: 2.2 -> 0.85 ms a step, same draws).
    """
    cumulative = logits.astype(np.float64)
    cumulative /= temps
    cumulative -= cumulative.max(axis=1, keepdims=True)
    np.exp(cumulative, out=cumulative)
    np.cumsum(cumulative, axis=1, out=cumulative)
    picks = (cumulative < uniforms[:, None] * cumulative[:, -1:]).sum(axis=1)
    drawn: np.ndarray = np.minimum(picks, logits.shape[1] - 1)
    return drawn


def _sample_filtered(
    logits: np.ndarray, temps: np.ndarray, ks: np.ndarray, top_ps: np.ndarray, uniforms: np.ndarray
) -> np.ndarray:
    """Top-k and nucleus draws over each row's best tokens, best first."""
    rows, vocab = logits.shape
    width = _candidate_width(logits, temps, ks, top_ps)
    if width < vocab:
        # Temperature does not change the order: select on the raw logits.
        candidates, best = _best_candidates(logits, width)
        values = best.astype(np.float64) / temps
    else:
        values = logits.astype(np.float64) / temps
        candidates = np.argsort(-values, axis=1, kind="stable")  # equal values: lower id first
        values = np.take_along_axis(values, candidates, axis=1)
    values[np.arange(width)[None, :] >= ks[:, None]] = -np.inf  # rows with a smaller k
    probs = np.exp(values - values[:, :1])
    # Normalised over each row's top k; rows without k, over the whole vocabulary.
    denominators = probs.sum(axis=1, keepdims=True)
    no_k = ks >= vocab
    if width < vocab and no_k.any():
        scaled = logits[no_k].astype(np.float64) / temps[no_k] - values[no_k, :1]
        denominators[no_k] = np.exp(scaled).sum(axis=1, keepdims=True)
    probs /= denominators
    cumulative = np.cumsum(probs, axis=1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p.
    probs[(cumulative - probs) >= top_ps] = 0.0
    cumulative = np.cumsum(probs, axis=1)
    picks = (cumulative < uniforms[:, None] * cumulative[:, -1:]).sum(axis=1)
    picks = np.minimum(picks, width - 1)
    drawn: np.ndarray = candidates[np.arange(rows), picks]
    return drawn


def best_first(row: np.ndarray, k: int) -> np.ndarray:
    """Returns the ids of the `k` largest values of one row, best first.

    Equal values rank by lower id: the one tie rule of the sampler and of
    `services.inference.logprobs`, so both keep the same tokens when values
    tie at the top-k or nucleus edge (FP16 logits tie often). O(vocab) with
    a sort of k, unless ties straddle the k-th value (one more O(vocab) pass).
    """
    vocab = row.shape[0]
    if k >= vocab:
        return np.argsort(-row, kind="stable")
    if k <= 0:
        return np.zeros(0, np.intp)
    negated = -row
    # kth=k also places the (k+1)-th best: when it is worse than every one of
    # the k best, no id outside them ties one inside.
    parted = np.argpartition(negated, k)
    best = parted[:k]
    if negated[parted[k]] == negated[best].max():
        # The k-th best value continues past k: of those, the lowest ids.
        edge = row[parted[k]]
        above = np.flatnonzero(row > edge)
        best = np.concatenate((above, np.flatnonzero(row == edge)[: k - above.size]))
    else:  # NaN logits land here too: no exception, their logprobs are NaN
        best = np.sort(best)
    # Both parts are in id order: the stable sort keeps it among equal values.
    ordered: np.ndarray = best[np.argsort(negated[best], kind="stable")]
    return ordered


def _best_candidates(logits: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns each row's `width` best token ids and their logits, best first.

    Equal logits rank by lower id, as `best_first`. `top_indices` breaks ties
    arbitrarily, so it is asked for one spare: a row whose width-th logit is
    above the spare holds exactly its `width` best. Their order costs one
    stable sort, fast because argpartition leaves the candidates nearly
    sorted (sorting them by id first made that sort 5x slower, +10% a step):
    only rows with equal logits pay for the tie rule.
    """
    candidates = top_indices(logits, width + 1)
    values = _take_rows(logits, candidates)
    order = np.argsort(-values, axis=1, kind="stable")
    candidates = _take_rows(candidates, order)
    values = _take_rows(values, order)
    same = values[:, 1:] == values[:, :-1]
    if same.any():
        _rank_ties(logits, candidates, values, same)
    return candidates[:, :width], values[:, :width]


def _rank_ties(
    logits: np.ndarray, candidates: np.ndarray, values: np.ndarray, same: np.ndarray
) -> None:
    """Puts equal logits in id order, in place, in rows of `candidates` (best first, one spare).

    `same[row, i]` says that positions i and i + 1 hold equal logits.
    """
    vocab = logits.shape[1]
    width = candidates.shape[1] - 1
    tied = np.flatnonzero(same.any(axis=1))
    # Number each run of equal logits; sorting run * vocab + id orders the
    # ids inside each run and leaves the runs (and so `values`) where they are.
    runs = np.zeros((tied.size, width + 1), np.intp)
    runs[:, 1:] = np.cumsum(~same[tied], axis=1)
    runs *= vocab
    candidates[tied] = np.sort(runs + candidates[tied], axis=1) - runs
    for row in np.flatnonzero(same[:, width - 1]):
        # The width-th logit ties the spare, so maybe tokens outside the
        # candidates: of all the row's tokens at that logit, the lowest ids.
        edge = values[row, width - 1]
        above = int(np.count_nonzero(values[row, :width] > edge))
        candidates[row, above:width] = np.flatnonzero(logits[row] == edge)[: width - above]


def _take_rows(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Returns take_along_axis(array, indices, axis=1), by flat indices.

    take_along_axis builds index grids that cost more than the gather:
    ~10 against ~4 us on 32 x 51, three times a step.
    """
    rows, columns = array.shape
    taken: np.ndarray = array.reshape(-1)[indices + (np.arange(rows) * columns)[:, None]]
    return taken


def top_indices(logits: np.ndarray, width: int) -> np.ndarray:
    """Returns the indices of each row's `width` largest logits (in no order).

    An argpartition of whole rows costs ~1 ms for 32 x 4096 (15% of a decode
    step here). Instead: split each row into groups (strided, so the group
    maxima are one fast reduction); every top-`width` logit lies in one of the
    `width` groups with the largest maxima (a logit outside them has `width`
    larger group maxima above it), so only those groups are partitioned.
    Group count ~ sqrt(width * vocab) balances the two partitions.
    """
    rows, vocab = logits.shape
    groups = 1 << max(round(np.log2(np.sqrt(width * vocab))), 0)
    groups = max(groups, 1 << (width - 1).bit_length())
    size = -(-vocab // groups)
    if groups >= vocab or size * groups != vocab:  # nothing to gain, or ragged groups
        return np.argpartition(logits, vocab - width, axis=1)[:, vocab - width :]
    maxima = logits.reshape(rows, size, groups).max(axis=1)
    best_groups = np.argpartition(maxima, groups - width, axis=1)[:, groups - width :]
    members = (best_groups[:, :, None] + groups * np.arange(size)).reshape(rows, -1)
    values = np.take_along_axis(logits, members, axis=1)
    keep = np.argpartition(values, values.shape[1] - width, axis=1)[:, values.shape[1] - width :]
    picked: np.ndarray = np.take_along_axis(members, keep, axis=1)
    return picked


def _candidate_width(
    logits: np.ndarray, temps: np.ndarray, ks: np.ndarray, top_ps: np.ndarray
) -> int:
    """How many best tokens per row can be drawn (the vocabulary when a full sort is needed)."""
    vocab = logits.shape[1]
    no_k = ks >= vocab
    if not no_k.any():
        return int(ks.max())
    if vocab <= NUCLEUS_WINDOW or int(ks[~no_k].max(initial=0)) > NUCLEUS_WINDOW:
        return int(vocab)
    # Do each k-less row's NUCLEUS_WINDOW best tokens hold its top_p of the mass?
    free = logits[no_k]
    best = np.partition(free, vocab - NUCLEUS_WINDOW, axis=1)[:, vocab - NUCLEUS_WINDOW :]
    top = best.max(axis=1, keepdims=True)
    window = np.exp((best - top) / temps[no_k]).sum(axis=1, keepdims=True)
    total = np.exp((free - top) / temps[no_k]).sum(axis=1, keepdims=True)
    return NUCLEUS_WINDOW if bool((window / total >= top_ps[no_k]).all()) else vocab


def sample(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator
) -> int:
    """Returns one token id for one row of logits (see `sample_batch`)."""
    params = SamplingParams(1, temperature, top_p, top_k, None, ())
    return int(sample_batch(logits[None, :], [params], [rng])[0])
