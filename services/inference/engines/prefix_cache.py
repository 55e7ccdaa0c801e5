"""Prompt KV reuse: a prompt that starts like an earlier one skips that part of prefill.

Requests often share their opening tokens (a system prompt, a few-shot
preamble, a template, or simply a repeated question). Their keys/values are
a pure function of those tokens, so an engine that kept them can copy them
into a new sequence's KV slot instead of recomputing them (vLLM's automatic
prefix caching, SGLang's radix cache).

KV is stored in blocks of `block` tokens, each once however many stored
prompts start with it: a thousand requests that share a 400-token system
prompt hold its blocks once, plus each one's own tail. (A store of whole
prompts held the shared head once per prompt: ~9 prompts of 440 tokens
filled 4096 tokens, and prefix-heavy traffic missed on heads it had just
computed.) Each stored prompt keeps its whole blocks, the KV of its last
partial block, and the logits of its last position:
- a prompt seen before (an exact hit) needs no compute at all: its KV is
  copied into the slot and its stored logits are sampled;
- a prompt that starts with at least one stored whole block reuses the
  longest such run and computes only the rest (a partial hit);
- anything else is computed, then stored.

Blocks are keyed by a hash chain (each block's key covers every token before
it, like vLLM's block hashes), so a lookup costs one pass over the prompt;
each block also keeps its tokens and its parent's key, and a match is
confirmed block by block before it is used. Prompts are evicted least
recently used first; a block goes when the last prompt holding it goes, and
capacity counts each held token once. Not thread-safe: it belongs to the
engine's step thread.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class KVBlock:
    """KVBlock is `block` consecutive prompt tokens' keys/values, shared by every
    stored prompt that starts with the same tokens up to its end.

    Attributes:
        parent: the chain key of the block before it (0 for a prompt's first).
        tokens: its token ids.
        kv: one array per KV tensor of the engine, [heads, len(tokens), head_dim].
        holders: stored prompts that hold it.
    """

    parent: int
    tokens: tuple[int, ...]
    kv: list[np.ndarray]
    holders: int = 0


@dataclass(eq=False)
class CachedPrompt:
    """CachedPrompt is one stored prompt.

    Attributes:
        tokens: the prompt's token ids.
        chain: the keys of its whole blocks, first to last.
        tail: one array per KV tensor, [heads, len(tokens) % block, head_dim]:
            the positions after its last whole block.
        last_logits: logits [vocab] after the prompt's last token.
    """

    tokens: tuple[int, ...]
    chain: tuple[int, ...]
    tail: list[np.ndarray]
    last_logits: np.ndarray


@dataclass(frozen=True)
class PrefixHit:
    """PrefixHit is what a lookup found: the KV of the prompt's `matched` leading tokens.

    An exact hit (`entry` set, `matched == len(prompt)`) also has the prompt's
    last logits; anything less is a whole number of blocks, and the rest must
    be computed.
    """

    matched: int
    blocks: tuple[KVBlock, ...]
    entry: CachedPrompt | None = None

    @property
    def last_logits(self) -> np.ndarray:
        """Returns the stored logits after the prompt's last token (exact hits only)."""
        if self.entry is None:
            raise ValueError("a partial hit has no last logits")
        return self.entry.last_logits

    def copy_into(self, targets: Sequence[np.ndarray]) -> None:
        """Writes the matched positions' KV into `targets`, one per KV tensor, each
        [heads, >= matched, head_dim] (a sequence's slot in the engine's cache)."""
        start = 0
        for block in self.blocks:
            end = start + len(block.tokens)
            for target, stored in zip(targets, block.kv, strict=True):
                target[:, start:end] = stored
            start = end
        if self.entry is not None and start < self.matched:
            for target, stored in zip(targets, self.entry.tail, strict=True):
                target[:, start : self.matched] = stored


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
        capacity_tokens: most prompt tokens held, each shared block once (0 disables).
        block: granularity of sharing and of partial matches, in tokens.
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
        self._blocks: dict[int, KVBlock] = {}  # chain key -> block
        self._held_tokens = 0

    @property
    def enabled(self) -> bool:
        """Returns whether anything can be stored."""
        return self.capacity_tokens > 0

    @property
    def held_tokens(self) -> int:
        """Returns the prompt tokens held: every block once, plus each prompt's tail."""
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
            self.stats.exact_hits += 1
            self.stats.reused_tokens += len(key)
            blocks = tuple(self._blocks[chained] for chained in entry.chain)
            return PrefixHit(len(key), blocks, entry)
        # A partial match must leave a token to compute (its logits are needed):
        # blocks ending at the prompt's end are not looked at.
        blocks = self._stored_run(key[:-1])
        if not blocks:
            return None
        matched = len(blocks) * self.block
        self.stats.partial_hits += 1
        self.stats.reused_tokens += matched
        return PrefixHit(matched, blocks)

    def note_shared(self, tokens: int) -> None:
        """Counts `tokens` copied from a prompt computed in the same step as reused."""
        if self.enabled:
            self.stats.reused_tokens += tokens

    def store(self, prompt: Sequence[int], kv: list[np.ndarray], last_logits: np.ndarray) -> None:
        """Keeps `prompt`'s KV history (copied) and last logits, evicting as needed.

        Blocks already held (shared with a stored prompt) are not copied again.

        Args:
            prompt: the prompt's token ids.
            kv: one array per KV tensor, [heads, >= len(prompt), head_dim]; the
                first len(prompt) positions are copied.
            last_logits: logits [vocab] after the prompt's last token.
        """
        key = tuple(prompt)
        if not self.enabled or not key:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        chain = self._chain(key)
        if chain is None:  # a chain key taken by other tokens (a hash collision): skip
            return
        shared = [chained for chained, _ in chain if chained in self._blocks]
        for chained in shared:  # held through the evictions below
            self._blocks[chained].holders += 1
        whole = len(chain) * self.block
        needed = (len(chain) - len(shared)) * self.block + len(key) - whole
        if needed > self.capacity_tokens - len(shared) * self.block:
            for chained in shared:  # larger than the cache: keep what is there
                self._release(chained)
            return
        while self._held_tokens + needed > self.capacity_tokens and self._entries:
            self._evict_oldest()
        parent = 0
        for chained, start in chain:
            if chained not in self._blocks:
                end = start + self.block
                copied = [tensor[:, start:end].copy() for tensor in kv]
                self._blocks[chained] = KVBlock(parent, key[start:end], copied, holders=1)
                self._held_tokens += self.block
            parent = chained
        tail = [tensor[:, whole : len(key)].copy() for tensor in kv]
        self._entries[key] = CachedPrompt(
            key, tuple(chained for chained, _ in chain), tail, last_logits.copy()
        )
        self._held_tokens += len(key) - whole

    def _chain(self, tokens: tuple[int, ...]) -> list[tuple[int, int]] | None:
        """Returns (chain key, start) of each whole block of `tokens`, first to last, or
        None when a key is held by a block of other tokens."""
        out = []
        for start, chained, _, foreign in self._walk(tokens):
            if foreign:
                return None
            out.append((chained, start))
        return out

    def _stored_run(self, tokens: tuple[int, ...]) -> tuple[KVBlock, ...]:
        """Returns the stored blocks `tokens` starts with, confirmed token by token."""
        run: list[KVBlock] = []
        for _, _, stored, foreign in self._walk(tokens):
            if stored is None or foreign:
                break
            run.append(stored)
        return tuple(run)

    def _walk(self, tokens: tuple[int, ...]) -> Iterator[tuple[int, int, KVBlock | None, bool]]:
        """Yields (start, chain key, the block stored under that key or None, whether
        that block holds other tokens: a hash collision) for each whole block of
        `tokens`, first to last."""
        parent = 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            block_tokens = tokens[start : start + self.block]
            chained = hash((parent, block_tokens))
            stored = self._blocks.get(chained)
            foreign = stored is not None and (
                stored.parent != parent or stored.tokens != block_tokens
            )
            yield start, chained, stored, foreign
            parent = chained

    def _evict_oldest(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self._held_tokens -= len(key) - len(entry.chain) * self.block
        for chained in entry.chain:
            self._release(chained)

    def _release(self, chained: int) -> None:
        """Drops one holder of a block; the block goes with its last holder."""
        block = self._blocks[chained]
        block.holders -= 1
        if block.holders == 0:
            del self._blocks[chained]
            self._held_tokens -= self.block
