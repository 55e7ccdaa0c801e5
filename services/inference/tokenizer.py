"""Tokenizers and incremental detokenization."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from pathlib import Path


class Tokenizer(abc.ABC):
    """Tokenizer maps text to token ids and back."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Returns the text of `token_ids`."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Returns the token ids of each text."""
        return [self.encode(text) for text in texts]


class HuggingFaceTokenizer(Tokenizer):
    """HuggingFaceTokenizer wraps a `tokenizers` tokenizer.json (no transformers)."""

    def __init__(self, path: Path, *, add_special_tokens: bool = False) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._special = add_special_tokens

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=self._special).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=self._special)
        return [list(e.ids) for e in encodings]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        """Returns the id of a (special) token, if the vocabulary has it."""
        found = self._tokenizer.token_to_id(token)
        return None if found is None else int(found)


# The test engine's closed vocabulary keeps its output readable.
TEST_WORDS = (
    "<eos> the mesh routes tokens through envoy to workers and back again while "
    "every stream carries usage timing model version plus errors when something "
    "fails late so clients always know what happened a deterministic engine "
    "repeats itself given one seed"
).split()


class WordTokenizer(Tokenizer):
    """WordTokenizer is the test engine's tokenizer: one id per vocabulary word.

    Unknown prompt words map to a stable id by hashing, so every prompt has a
    well-defined length in tokens.
    """

    def __init__(self, words: Sequence[str] = TEST_WORDS) -> None:
        self.words = list(words)
        self._ids = {word: i for i, word in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(word, self._hash_id(word)) for word in text.split()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(" " + self.words[i] for i in token_ids if i != 0)

    def _hash_id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        return 1 + int.from_bytes(digest, "big") % (len(self.words) - 1)


class IncrementalDecoder:
    """IncrementalDecoder turns a growing token list into text deltas.

    Byte-level BPE pieces may only form a character together, and a token's
    text can depend on its neighbours, so it decodes a short window (the last
    emitted tokens as context plus the new ones) rather than one token — and
    never the whole sequence, which would make long streams quadratic. A
    trailing replacement character is held back until its bytes complete.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text has been emitted

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the text they complete."""
        self._ids.extend(token_ids)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def mark(self) -> tuple[int, int, int]:
        """Returns the decoder's position, for `rewound` (cheap: ids only grow)."""
        return len(self._ids), self._prefix, self._read

    def rewound(self, mark: tuple[int, int, int]) -> IncrementalDecoder:
        """Returns a new decoder in the state this one had at `mark`."""
        size, prefix, read = mark
        other = IncrementalDecoder(self._tokenizer)
        other._ids, other._prefix, other._read = self._ids[:size], prefix, read
        return other

    def flush(self) -> str:
        """Returns whatever is left, incomplete characters included."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]
