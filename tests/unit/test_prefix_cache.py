"""The prefix cache: exact and whole-block matches, LRU eviction by tokens."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.engines.prefix_cache import PrefixCache

HEADS, HEAD_DIM, VOCAB = 2, 3, 5


def _kv(tokens: list[int], tensors: int = 2) -> list[np.ndarray]:
    """KV arrays whose every position encodes its token, wider than the prompt."""
    base = np.zeros((HEADS, len(tokens) + 4, HEAD_DIM), np.float32)
    base[:, : len(tokens)] = np.asarray(tokens, np.float32)[None, :, None]
    return [base + t for t in range(tensors)]


def _store(cache: PrefixCache, tokens: list[int]) -> np.ndarray:
    logits = np.arange(VOCAB, dtype=np.float32) + sum(tokens)
    cache.store(tokens, _kv(tokens), logits)
    return logits


def test_an_exact_hit_returns_the_stored_history_and_logits():
    cache = PrefixCache(100, block=4)
    logits = _store(cache, [1, 2, 3, 4, 5, 6])
    hit = cache.lookup([1, 2, 3, 4, 5, 6])
    assert hit is not None and hit.matched == 6
    assert np.array_equal(hit.entry.last_logits, logits)
    assert hit.entry.kv[0].shape == (HEADS, 6, HEAD_DIM)  # the prompt's positions only
    assert hit.entry.kv[1][0, :, 0].tolist() == [2, 3, 4, 5, 6, 7]
    assert cache.stats.exact_hits == 1 and cache.stats.reused_tokens == 6


def test_stored_arrays_are_copies():
    cache = PrefixCache(100, block=4)
    kv, logits = _kv([1, 2, 3]), np.zeros(VOCAB, np.float32)
    cache.store([1, 2, 3], kv, logits)
    kv[0][:] = -1
    logits[:] = -1
    hit = cache.lookup([1, 2, 3])
    assert hit is not None
    assert hit.entry.kv[0].min() >= 0 and hit.entry.last_logits.min() == 0


def test_a_shared_run_of_whole_blocks_is_a_partial_hit():
    cache = PrefixCache(100, block=4)
    _store(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    hit = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 99])  # shares two whole blocks
    assert hit is not None and hit.matched == 8
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
    _store(cache, [9, 10, 11])  # 11 tokens > 10: the oldest entry goes
    assert cache.held_tokens == 7
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


def test_a_hit_gives_back_the_blocks_an_evicted_sharer_took_over():
    cache = PrefixCache(12, block=2)
    _store(cache, [1, 2, 3, 4])
    _store(cache, [1, 2, 9, 9])  # shares block [1, 2]: now registered to this entry
    assert cache.lookup([1, 2, 3, 4]) is not None  # exact hit: the newest again
    _store(cache, [5, 6, 7, 8, 9])  # evicts [1, 2, 9, 9]
    hit = cache.lookup([1, 2, 0])
    assert hit is not None and hit.matched == 2 and hit.entry.tokens == (1, 2, 3, 4)
