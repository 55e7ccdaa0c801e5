"""Quality and drift signals per model version, as Prometheus metrics.

Generations: every finished choice observes its output length (tokens) and
finish reason. Its mean token log-probability (negated, so that the histogram
keeps its _sum) and confidence (the geometric-mean token probability,
services.inference.logprobs.Confidence) are observed whenever the worker
computed its tokens' log-probabilities: every v2 and OpenAI choice, never a
v1 one (v1 has no field to show them, so its surface skips that softmax per
token; they are not computed for metrics alone). A falling mean
log-probability says a version grows less sure of what it writes
(perplexity = exp(-mean logprob)).

Embeddings: every output vector observes its L2 norm (the engines normalise,
so anything but ~1 is a broken model), and `EmbeddingDrift` compares the mean
of the last `DRIFT_WINDOW` vectors with the mean of the first `DRIFT_WINDOW`
the loaded version served (its reference window): the cosine distance
between the two means rises when the inputs (or the model) drift. Memory is
bounded: per loaded version, a few block sums of `dimensions` floats.

Labels are (model, version): as bounded as the versions a worker loads. The
drift gauges go when their version stops (`forget`): an unloaded version's last
drift would keep TokenmeshEmbeddingDrift firing, and a reloaded one has no
drift until both of its new windows are full.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    # Annotations only: models.py imports this module (LoadedModel.stop forgets).
    from services.inference.models import LoadedModel
    from services.inference.v2.choices import Generation

_LABELS = ("model", "version")
#: Vectors in the reference window and in the recent window of EmbeddingDrift.
DRIFT_WINDOW = 1024
#: The recent window moves by blocks of this many vectors (its memory: window/block sums).
DRIFT_BLOCK = 64

OUTPUT_TOKENS = Histogram(
    "tokenmesh_choice_output_tokens",
    "Tokens generated per finished choice.",
    _LABELS,
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
# Negated (>= 0): a histogram whose buckets go below 0 exports no _sum, and the
# average is what a dashboard wants (exp of it is the perplexity).
MEAN_NEG_LOGPROB = Histogram(
    "tokenmesh_choice_mean_neg_logprob",
    "Minus the mean log-probability of a choice's generated tokens, in nats per token "
    "(when they were computed; exp() of it is the choice's perplexity).",
    _LABELS,
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 6, 8),
)
CONFIDENCE = Histogram(
    "tokenmesh_choice_confidence",
    "Geometric-mean token probability of a choice, in [0, 1] (when computed).",
    _LABELS,
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1),
)
CHOICES = Counter(
    "tokenmesh_choices_total",
    "Finished choices by finish reason (a request with n choices counts n).",
    (*_LABELS, "finish_reason"),
)
EMBEDDING_NORM = Histogram(
    "tokenmesh_embedding_norm",
    "L2 norm of each output embedding vector.",
    _LABELS,
    buckets=(0, 0.5, 0.9, 0.99, 0.999, 1.001, 1.01, 1.1, 2, 10),
)
EMBEDDING_DRIFT = Gauge(
    "tokenmesh_embedding_drift",
    "Cosine distance between the mean of the recent window of output vectors and the "
    "mean of the reference window (the first vectors the loaded version served).",
    _LABELS,
)
EMBEDDING_MEAN_NORM = Gauge(
    "tokenmesh_embedding_recent_mean_norm",
    "L2 norm of the mean of the recent window of output vectors (1: all alike).",
    _LABELS,
)


def observe_choice(model: LoadedModel, tokens: int, reason: str, logprobs: Sequence[float]) -> None:
    """Observes one finished choice (`logprobs`: its tokens', empty when not computed)."""
    labels = (model.name, model.version)
    OUTPUT_TOKENS.labels(*labels).observe(tokens)
    CHOICES.labels(*labels, reason or "cancelled").inc()
    if logprobs:
        mean = sum(logprobs) / len(logprobs)
        MEAN_NEG_LOGPROB.labels(*labels).observe(-mean)
        CONFIDENCE.labels(*labels).observe(min(1.0, max(0.0, float(np.exp(mean)))))


def observe_generation(generation: Generation) -> None:
    """Observes every choice of a finished generation (v1, v2 and OpenAI requests)."""
    for choice in generation.choices:
        observe_choice(
            generation.model,
            choice.tokens,
            choice.finish_reason,
            choice.confidence.logprobs,
        )


class EmbeddingDrift:
    """EmbeddingDrift compares a recent window's mean vector with a reference window's.

    The reference is the first `window` vectors; the recent window is the last
    `window` vectors after it, kept as sums of `block`-vector blocks (it moves
    a block at a time). Drift is None until both windows are full.
    """

    def __init__(self, dimensions: int, window: int = DRIFT_WINDOW, block: int = DRIFT_BLOCK):
        if window % block:
            raise ValueError("window must be a multiple of block")
        self.window = window
        self.block = block
        self._reference = np.zeros(dimensions, np.float64)
        self._reference_count = 0
        self._blocks: deque[np.ndarray] = deque(maxlen=window // block)
        self._current = np.zeros(dimensions, np.float64)
        self._current_count = 0

    def add(self, vectors: np.ndarray) -> None:
        """Adds output vectors [n, dimensions], oldest first."""
        rows = np.asarray(vectors, np.float64)
        take = min(len(rows), self.window - self._reference_count)
        if take > 0:
            self._reference += rows[:take].sum(axis=0)
            self._reference_count += take
        rows = rows[max(take, 0) :]
        while len(rows):
            room = self.block - self._current_count
            self._current += rows[:room].sum(axis=0)
            self._current_count += len(rows[:room])
            rows = rows[room:]
            if self._current_count == self.block:
                self._blocks.append(self._current)
                self._current = np.zeros_like(self._current)
                self._current_count = 0

    def recent_mean(self) -> np.ndarray | None:
        """Returns the mean of the recent window once it is full, else None."""
        if len(self._blocks) < (self._blocks.maxlen or 0):
            return None
        total: np.ndarray = np.sum(list(self._blocks), axis=0)
        return total / self.window

    def drift(self) -> float | None:
        """Returns 1 - cos(reference mean, recent mean), or None until both windows are full."""
        recent = self.recent_mean()
        if recent is None or self._reference_count < self.window:
            return None
        reference = self._reference / self.window
        norms = float(np.linalg.norm(reference) * np.linalg.norm(recent))
        if norms == 0:
            return None
        return 1.0 - float(np.dot(reference, recent)) / norms


# One tracker per loaded version (a reloaded version starts a new reference
# window; an unloaded one's tracker goes with it).
_DRIFT: weakref.WeakKeyDictionary[LoadedModel, EmbeddingDrift] = weakref.WeakKeyDictionary()


def observe_embeddings(model: LoadedModel, vectors: np.ndarray) -> None:
    """Observes a request's output vectors [n, dimensions]: norms and drift."""
    if not len(vectors):
        return
    labels = (model.name, model.version)
    norm_histogram = EMBEDDING_NORM.labels(*labels)
    for norm in np.linalg.norm(np.asarray(vectors, np.float64), axis=1):
        norm_histogram.observe(float(norm))
    tracker = _DRIFT.get(model)
    if tracker is None:
        tracker = _DRIFT[model] = EmbeddingDrift(vectors.shape[1], DRIFT_WINDOW, DRIFT_BLOCK)
        _remove_drift(labels)  # a new reference window: no earlier load's drift
    tracker.add(vectors)
    drift = tracker.drift()
    if drift is not None:
        EMBEDDING_DRIFT.labels(*labels).set(drift)
        recent = tracker.recent_mean()
        assert recent is not None  # drift() needs it
        EMBEDDING_MEAN_NORM.labels(*labels).set(float(np.linalg.norm(recent)))


def forget(model: LoadedModel) -> None:
    """Drops a stopped version's drift tracker and gauges (UnloadModel, shutdown)."""
    _DRIFT.pop(model, None)
    _remove_drift((model.name, model.version))


def _remove_drift(labels: tuple[str, str]) -> None:
    EMBEDDING_DRIFT.remove(*labels)
    EMBEDDING_MEAN_NORM.remove(*labels)
