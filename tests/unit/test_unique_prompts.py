"""The tests' unique prompts are unique to the test engine's tokenizer too (tests/prompts.py)."""

from __future__ import annotations

import uuid

from services.inference.tokenizer import WordTokenizer
from tests.prompts import unique_prompt


def test_unique_prompts_have_distinct_token_ids() -> None:
    tokenizer = WordTokenizer()
    ids = {tuple(tokenizer.encode(unique_prompt("p0"))) for _ in range(2000)}
    assert len(ids) == 2000


def test_one_random_word_is_one_of_few_prompts() -> None:
    """Why the helper exists: a uuid as one word is one of 39 prompts to this tokenizer."""
    tokenizer = WordTokenizer()
    ids = {tuple(tokenizer.encode(f"p0 {uuid.uuid4().hex}")) for _ in range(2000)}
    assert len(ids) <= 39
