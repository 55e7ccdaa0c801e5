"""The engine interfaces the scheduler and the embedder drive.

A `GenerativeEngine` runs one scheduler step at a time: for each item it
consumes some tokens of one sequence (a whole prompt at prefill, one token at
decode), appends their keys/values to that sequence's KV slot, and returns
the logits of the item's last position. Sampling happens in the scheduler, so
every engine samples the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepItem:
    """StepItem is one sequence's share of a step.

    Attributes:
        slot: the sequence's KV slot.
        token_ids: tokens to feed (the prompt at prefill, one token at decode).
        start: how many tokens of this sequence the slot already holds.
    """

    slot: int
    token_ids: Sequence[int]
    start: int


class GenerativeEngine(abc.ABC):
    """GenerativeEngine computes next-token logits with a per-slot KV cache.

    Contract: `forward` is called from one thread at a time (the scheduler's
    step thread); it may block for the duration of the compute.
    """

    #: name identifies the engine kind, e.g. "onnxruntime".
    name: str
    vocab_size: int
    context_length: int

    @abc.abstractmethod
    def allocate(self, max_slots: int) -> None:
        """Reserves KV memory for `max_slots` sequences of full context."""

    @abc.abstractmethod
    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        """Returns float32 logits [len(items), vocab] of each item's last token."""

    def warm_up(self) -> None:
        """Runs a prefill and a decode so the first request pays no start-up cost."""
        self.forward([StepItem(slot=0, token_ids=[1, 2, 3], start=0)])
        self.forward([StepItem(slot=0, token_ids=[4], start=3)])


class EmbeddingEngine(abc.ABC):
    """EmbeddingEngine turns token batches into unit-length vectors."""

    name: str
    dimensions: int

    @abc.abstractmethod
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Returns float32 [batch, dimensions] L2-normalised embeddings."""
