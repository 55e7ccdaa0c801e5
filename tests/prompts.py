"""Prompts no other test sends, as the test engine's tokenizer sees them.

The deterministic test engine's tokenizer (services.inference.tokenizer.WordTokenizer)
maps each unknown word to one of 39 ids, so `f"p {uuid4().hex}"` is one of only
39 prompts: two tests sharing the session's Redis and the response cache's
scope met on one in ~39 and the second was answered from the cache (a flaky
`cached` flag in CI). Eight hashed words make a collision ~1 in 5e12.
"""

from __future__ import annotations

import uuid

WORDS = 8


def unique_prompt(label: str = "") -> str:
    """Returns `label` followed by eight random words (distinct token ids per call)."""
    digits = uuid.uuid4().hex
    words = [digits[i * 4 : i * 4 + 4] for i in range(WORDS)]
    return " ".join([label, *words]) if label else " ".join(words)
