"""The prefix cache: exact and whole-block matches, shared blocks held once, LRU eviction."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.engines.prefix_cache import PrefixCache, PrefixHit

HEADS, HEAD_DIM, VOCAB = 2, 3, 5
# Each stored prompt's logits (5 x 4 bytes) are charged as one token of KV (2 x 2 x 3 x 4
# bytes): capacities and held tokens below count it.


def _kv(tokens: list[int], tensors: int = 2) -> list[np.ndarray]:
    """KV arrays whose every position encodes its token, wider than the prompt."""
    base = np.zeros((HEADS, len(tokens) + 4, HEAD_DIM), np.float32)
    base[:, : len(tokens)] = np.asarray(tokens, np.float32)[None, :, None]
    return [base + t for t in range(tensors)]


def _copied(hit: PrefixHit, tensor: int = 0) -> np.ndarray:
    """Returns what the hit writes into a slot for KV tensor `tensor`: [heads, matched, dim]."""
    targets = [np.full((HEADS, 32, HEAD_DIM), -7, np.float32) for _ in range(2)]
    hit.copy_into(targets)
    assert (targets[tensor][:, hit.matched :] == -7).all()  # nothing past the match
    return targets[tensor][:, : hit.matched]


def _store(cache: PrefixCache, tokens: list[int]) -> np.ndarray:
    logits = np.arange(VOCAB, dtype=np.float32) + sum(tokens)
    cache.store(tokens, _kv(tokens), logits)
    return logits


def test_an_exact_hit_returns_the_stored_history_and_logits():
    cache = PrefixCache(100, block=4)
    logits = _store(cache, [1, 2, 3, 4, 5, 6])
    hit = cache.lookup([1, 2, 3, 4, 5, 6])
    assert hit is not None and hit.matched == 6
    assert np.array_equal(hit.last_logits, logits)
    assert _copied(hit, 0)[0, :, 0].tolist() == [1, 2, 3, 4, 5, 6]  # a block and the tail
    assert _copied(hit, 1)[0, :, 0].tolist() == [2, 3, 4, 5, 6, 7]
    assert cache.stats.exact_hits == 1 and cache.stats.reused_tokens == 6


def test_stored_arrays_are_copies():
    cache = PrefixCache(100, block=4)
    kv, logits = _kv([1, 2, 3]), np.zeros(VOCAB, np.float32)
    cache.store([1, 2, 3], kv, logits)
    kv[0][:] = -1
    logits[:] = -1
    hit = cache.lookup([1, 2, 3])
    assert hit is not None
    assert _copied(hit).min() >= 0 and hit.last_logits.min() == 0


def test_a_shared_run_of_whole_blocks_is_a_partial_hit():
    cache = PrefixCache(100, block=4)
    _store(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    hit = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 99])  # shares two whole blocks
    assert hit is not None and hit.matched == 8 and hit.entry is None
    assert _copied(hit)[0, :, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="partial"):
        hit.last_logits  # noqa: B018 - only an exact hit has them
    hit = cache.lookup([1, 2, 3, 4, 5, 6, 99])  # one whole block, then differs
    assert hit is not None and hit.matched == 4
    assert cache.stats.partial_hits == 2 and cache.stats.reused_tokens == 12


def test_less_than_a_block_in_common_is_a_miss():
    cache = PrefixCache(100, block=4)
    _store(cache, [1, 2, 3, 4, 5])
    assert cache.lookup([1, 2, 3, 9, 5]) is None
    assert cache.lookup([9, 2, 3, 4, 5]) is None
    assert cache.stats.lookups == 2 and cache.stats.reused_tokens == 0


def test_a_partial_match_always_leaves_a_token_to_compute():
    cache = PrefixCache(100, block=4)
    _store(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # The 8-token prompt is itself two whole blocks of the stored one: its
    # last logits were never stored, so only the first block is reused.
    hit = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8])
    assert hit is not None and hit.matched == 4


def test_the_least_recently_used_prompts_go_first_when_tokens_run_out():
    cache = PrefixCache(10, block=2)
    _store(cache, [1, 2, 3, 4])
    _store(cache, [5, 6, 7, 8])
    assert cache.lookup([1, 2, 3, 4]) is not None  # now the most recently used
    _store(cache, [9, 10, 11])  # 5 + 5 + 4 tokens > 10: the oldest entry goes
    assert cache.held_tokens == 9
    assert cache.lookup([5, 6, 7, 8]) is None
    assert cache.lookup([5, 6, 0]) is None  # its blocks went with it
    assert cache.lookup([1, 2, 3, 4]) is not None
    assert cache.lookup([9, 10, 11]) is not None


def test_a_prompt_larger_than_the_cache_is_not_stored():
    cache = PrefixCache(3, block=2)
    _store(cache, [1, 2, 3, 4])
    assert cache.held_tokens == 0 and cache.lookup([1, 2, 3, 4]) is None


def test_capacity_zero_disables_the_cache():
    cache = PrefixCache(0)
    _store(cache, [1, 2, 3])
    assert not cache.enabled
    assert cache.lookup([1, 2, 3]) is None and cache.stats.lookups == 0


def test_a_block_size_below_one_is_refused():
    with pytest.raises(ValueError, match="block"):
        PrefixCache(10, block=0)


def test_a_head_shared_by_many_prompts_is_held_once():
    cache = PrefixCache(100, block=4)
    head = [1, 2, 3, 4, 5, 6, 7, 8]
    for question in range(10, 20):
        _store(cache, [*head, question])
    # Two shared blocks, then one tail token and the logits per prompt (a
    # store of whole prompts would hold 90 tokens, plus the logits).
    assert cache.held_tokens == 8 + 10 + 10
    hit = cache.lookup([*head, 99])
    assert hit is not None and hit.matched == 8
    assert _copied(hit)[0, :, 0].tolist() == head


def test_a_shared_block_stays_while_any_prompt_holds_it():
    cache = PrefixCache(15, block=2)
    _store(cache, [1, 2, 3, 4])
    _store(cache, [1, 2, 9, 9])  # shares block [1, 2]
    assert cache.held_tokens == 5 + 3
    assert cache.lookup([1, 2, 3, 4]) is not None  # exact hit: the newest again
    _store(cache, [5, 6, 7, 8, 9, 10, 11])  # 8 more: [1, 2, 9, 9] goes, not [1, 2]
    assert cache.held_tokens == 5 + 8
    assert cache.lookup([1, 2, 9, 9]) is not None  # [1, 2] is still there
    hit = cache.lookup([1, 2, 0])
    assert hit is not None and hit.matched == 2
    _store(cache, [20, 21, 22, 23, 24, 25])  # evicts [1, 2, 3, 4]: block [1, 2] goes too
    assert cache.lookup([1, 2, 0]) is None


def test_blocks_are_matched_on_their_tokens_not_their_keys_alone():
    cache = PrefixCache(100, block=2)
    _store(cache, [1, 2, 3, 4, 5])
    # A stored block under another prompt's key (as a hash collision would
    # put it) is not used, and the colliding prompt is not stored over it.
    chained = next(iter(cache._blocks))
    cache._blocks[hash((0, (7, 8)))] = cache._blocks[chained]
    assert cache.lookup([7, 8, 9]) is None
    held = cache.held_tokens
    _store(cache, [7, 8, 9])
    assert cache.held_tokens == held
