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

from services.inference.engines.prefix_cache import PrefixCache

#: How the ONNX Runtime engine runs decode steps (TOKENMESH_ENGINE_DECODE).
DECODE_PATHS = ("in-place", "padded")


@dataclass(frozen=True)
class StepItem:
    """StepItem is one sequence's share of a step.

    Attributes:
        slot: the sequence's KV slot.
        token_ids: tokens to feed (the prompt at prefill, one token at decode).
        start: how many tokens of this sequence the slot already holds.
        scope: whose prompt it is (the request's tenant; "" for internal callers):
            an engine reuses a prompt's computation (its prefix cache, or an
            identical prompt of the same step) only within one scope, since the
            caller sees the reuse (`cached_prompt_tokens`). An engine whose
            model is shared by all tenants maps every scope to one.
    """

    slot: int
    token_ids: Sequence[int]
    start: int
    scope: str = ""


class GenerativeEngine(abc.ABC):
    """GenerativeEngine computes next-token logits with a per-slot KV cache.

    Contract: `forward` is called from one thread at a time (the scheduler's
    step thread); it may block for the duration of the compute.
    """

    #: name identifies the engine kind, e.g. "onnxruntime".
    name: str
    vocab_size: int
    context_length: int
    #: prefix_cache, where the engine has one, reuses the KV of repeated prompt heads.
    prefix_cache: PrefixCache | None = None

    @abc.abstractmethod
    def allocate(self, max_slots: int) -> None:
        """Reserves KV memory for `max_slots` sequences of full context."""

    @abc.abstractmethod
    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        """Returns float32 logits [len(items), vocab] of each item's last token."""

    def move_slot(self, source: int, target: int) -> bool:
        """Moves the sequence held in slot `source` (its KV) to the free slot `target`.

        The scheduler moves its highest running sequence into a lower slot a
        leaving one freed, so running sequences keep the lowest slots (engines
        whose decode steps span a range of slots then compute no idle one).
        Returns False where the engine does not move slots (nothing happened).
        """
        return False

    def take_reused_tokens(self, slot: int) -> int:
        """Returns (and forgets) how many tokens of the prompt last prefilled in `slot`
        were not computed: copied from the prefix cache, or from an identical
        prompt prefilled in the same step. 0 for engines without reuse."""
        return 0

    def warm_up(self, max_slots: int = 1) -> None:
        """Runs a prefill and a decode at full batch so no request pays start-up costs.

        Runtimes grow their memory arenas on the first call of a larger shape
        (ONNX Runtime: ~80 ms for a first 32-prompt prefill here), which would
        land on the first burst of requests: warming up at the largest batch
        the scheduler can run leaves every later shape to fit.
        """
        width = max(1, min(64, self.context_length // 8))
        # A distinct prompt per slot: an engine may compute a repeated prompt once.
        prompts = [
            [1 + slot % (self.vocab_size - 1)] + [1 + i % 8 for i in range(width - 1)]
            for slot in range(max_slots)
        ]
        self.forward([StepItem(slot, prompt, 0) for slot, prompt in enumerate(prompts)])
        self.forward([StepItem(slot, [4], width) for slot in range(max_slots)])


class EmbeddingEngine(abc.ABC):
    """EmbeddingEngine turns token batches into unit-length vectors."""

    name: str
    dimensions: int

    @abc.abstractmethod
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Returns float32 [batch, dimensions] L2-normalised embeddings."""
