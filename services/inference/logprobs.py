"""Log-probabilities of generated tokens, from the distribution that was sampled.

For a sampled row (temperature > 0) that distribution is softmax(logits / T)
restricted to the top-k tokens and then to the nucleus (the smallest prefix,
best first, whose mass reaches top_p), renormalised: exactly what
`services.inference.sampling` draws from. A token outside the filters could
not have been drawn; it never appears in a top list. A greedy row
(temperature 0) reports the plain softmax (temperature 1), as OpenAI does:
the sampled token is then always the top one.

Per choice, `Confidence` summarises the sampled tokens: the mean log-probability
and its exponential, the geometric-mean token probability in [0, 1], which a
client can threshold to accept an answer or fall back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.inference.sampling import SamplingParams, best_first

#: The most alternatives a request may ask for per token.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """TokenLogprob is one generated token's log-probability and its best alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


def row_logprobs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Returns the log-probability of every token under the distribution `params` samples.

    Tokens the filters exclude get -inf. `logits` is one row [vocab].
    """
    values = logits.astype(np.float64)
    if params.temperature > 0:
        values = values / params.temperature
    logprobs = values - _logsumexp(values)
    if params.temperature <= 0:
        return logprobs
    vocab = values.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k == vocab and params.top_p >= 1:
        return logprobs  # no filter: the whole tempered softmax
    # Only the k best need an order (argpartition, then sort k) rather than
    # the vocabulary: this runs for every token of a v2 stream. Equal values
    # rank by lower id, as in the sampler: an arbitrary pick among tokens tied
    # at the k-th (or nucleus) edge made the sampled token -inf here.
    kept = best_first(values, k)
    keep = np.zeros(vocab, dtype=bool)
    keep[kept] = True
    if params.top_p < 1:
        # The nucleus is taken over the top-k renormalised mass, as the sampler does.
        probs = np.exp(logprobs[kept] - _logsumexp(logprobs[kept]))
        before = np.cumsum(probs) - probs
        keep[kept[before >= params.top_p]] = False
    filtered = np.where(keep, logprobs, -np.inf)
    result: np.ndarray = filtered - _logsumexp(filtered[keep])
    return result


def token_logprob(
    logits: np.ndarray, params: SamplingParams, token_id: int, top_n: int
) -> TokenLogprob:
    """Returns the sampled token's log-probability and the `top_n` best tokens (0-20)."""
    if not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_n must be 0-{MAX_TOP_LOGPROBS}")
    logprobs = row_logprobs(logits, params)
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        width = min(top_n, int(np.isfinite(logprobs).sum()))
        top = tuple((int(i), float(logprobs[i])) for i in best_first(logprobs, width))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)


def token_bytes(pieces: Sequence[bytes] | None, token_id: int, text: str) -> bytes:
    """Returns a token's bytes: its piece (`Tokenizer.piece_bytes()`) when there is one.

    A byte-level BPE piece may be part of a multi-byte character, which
    `text` (the token decoded alone) shows as U+FFFD. Without pieces (or for
    an id past them: padded logits) it is `text`'s UTF-8.
    """
    if pieces is not None and 0 <= token_id < len(pieces):
        return pieces[token_id]
    return text.encode()


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.exp(values - top).sum()))


@dataclass
class Confidence:
    """Confidence accumulates one choice's sampled-token log-probabilities."""

    logprobs: list[float] = field(default_factory=list)

    def add(self, items: Sequence[TokenLogprob]) -> None:
        """Adds the log-probabilities of newly generated tokens."""
        self.logprobs.extend(item.logprob for item in items)

    @property
    def mean_logprob(self) -> float:
        """Returns the mean log-probability per token (0 before any token)."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    @property
    def score(self) -> float:
        """Returns the geometric-mean token probability, in [0, 1] (1 before any token)."""
        return min(1.0, max(0.0, math.exp(self.mean_logprob)))
