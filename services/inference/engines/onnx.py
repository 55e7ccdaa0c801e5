"""ONNX Runtime engines (CPU by default): a KV-cached decoder and an embedder.

The decoder's KV cache lives in preallocated per-layer arrays
[slots, heads, context, head_dim]. A decode step gathers the running slots'
caches up to the longest one, masks each row's padding with attention_mask,
and writes the new key/value column back into each slot, so sequences of
different lengths share one batched forward pass. While the same slots keep
decoding step after step, the next step feeds the previous step's `present`
outputs as its past instead of gathering again (the gather was a quarter of
a batch-32 step): the batch's layout is the same, one column longer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.inference.engines.base import EmbeddingEngine, GenerativeEngine, StepItem

logger = logging.getLogger(__name__)


def session_options(threads: int) -> ort.SessionOptions:
    """Returns tuned CPU session options (all graph optimisations, fixed threads)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Spinning worker threads would steal the cores the event loop and the
    # gRPC threads need between steps.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


@dataclass
class _Carry:
    """_Carry is what one decode step leaves for the next, if its batch stays the same."""

    slots: tuple[int, ...]
    starts: np.ndarray
    mask: np.ndarray
    present: list[np.ndarray]


class OnnxGenerativeEngine(GenerativeEngine):
    """OnnxGenerativeEngine runs a decoder exported with past/present KV tensors.

    Args:
        model_path: the ONNX file (inputs input_ids, attention_mask,
            position_ids, past_key_values.{i}.key/value).
        n_layer, n_head, head_dim, vocab_size, context_length: its shape.
        threads: intra-op threads (0 = one per core).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        n_layer: int,
        n_head: int,
        head_dim: int,
        vocab_size: int,
        context_length: int,
        threads: int = 0,
    ) -> None:
        self.session = ort.InferenceSession(
            str(model_path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.vocab_size = vocab_size
        self.context_length = context_length
        self._past_names = [
            f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")
        ]
        self._cache: list[np.ndarray] = []
        self._carry: _Carry | None = None

    def allocate(self, max_slots: int) -> None:
        shape = (max_slots, self.n_head, self.context_length, self.head_dim)
        self._cache = [np.zeros(shape, np.float32) for _ in self._past_names]
        self._carry = None
        logger.info(
            "KV cache: %d slots, %.1f MiB", max_slots, sum(c.nbytes for c in self._cache) / 2**20
        )

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        logits = np.empty((len(items), self.vocab_size), np.float32)
        fresh = [i for i, item in enumerate(items) if item.start == 0]
        decode = [i for i, item in enumerate(items) if item.start > 0 and len(item.token_ids) == 1]
        chunks = [i for i in range(len(items)) if i not in fresh and i not in decode]
        # The carry holds from one call to the next only: a slot a new prompt
        # took over in between (a new sequence) cannot match it.
        carry, self._carry = self._carry, None
        if fresh:
            logits[fresh] = self._prefill_batch([items[i] for i in fresh])
        for i in chunks:
            logits[i] = self._prefill(items[i])
        if decode:
            logits[decode] = self._decode([items[i] for i in decode], carry)
        return logits

    def _prefill_batch(self, items: Sequence[StepItem]) -> np.ndarray:
        """Feeds several whole prompts in one call, right-padded to the longest.

        Causal attention keeps each prompt's real tokens blind to its padding,
        so the padded positions only need masking, not separate calls.
        """
        lengths = np.fromiter((len(it.token_ids) for it in items), np.int64)
        width = int(lengths.max())
        ids = np.zeros((len(items), width), np.int64)
        for row, item in enumerate(items):
            ids[row, : lengths[row]] = item.token_ids
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(items), width))
        empty = np.zeros((len(items), self.n_head, 0, self.head_dim), np.float32)
        outputs = self._run(ids, mask, np.ascontiguousarray(positions), [empty] * len(self._cache))
        for cache, present in zip(self._cache, outputs[1:], strict=True):
            for row, item in enumerate(items):
                cache[item.slot, :, : lengths[row]] = present[row, :, : lengths[row]]
        last: np.ndarray = outputs[0][np.arange(len(items)), lengths - 1]
        return last

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> list[np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self._past_names, past, strict=True))
        outputs: list[np.ndarray] = self.session.run(None, feeds)
        return outputs

    def _prefill(self, item: StepItem) -> np.ndarray:
        """Feeds a prompt (or a chunk of one) for a single slot."""
        n = len(item.token_ids)
        end = item.start + n
        past = [cache[item.slot : item.slot + 1, :, : item.start] for cache in self._cache]
        outputs = self._run(
            np.asarray([item.token_ids], np.int64),
            np.ones((1, end), np.int64),
            np.arange(item.start, end, dtype=np.int64)[None],
            past,
        )
        for cache, present in zip(self._cache, outputs[1:], strict=True):
            cache[item.slot, :, item.start : end] = present[0, :, item.start : end]
        last_logits: np.ndarray = outputs[0][0, -1]
        return last_logits

    def _decode(self, items: Sequence[StepItem], carry: _Carry | None) -> np.ndarray:
        """Feeds one token for each of several slots in one batched call."""
        slots = np.fromiter((it.slot for it in items), np.int64)
        starts = np.fromiter((it.start for it in items), np.int64)
        if (
            carry is not None
            and carry.slots == tuple(slots.tolist())
            and np.array_equal(carry.starts + 1, starts)
        ):
            # Same rows, one step on: last step's present is this step's past,
            # its padding still masked, and every row attends to its new token.
            past = carry.present
            width = past[0].shape[2]
            mask = np.concatenate([carry.mask, np.ones((len(items), 1), np.int64)], axis=1)
        else:
            width = int(starts.max())
            # Row b attends to its first starts[b] cached positions and its new token.
            mask = (np.arange(width + 1)[None, :] < starts[:, None]).astype(np.int64)
            mask[:, width] = 1
            past = [cache[slots, :, :width] for cache in self._cache]
        outputs = self._run(
            np.fromiter((it.token_ids[0] for it in items), np.int64)[:, None],
            mask,
            starts[:, None],
            past,
        )
        for cache, present in zip(self._cache, outputs[1:], strict=True):
            cache[slots, :, starts] = present[:, :, width]
        self._carry = _Carry(tuple(slots.tolist()), starts, mask, outputs[1:])
        return outputs[0][:, -1]


class OnnxEmbeddingEngine(EmbeddingEngine):
    """OnnxEmbeddingEngine runs an encoder whose graph pools and normalises."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, dimensions: int, threads: int = 0) -> None:
        self.session = ort.InferenceSession(
            str(model_path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.dimensions = dimensions

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        vectors: np.ndarray = outputs[0]
        return vectors
