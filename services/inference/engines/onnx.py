"""ONNX Runtime engines (CPU by default): a KV-cached decoder and an embedder.

The decoder's KV cache lives in preallocated per-layer arrays
[slots, heads, context + 1, head_dim]. Prompts are prefilled with the
exported graph, their KV copied into their slots.

Decode steps, for demo-lm's graph (gpt-kv): an in-place decoder
(onnx_decode.py) binds the running slots' contiguous slab of the cache as
both past and present, so each row writes its new key/value in its own slot
and attends to its own length: no history is copied and no row is padded.
The scheduler keeps running sequences in the lowest slots (move_slot), so
the slab holds no idle slot in its decode steps; a slot of the slab that
does not decode writes a dummy key/value past what it holds (at most at the
scratch position `context`), which is never read.

Other graphs with the same inputs keep the padded path: a decode step
gathers the running slots' caches up to the longest one, masks each row's
padding with attention_mask, and writes the new key/value column back into
each slot. Step after step, the next step feeds the previous step's
`present` outputs as its past instead of gathering again (a gather copies
every running slot's history: a quarter of a batch-32 step, and half of it
in traffic where sequences join and leave every few steps). Sequences that
leave turn their row dead (masked out); new ones take a dead row, with only
their own history copied in; a tight gather happens only when dead rows or
unused width pile up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from services.inference.engines.base import EmbeddingEngine, GenerativeEngine, StepItem
from services.inference.engines.onnx_decode import (
    DecodeShape,
    InPlaceDecoder,
    UnsupportedGraph,
    build_decode_graph,
)
from services.inference.engines.prefix_cache import PrefixCache, PrefixHit

logger = logging.getLogger(__name__)

_ORT_ERRORS = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.NotImplemented)

# A padded prefill call computes rows x longest positions (and, with graphs that
# return every position's logits, a [rows, width, vocab] array). The prompts of a
# step are grouped so a call pads at most this share over its real tokens, plus a
# few tokens: one call costs ~1 ms on demo-lm (~20 tokens' compute), so tiny
# prompts are worth a little padding rather than a call each. (All of a step's
# prompts in one call made a 500-token prompt among 31 4-token ones 16,000
# positions instead of 624: 2.8 s instead of 85 ms, and ~1 GiB of logits.)
PAD_RATIO = 1.25
PAD_SLACK_TOKENS = 32


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
    """_Carry is what one decode step leaves for the next: its KV, one row per slot.

    Row r held slot rows[r] (-1: a dead row, whose sequence left), fed the
    token at position starts[r], and attended to mask[r]; present[i][r] is
    that row's key/value history, one column per mask column.
    """

    rows: np.ndarray  # [R] int64
    starts: np.ndarray  # [R] int64
    mask: np.ndarray  # [R, W] int64
    present: list[np.ndarray]  # [R, heads, W, head_dim] each

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])


class OnnxGenerativeEngine(GenerativeEngine):
    """OnnxGenerativeEngine runs a decoder exported with past/present KV tensors.

    Args:
        model_path: the ONNX file (inputs input_ids, attention_mask,
            position_ids, past_key_values.{i}.key/value).
        n_layer, n_head, head_dim, vocab_size, context_length: its shape.
        threads: intra-op threads (0 = one per core).
        prefix_cache_tokens: prompt tokens whose KV is kept for reuse by
            later prompts that start the same way (0 = no prefix cache).
        in_place_decode: decode with the in-place graph where the model's
            graph allows it (False: always the padded path).
        prefix_cache_shared: every tenant reuses every other's prompts (one
            scope: a model whose prompts the operator made public); False: a
            prompt reuses only the KV of its own scope (StepItem.scope).
    """

    name = "onnxruntime"
    prefix_cache: PrefixCache

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
        prefix_cache_tokens: int = 0,
        in_place_decode: bool = True,
        prefix_cache_shared: bool = False,
    ) -> None:
        options = session_options(threads)
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        shape = DecodeShape(n_layer, n_head, head_dim, vocab_size)
        self._decode_session = (
            _decode_session(model_path, shape, options, self.session) if in_place_decode else None
        )
        self._in_place: InPlaceDecoder | None = None
        self.prefix_cache = PrefixCache(prefix_cache_tokens, shared=prefix_cache_shared)
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.vocab_size = vocab_size
        self.context_length = context_length
        self._past_names = [
            f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")
        ]
        self._cache: list[np.ndarray] = []
        self._length = np.zeros(0, np.int64)  # slot -> positions of KV it holds
        self._carry: _Carry | None = None
        self._reused: dict[int, int] = {}  # slot -> prompt tokens its last prefill reused

    def take_reused_tokens(self, slot: int) -> int:
        return self._reused.pop(slot, 0)

    @property
    def decode_path(self) -> str:
        """Returns how decode steps run: "in-place" or "padded"."""
        return "padded" if self._decode_session is None else "in-place"

    def allocate(self, max_slots: int) -> None:
        # One more position than the context: the in-place decoder's rows that
        # do not decode write their dummy key/value there.
        shape = (max_slots, self.n_head, self.context_length + 1, self.head_dim)
        self._cache = [np.zeros(shape, np.float32) for _ in self._past_names]
        self._length = np.zeros(max_slots, np.int64)
        self._carry = None
        if self._decode_session is not None:
            self._in_place = InPlaceDecoder(self._decode_session, self._cache, self.vocab_size)
        self.prefix_cache.clear()
        logger.info(
            "KV cache: %d slots, %.1f MiB", max_slots, sum(c.nbytes for c in self._cache) / 2**20
        )

    def warm_up(self, max_slots: int = 1) -> None:
        super().warm_up(max_slots)
        self._reused.clear()
        # The warm-up prompt is no one's: start serving with an empty prefix cache.
        self.prefix_cache.clear()

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        logits = np.empty((len(items), self.vocab_size), np.float32)
        fresh = [i for i, item in enumerate(items) if item.start == 0]
        decode = [i for i, item in enumerate(items) if item.start > 0 and len(item.token_ids) == 1]
        chunks = [i for i in range(len(items)) if i not in fresh and i not in decode]
        carry, self._carry = self._carry, None
        if fresh:
            logits[fresh] = self._prefill_prompts([items[i] for i in fresh])
        for i in chunks:
            logits[i] = self._prefill(items[i])
        if decode and self._in_place is not None:
            logits[decode] = self._decode_in_place([items[i] for i in decode], self._in_place)
        elif decode:
            logits[decode] = self._decode([items[i] for i in decode], carry)
        elif carry is not None:
            # A prefill-only step: the decoding rows resume next step, history
            # intact; a slot a new prompt took over loses its row (the row
            # belongs to the sequence that left it).
            prefilled = [items[i].slot for i in (*fresh, *chunks)]
            carry.rows = np.where(np.isin(carry.rows, prefilled), -1, carry.rows)
            self._carry = carry
        return logits

    def _prefill_prompts(self, items: Sequence[StepItem]) -> np.ndarray:
        """Prefills whole prompts: what the prefix cache holds is copied, the rest computed.

        An exact hit costs a KV copy and no compute; a partial hit computes
        only the prompt's tail on top of the copied head; the others are
        computed in padded calls of prompts of similar lengths (_pad_groups),
        each distinct prompt once (the same prompt several times in one step
        and scope, as with n samples of one prompt, is copied from the first).
        Every computed prompt is stored in its scope. Reuse never crosses
        scopes: it shows in the caller's cached_prompt_tokens.
        """
        logits = np.empty((len(items), self.vocab_size), np.float32)
        # A slot's count is its latest prompt's: a step that failed after counting
        # a hit (its scheduler never took the count) must not leave that count to
        # the slot's next prompt, which may reuse nothing (billed as cached).
        for item in items:
            self._reused.pop(item.slot, None)
        # (scope, distinct prompt) -> its rows
        computed: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, item in enumerate(items):
            prompt = tuple(item.token_ids)  # once: the cache keys by it, tuple() of it is free
            scope = self.prefix_cache.scope_of(item.scope)
            hit = self.prefix_cache.lookup(prompt, scope)
            if hit is None:
                computed.setdefault((scope, prompt), []).append(i)
                continue
            self._copy_in(item.slot, hit)
            self._reused[item.slot] = hit.matched
            if hit.entry is not None:  # an exact hit
                logits[i] = hit.last_logits
                continue
            tail = StepItem(item.slot, prompt[hit.matched :], hit.matched)
            logits[i] = self._prefill(tail)
            self._remember(item.slot, prompt, logits[i], scope)
        firsts = [rows[0] for rows in computed.values()]
        for group in _pad_groups([len(items[i].token_ids) for i in firsts]):
            rows = [firsts[g] for g in group]
            logits[rows] = self._prefill_batch([items[i] for i in rows])
        for (scope, prompt), rows in computed.items():
            slot = items[rows[0]].slot
            for i in rows[1:]:
                self._copy_slot(slot, items[i].slot, len(prompt))
                self._reused[items[i].slot] = len(prompt)
                logits[i] = logits[rows[0]]
                self.prefix_cache.note_shared(len(prompt))
            self._remember(slot, prompt, logits[rows[0]], scope)
        return logits

    def move_slot(self, source: int, target: int) -> bool:
        if self._in_place is None:
            return False  # the padded path's carried rows are keyed by slot: keep them
        self._copy_slot(source, target, int(self._length[source]))
        self._length[source] = 0
        return True

    def _copy_slot(self, source: int, target: int, tokens: int) -> None:
        for cache in self._cache:
            cache[target, :, :tokens] = cache[source, :, :tokens]
        self._length[target] = tokens

    def _copy_in(self, slot: int, hit: PrefixHit) -> None:
        hit.copy_into([cache[slot] for cache in self._cache])
        self._length[slot] = hit.matched

    def _remember(
        self, slot: int, prompt: tuple[int, ...], last_logits: np.ndarray, scope: str
    ) -> None:
        if self.prefix_cache.enabled:
            kv = [cache[slot] for cache in self._cache]
            self.prefix_cache.store(prompt, kv, last_logits, scope)

    def _prefill_batch(self, items: Sequence[StepItem]) -> np.ndarray:
        """Feeds several whole prompts in one call, right-padded to the longest.

        Causal attention keeps each prompt's real tokens blind to its padding,
        so the padded positions only need masking, not separate calls. The
        caller groups prompts of similar lengths (_pad_groups): the call costs
        rows x longest.
        """
        lengths = np.fromiter((len(it.token_ids) for it in items), np.int64)
        width = int(lengths.max())
        ids = np.zeros((len(items), width), np.int64)
        for row, item in enumerate(items):
            ids[row, : lengths[row]] = item.token_ids
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(items), width))
        empty = np.zeros((len(items), self.n_head, 0, self.head_dim), np.float32)
        every, *presents = self._run(
            ids, mask, np.ascontiguousarray(positions), [empty] * len(self._cache)
        )
        # The graph returns every position's logits [rows, width, vocab]: keep each
        # row's last real one (a copy) and let the rest go before the KV copies.
        last: np.ndarray = every[np.arange(len(items)), lengths - 1]
        del every
        for cache, present in zip(self._cache, presents, strict=True):
            for row, item in enumerate(items):
                cache[item.slot, :, : lengths[row]] = present[row, :, : lengths[row]]
        self._length[[item.slot for item in items]] = lengths
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
        every, *presents = self._run(
            np.asarray([item.token_ids], np.int64),
            np.ones((1, end), np.int64),
            np.arange(item.start, end, dtype=np.int64)[None],
            past,
        )
        # A copy: a view would keep the whole [1, n, vocab] array alive.
        last_logits: np.ndarray = every[0, -1].copy()
        del every
        for cache, present in zip(self._cache, presents, strict=True):
            cache[item.slot, :, item.start : end] = present[0, :, item.start : end]
        self._length[item.slot] = end
        return last_logits

    def _decode_in_place(self, items: Sequence[StepItem], decoder: InPlaceDecoder) -> np.ndarray:
        """Feeds one token for each of several slots: one call over the slots' slab.

        Slots of the slab that do not decode this step (free, or prefilled in
        this same step) feed token 0 and write it at their next position,
        past what they hold: never read, and overwritten when they decode.
        """
        slots = np.fromiter((it.slot for it in items), np.int64)
        starts = np.fromiter((it.start for it in items), np.int64)
        lo = int(slots.min())
        hi = int(slots.max()) + 1
        ids = np.zeros(hi - lo, np.int64)
        positions = np.zeros(hi - lo, np.int64)
        seqlens = self._length[lo:hi].copy()  # at most the context: the cache has one more
        ids[slots - lo] = [it.token_ids[0] for it in items]
        positions[slots - lo] = starts
        seqlens[slots - lo] = starts
        logits: np.ndarray = decoder.step(lo, ids, positions, seqlens)[slots - lo]
        self._length[slots] = starts + 1
        return logits

    def _decode(self, items: Sequence[StepItem], carry: _Carry | None) -> np.ndarray:
        """Feeds one token for each of several slots in one batched call."""
        slots = np.fromiter((it.slot for it in items), np.int64)
        starts = np.fromiter((it.start for it in items), np.int64)
        layout = self._follow(carry, slots, starts) if carry is not None else None
        if layout is None:
            layout = self._gather(slots, starts)
        rows, order = layout
        fed = np.zeros(len(rows.rows), np.int64)  # dead rows feed token 0 at position 0
        fed[order] = [it.token_ids[0] for it in items]
        positions = np.zeros(len(rows.rows), np.int64)
        positions[order] = starts
        # Every row also attends to its new token (dead rows to nothing else).
        mask = np.concatenate([rows.mask, np.ones((len(rows.rows), 1), np.int64)], axis=1)
        outputs = self._run(fed[:, None], mask, positions[:, None], rows.present)
        width = rows.width
        for cache, present in zip(self._cache, outputs[1:], strict=True):
            cache[slots, :, starts] = present[order, :, width]
        self._length[slots] = starts + 1
        self._carry = _Carry(rows.rows, np.where(rows.rows >= 0, positions, -1), mask, outputs[1:])
        last: np.ndarray = outputs[0][order, -1]
        return last

    def _gather(self, slots: np.ndarray, starts: np.ndarray) -> tuple[_Carry, np.ndarray]:
        """Builds a tight layout from the cache: one row per slot, as wide as the longest."""
        width = int(starts.max())
        # Row b attends to its first starts[b] cached positions.
        mask = (np.arange(width)[None, :] < starts[:, None]).astype(np.int64)
        past = [cache[slots, :, :width] for cache in self._cache]
        return _Carry(slots.copy(), starts - 1, mask, past), np.arange(len(slots))

    def _follow(
        self, carry: _Carry, slots: np.ndarray, starts: np.ndarray
    ) -> tuple[_Carry, np.ndarray] | None:
        """Reuses last step's present as this step's past, rows where they were.

        Rows whose slot goes on (fed position = last one + 1) keep their
        history in place; rows whose sequence left turn dead (masked out);
        slots new to the batch take dead rows, their cached history copied in
        (a few columns, not the whole batch). Returns None when a tight gather
        is better: not enough dead rows, a history wider than the carry, more
        dead rows than live ones, or a carry twice as wide as it needs to be.
        """
        width = carry.width
        position_of_row = {int(slot): r for r, slot in enumerate(carry.rows) if slot >= 0}
        order = np.full(len(slots), -1, np.int64)
        for i, (slot, start) in enumerate(zip(slots.tolist(), starts.tolist(), strict=True)):
            r = position_of_row.get(slot)
            if r is not None and carry.starts[r] + 1 == start:
                order[i] = r
        kept = set(order[order >= 0].tolist())
        free = [r for r in range(len(carry.rows)) if r not in kept]
        joining = np.flatnonzero(order < 0)
        if (
            len(joining) > len(free)
            or int(starts.max()) > width
            or 2 * (len(free) - len(joining)) > len(carry.rows)
            or width + 1 > max(2 * int(starts.max()), 32)
        ):
            return None
        rows = np.full(len(carry.rows), -1, np.int64)
        rows[order[order >= 0]] = slots[order >= 0]
        mask = carry.mask.copy()
        mask[free] = 0
        for i, r in zip(joining.tolist(), free, strict=False):
            slot, start = int(slots[i]), int(starts[i])
            order[i], rows[r] = r, slot
            mask[r, :start] = 1
            for cache, present in zip(self._cache, carry.present, strict=True):
                present[r, :, :start] = cache[slot, :, :start]
        return _Carry(rows, carry.starts, mask, carry.present), order


def _pad_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Returns the indices of `lengths` (prompt lengths) in groups, one padded call each.

    Longest first: a group's width is its first prompt's length, and the next
    (shorter) prompt joins while the group's padded size stays within
    PAD_RATIO x its real tokens + PAD_SLACK_TOKENS. A prompt that does not
    fit starts the next group (no shorter one would fit either: each adds the
    same width and fewer real tokens). Compute and logits memory then follow
    the real tokens, not rows x the step's longest prompt.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    width = real = 0
    for i in order:
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * width <= PAD_RATIO * (real + n) + PAD_SLACK_TOKENS:
            groups[-1].append(i)
            real += n
            continue
        groups.append([i])
        width = real = n
    return groups


def _decode_session(
    model_path: Path,
    shape: DecodeShape,
    options: ort.SessionOptions,
    exported: ort.InferenceSession,
) -> ort.InferenceSession | None:
    """Returns a session of the in-place decode graph, or None where the model's
    graph is not demo-lm's shape or the rebuilt graph does not compute what the
    exported one does (the padded path then decodes)."""
    try:
        graph = build_decode_graph(model_path, shape)
    except UnsupportedGraph as reason:
        logger.info("%s: padded decode steps (%s)", model_path, reason)
        return None
    try:
        session = ort.InferenceSession(
            graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except _ORT_ERRORS as error:  # an ONNX Runtime without GroupQueryAttention on CPU
        logger.warning("%s: padded decode steps (in-place graph refused: %s)", model_path, error)
        return None
    if not _agrees(exported, session, shape):
        logger.warning("%s: padded decode steps (in-place graph disagrees)", model_path)
        return None
    return session


def _agrees(
    exported: ort.InferenceSession, in_place: ort.InferenceSession, shape: DecodeShape
) -> bool:
    """Decodes one probe token with both graphs after the same 3-token prompt; True when
    their logits agree (a graph of the same names but another function falls back)."""
    prompt = np.array([[5, 6, 7]], np.int64)
    empty = np.zeros((1, shape.n_head, 0, shape.head_dim), np.float32)
    names = [
        f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}" for i in range(2 * shape.n_layer)
    ]
    feeds = {"input_ids": prompt, "attention_mask": np.ones((1, 3), np.int64)}
    feeds["position_ids"] = np.arange(3, dtype=np.int64)[None]
    history = exported.run(None, {**feeds, **dict.fromkeys(names, empty)})[1:]
    token = np.array([[8]], np.int64)
    step = {"input_ids": token, "attention_mask": np.ones((1, 4), np.int64)}
    step["position_ids"] = np.array([[3]], np.int64)
    expected = exported.run(None, {**step, **dict(zip(names, history, strict=True))})[0][0, -1]
    cache = [np.zeros((1, shape.n_head, 4, shape.head_dim), np.float32) for _ in names]
    for slot, past in zip(cache, history, strict=True):
        slot[:, :, :3] = past
    decoder = InPlaceDecoder(in_place, cache, shape.vocab_size)
    got = decoder.step(0, token[0], np.array([3]), np.array([3]))[0]
    return bool(np.abs(got - expected).max() <= 1e-3 * max(1.0, float(np.abs(expected).max())))


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
