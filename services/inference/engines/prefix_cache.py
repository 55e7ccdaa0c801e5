"""Prompt KV reuse: a prompt that starts like an earlier one skips that part of prefill.

Requests often share their opening tokens (a system prompt, a few-shot
preamble, a template, or simply a repeated question). Their keys/values are
a pure function of those tokens, so an engine that kept them can copy them
into a new sequence's KV slot instead of recomputing them (vLLM's automatic
prefix caching, SGLang's radix cache).

Each stored prompt keeps its whole KV history and the logits of its last
position:
- a prompt seen before (an exact hit) needs no compute at all: its KV is
  copied into the slot and its stored logits are sampled;
- a prompt that shares at least one whole block (`block` tokens) with a
  stored one reuses the longest shared run of whole blocks and computes only
  the rest (a partial hit);
- anything else is computed, then stored.

Blocks are found by a hash chain (each block's key covers every token before
it, like vLLM's block hashes), so a lookup costs one pass over the prompt; a
match is confirmed token by token before it is used. Entries are evicted
least recently used first, by the tokens they hold. Not thread-safe: it
belongs to the engine's step thread.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class CachedPrompt:
    """CachedPrompt is one stored prompt.

    Attributes:
        tokens: the prompt's token ids.
        kv: one array per KV tensor of the engine, [heads, len(tokens), head_dim].
        last_logits: logits [vocab] after the prompt's last token.
    """

    tokens: tuple[int, ...]
    kv: list[np.ndarray]
    last_logits: np.ndarray


@dataclass(frozen=True)
class PrefixHit:
    """PrefixHit is what a lookup found: `matched` leading tokens of `entry` apply.

    `matched == len(prompt)` is an exact hit (use `entry.last_logits`);
    anything less is a whole number of blocks, and the rest must be computed.
    """

    entry: CachedPrompt
    matched: int


@dataclass
class PrefixCacheStats:
    """PrefixCacheStats count lookups since the cache was created."""

    lookups: int = 0
    exact_hits: int = 0
    partial_hits: int = 0
    prompt_tokens: int = 0  # looked up
    reused_tokens: int = 0  # not computed thanks to the cache


class PrefixCache:
    """PrefixCache maps prompts to their stored KV history.

    Args:
        capacity_tokens: most prompt tokens held over all entries (0 disables).
        block: granularity of partial matches, in tokens.
    """

    def __init__(self, capacity_tokens: int, block: int = 16) -> None:
        if block < 1:
            raise ValueError("block must be >= 1")
        self.capacity_tokens = capacity_tokens
        self.block = block
        self.stats = PrefixCacheStats()
        self._entries: collections.OrderedDict[tuple[int, ...], CachedPrompt] = (
            collections.OrderedDict()
        )
        self._blocks: dict[int, tuple[tuple[int, ...], int]] = {}  # chain hash -> (entry, end)
        self._held_tokens = 0

    @property
    def enabled(self) -> bool:
        """Returns whether anything can be stored."""
        return self.capacity_tokens > 0

    @property
    def held_tokens(self) -> int:
        """Returns the prompt tokens held over all entries."""
        return self._held_tokens

    def clear(self) -> None:
        """Drops every entry and starts the statistics again."""
        self._entries.clear()
        self._blocks.clear()
        self._held_tokens = 0
        self.stats = PrefixCacheStats()

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """Returns the longest stored match for `prompt`, or None."""
        if not self.enabled or not prompt:
            return None
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(prompt)
        key = tuple(prompt)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self._register(key)  # its blocks may have gone with an evicted sharer
            self.stats.exact_hits += 1
            self.stats.reused_tokens += len(key)
            return PrefixHit(entry, len(key))
        hit = self._longest_block_match(key)
        if hit is not None:
            self.stats.partial_hits += 1
            self.stats.reused_tokens += hit.matched
        return hit

    def note_shared(self, tokens: int) -> None:
        """Counts `tokens` copied from a prompt computed in the same step as reused."""
        if self.enabled:
            self.stats.reused_tokens += tokens

    def store(self, prompt: Sequence[int], kv: list[np.ndarray], last_logits: np.ndarray) -> None:
        """Keeps `prompt`'s KV history (copied) and last logits, evicting as needed.

        Args:
            prompt: the prompt's token ids.
            kv: one array per KV tensor, [heads, >= len(prompt), head_dim]; the
                first len(prompt) positions are copied.
            last_logits: logits [vocab] after the prompt's last token.
        """
        key = tuple(prompt)
        if not self.enabled or not key or len(key) > self.capacity_tokens:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        while self._held_tokens + len(key) > self.capacity_tokens:
            self._evict_oldest()
        entry = CachedPrompt(
            key, [tensor[:, : len(key)].copy() for tensor in kv], last_logits.copy()
        )
        self._entries[key] = entry
        self._held_tokens += len(key)
        self._register(key)

    def _register(self, key: tuple[int, ...]) -> None:
        """Points each whole block of `key` at its entry (the newest sharer owns a block)."""
        for end, chained in self._chain(key):
            self._blocks[chained] = (key, end)

    def _chain(self, tokens: tuple[int, ...]) -> list[tuple[int, int]]:
        """Returns (end, chain hash) of each whole block of `tokens`, shortest first."""
        out, chained = [], 0
        for end in range(self.block, len(tokens) + 1, self.block):
            chained = hash((chained, tokens[end - self.block : end]))
            out.append((end, chained))
        return out

    def _longest_block_match(self, key: tuple[int, ...]) -> PrefixHit | None:
        # A stored block is usable only if at least one token is left to compute
        # (its logits are needed): blocks ending at the prompt's end are skipped.
        for end, chained in reversed(self._chain(key[:-1])):
            found = self._blocks.get(chained)
            if found is None:
                continue
            owner, owner_end = found
            entry = self._entries.get(owner)
            if entry is not None and owner_end == end and entry.tokens[:end] == key[:end]:
                self._entries.move_to_end(owner)
                return PrefixHit(entry, end)
        return None

    def _evict_oldest(self) -> None:
        key, _ = self._entries.popitem(last=False)
        self._held_tokens -= len(key)
        for _, chained in self._chain(key):
            if self._blocks.get(chained, (None, 0))[0] == key:
                del self._blocks[chained]
