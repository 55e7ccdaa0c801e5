"""The prefix cache's capacity bounds its memory: KV and each prompt's stored logits."""

from __future__ import annotations

import numpy as np

from services.inference.engines.prefix_cache import PrefixCache

# demo-lm's shape: 4 layers x (key, value) of [4 heads, positions, 64] float32 = 8 KiB per
# token of KV, and 4096 float32 logits per stored prompt (16 KiB: two tokens' worth).
TENSORS, HEADS, HEAD_DIM, VOCAB = 8, 4, 64, 4096
KV_BYTES_PER_TOKEN = TENSORS * HEADS * HEAD_DIM * 4


def _kv(n: int) -> list[np.ndarray]:
    return [np.ones((HEADS, n, HEAD_DIM), np.float32) for _ in range(TENSORS)]


def _bytes_held(cache: PrefixCache) -> int:
    """Every array the cache keeps: blocks' KV, prompts' tails and logits."""
    blocks = sum(a.nbytes for block in cache._blocks.values() for a in block.kv)
    entries = cache._entries.values()
    tails = sum(a.nbytes for entry in entries for a in entry.tail)
    return blocks + tails + sum(entry.last_logits.nbytes for entry in entries)


def test_short_prompts_hold_no_more_than_the_capacity_in_bytes():
    capacity = 60
    cache = PrefixCache(capacity)
    for token in range(1, 4 * capacity):  # distinct 1-token prompts, more than fit
        cache.store([token], _kv(1), np.zeros(VOCAB, np.float32))
        held = _bytes_held(cache)
        # Before: 60 prompts of 1 token + 16 KiB of logits each, 3x the capacity's bytes.
        assert held <= capacity * KV_BYTES_PER_TOKEN
        assert cache.held_tokens <= capacity
        assert held == cache.held_tokens * KV_BYTES_PER_TOKEN  # the gauge counts the logits
    assert len(cache._entries) == capacity // 3  # 1 token + 2 tokens' worth of logits each
    assert cache.lookup([4 * capacity - 1]) is not None  # the newest are kept


def test_prompts_of_any_length_and_shared_heads_stay_within_the_capacity():
    rng = np.random.default_rng(3)
    capacity = 256
    cache = PrefixCache(capacity)
    head = [int(t) for t in rng.integers(1, 4000, 32)]  # two shared blocks
    for _ in range(200):
        tail = [int(t) for t in rng.integers(1, 4000, rng.integers(1, 40))]
        prompt = head + tail if rng.random() < 0.5 else tail
        cache.store(prompt, _kv(len(prompt)), np.zeros(VOCAB, np.float32))
        assert _bytes_held(cache) == cache.held_tokens * KV_BYTES_PER_TOKEN
        assert cache.held_tokens <= capacity
    assert cache.held_tokens > capacity // 2  # it was filled, not emptied


def test_logits_are_charged_rounded_up_to_whole_tokens():
    cache = PrefixCache(10)
    kv = [np.ones((1, 2, 1), np.float32)]  # 4 bytes per token
    cache.store([1, 2], kv, np.zeros(3, np.float32))  # 12 bytes: 3 tokens
    cache.store([3], kv, np.zeros(1, np.float16))  # 2 bytes: 1 token
    assert cache.held_tokens == (2 + 3) + (1 + 1)
