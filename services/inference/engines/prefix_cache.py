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

Every prompt is stored and looked up in a scope: the tenant that sent it
(the engine's StepItem.scope), "" for requests without one (internal
callers), or one scope for everybody where the operator listed the model as
shared (`shared`: TOKENMESH_CACHE_SHARED_MODELS, the response cache's shared
scope), except a private scope (`private_scope`: a request for another model
that this one answers as its fallback, whose prompts nobody made public). A
prompt only ever hits what its own scope stored: a hit is visible
to the caller (`cached_prompt_tokens` in its usage, and its speed), so a
cache shared by tenants would tell one tenant which prompts, or which
16-token heads of them, another tenant sent (the response cache's scopes
exist for the same reason: services.inference.pipeline.cache).

Blocks are keyed by a hash chain seeded with the scope (each block's key
covers the scope and every token before it, like vLLM's block hashes), so a
lookup costs one pass over the prompt; each block also keeps its scope, its
tokens and its parent's key, and a match is confirmed block by block before
it is used (two scopes whose seeds collide still never share a block).
Prompts are evicted least recently used first; a block goes when the last
prompt holding it goes.

Capacity counts token-equivalents of KV memory: each held block's tokens
once, each prompt's tail, and each prompt's last logits, charged as the KV
tokens of as many bytes (rounded up: demo-lm's 16 KiB of logits cost 2
tokens of 8 KiB). Without that charge a cache of short prompts held 2-3x the
memory its capacity promised. Not thread-safe: it belongs to the engine's
step thread.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

#: The prefix of a scope that a shared cache keeps apart (`private_scope`).
PRIVATE_SCOPE = "private:"


def private_scope(tenant: str) -> str:
    """Returns `tenant`'s scope that a shared cache keeps apart: a private model's
    request answered by a shared fallback put the private model's prompts into the
    shared scope, where another tenant's hits (`cached_prompt_tokens`) told of them."""
    return PRIVATE_SCOPE + tenant


@dataclass(eq=False)
class KVBlock:
    """KVBlock is `block` consecutive prompt tokens' keys/values, shared by every
    stored prompt that starts with the same tokens up to its end.

    Attributes:
        scope: the scope of the prompts that stored it.
        parent: the chain key of the block before it (its scope's seed for a
            prompt's first).
        tokens: its token ids.
        kv: one array per KV tensor of the engine, [heads, len(tokens), head_dim].
        holders: stored prompts that hold it.
    """

    scope: str
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
        own_tokens: what it is charged beyond its blocks: its tail's tokens and
            its logits' token-equivalents.
    """

    tokens: tuple[int, ...]
    chain: tuple[int, ...]
    tail: list[np.ndarray]
    last_logits: np.ndarray
    own_tokens: int


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
        capacity_tokens: most token-equivalents held: each shared block's tokens
            once, each prompt's tail and its logits (0 disables).
        block: granularity of sharing and of partial matches, in tokens.
        shared: every scope is one (a model whose prompts the operator made
            public to all tenants); False: a prompt hits only its own scope's.
    """

    def __init__(self, capacity_tokens: int, block: int = 16, shared: bool = False) -> None:
        if block < 1:
            raise ValueError("block must be >= 1")
        self.capacity_tokens = capacity_tokens
        self.block = block
        self.shared = shared
        self.stats = PrefixCacheStats()
        # (scope, prompt) -> entry: a scope's entries are invisible to the others.
        self._entries: collections.OrderedDict[tuple[str, tuple[int, ...]], CachedPrompt] = (
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
        """Returns the token-equivalents held: every block once, plus each prompt's
        tail and its logits (in KV tokens of the same bytes)."""
        return self._held_tokens

    def scope_of(self, scope: str) -> str:
        """Returns the scope a request of `scope` (its tenant) stores and looks up in:
        its own, or the one scope of a shared cache (but never for a private one)."""
        return "" if self.shared and not scope.startswith(PRIVATE_SCOPE) else scope

    def clear(self) -> None:
        """Drops every entry and starts the statistics again."""
        self._entries.clear()
        self._blocks.clear()
        self._held_tokens = 0
        self.stats = PrefixCacheStats()

    def lookup(self, prompt: Sequence[int], scope: str = "") -> PrefixHit | None:
        """Returns the longest match for `prompt` that `scope` stored, or None."""
        if not self.enabled or not prompt:
            return None
        scope = self.scope_of(scope)
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(prompt)
        tokens = tuple(prompt)
        key = (scope, tokens)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.exact_hits += 1
            self.stats.reused_tokens += len(tokens)
            blocks = tuple(self._blocks[chained] for chained in entry.chain)
            return PrefixHit(len(tokens), blocks, entry)
        # A partial match must leave a token to compute (its logits are needed):
        # blocks ending at the prompt's end are not looked at.
        blocks = self._stored_run(tokens[:-1], scope)
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

    def store(
        self,
        prompt: Sequence[int],
        kv: list[np.ndarray],
        last_logits: np.ndarray,
        scope: str = "",
    ) -> None:
        """Keeps `prompt`'s KV history (copied) and last logits in `scope`, evicting as needed.

        Blocks already held (shared with a stored prompt of the scope) are not
        copied again.

        Args:
            prompt: the prompt's token ids.
            kv: one array per KV tensor, [heads, >= len(prompt), head_dim]; the
                first len(prompt) positions are copied.
            last_logits: logits [vocab] after the prompt's last token.
            scope: whose prompt it is (its tenant; see scope_of).
        """
        tokens = tuple(prompt)
        if not self.enabled or not tokens:
            return
        scope = self.scope_of(scope)
        key = (scope, tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        chain = self._chain(tokens, scope)
        if chain is None:  # a chain key taken by other tokens (a hash collision): skip
            return
        shared = [chained for chained, _ in chain if chained in self._blocks]
        for chained in shared:  # held through the evictions below
            self._blocks[chained].holders += 1
        whole = len(chain) * self.block
        own = len(tokens) - whole + _token_equivalents(last_logits, kv)
        needed = (len(chain) - len(shared)) * self.block + own
        if needed > self.capacity_tokens - len(shared) * self.block:
            for chained in shared:  # larger than the cache: keep what is there
                self._release(chained)
            return
        while self._held_tokens + needed > self.capacity_tokens and self._entries:
            self._evict_oldest()
        parent = _seed(scope)
        for chained, start in chain:
            if chained not in self._blocks:
                end = start + self.block
                copied = [tensor[:, start:end].copy() for tensor in kv]
                self._blocks[chained] = KVBlock(scope, parent, tokens[start:end], copied, holders=1)
                self._held_tokens += self.block
            parent = chained
        tail = [tensor[:, whole : len(tokens)].copy() for tensor in kv]
        self._entries[key] = CachedPrompt(
            tokens, tuple(chained for chained, _ in chain), tail, last_logits.copy(), own
        )
        self._held_tokens += own

    def _chain(self, tokens: tuple[int, ...], scope: str) -> list[tuple[int, int]] | None:
        """Returns (chain key, start) of each whole block of `tokens` in `scope`, first
        to last, or None when a key is held by a block of other tokens or scope."""
        out = []
        for start, chained, _, foreign in self._walk(tokens, scope):
            if foreign:
                return None
            out.append((chained, start))
        return out

    def _stored_run(self, tokens: tuple[int, ...], scope: str) -> tuple[KVBlock, ...]:
        """Returns the blocks of `scope` that `tokens` starts with, confirmed token by token."""
        run: list[KVBlock] = []
        for _, _, stored, foreign in self._walk(tokens, scope):
            if stored is None or foreign:
                break
            run.append(stored)
        return tuple(run)

    def _walk(
        self, tokens: tuple[int, ...], scope: str
    ) -> Iterator[tuple[int, int, KVBlock | None, bool]]:
        """Yields (start, chain key, the block stored under that key or None, whether
        that block is another's: other tokens, parent or scope, a hash collision) for
        each whole block of `tokens` in `scope`, first to last."""
        parent = _seed(scope)
        for start in range(0, len(tokens) - self.block + 1, self.block):
            block_tokens = tokens[start : start + self.block]
            chained = hash((parent, block_tokens))
            stored = self._blocks.get(chained)
            foreign = stored is not None and (
                stored.parent != parent or stored.tokens != block_tokens or stored.scope != scope
            )
            yield start, chained, stored, foreign
            parent = chained

    def _evict_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._held_tokens -= entry.own_tokens
        for chained in entry.chain:
            self._release(chained)

    def _release(self, chained: int) -> None:
        """Drops one holder of a block; the block goes with its last holder."""
        block = self._blocks[chained]
        block.holders -= 1
        if block.holders == 0:
            del self._blocks[chained]
            self._held_tokens -= self.block


def _seed(scope: str) -> int:
    """Returns the chain key a scope's first blocks hang from (0 for the empty scope)."""
    return hash(("scope", scope)) if scope else 0


def _token_equivalents(logits: np.ndarray, kv: Sequence[np.ndarray]) -> int:
    """Returns the KV tokens whose bytes `logits` takes, rounded up (kv: one array per
    KV tensor, [heads, positions, head_dim]: a token's KV is heads x head_dim of each)."""
    per_token = sum(tensor.shape[0] * tensor.shape[2] * tensor.itemsize for tensor in kv)
    return -(-logits.nbytes // per_token) if per_token else 0
