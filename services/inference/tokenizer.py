"""Tokenizers and incremental detokenization."""

from __future__ import annotations

import abc
import codecs
import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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

    def piece_bytes(self) -> Sequence[bytes] | None:
        """Returns each token id's bytes when decoding is their concatenation read as
        UTF-8 (byte-level BPE); None when it is not (then streams decode windows)."""
        return None


class HuggingFaceTokenizer(Tokenizer):
    """HuggingFaceTokenizer wraps a `tokenizers` tokenizer.json (no transformers)."""

    def __init__(self, path: Path, *, add_special_tokens: bool = False) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._special = add_special_tokens
        self._pieces: list[bytes] | None = None
        self._pieces_checked = False

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=self._special).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=self._special)
        return [list(e.ids) for e in encodings]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def _decode_batch(self, batch: list[list[int]]) -> list[str]:
        decoded = self._tokenizer.decode_batch(batch, skip_special_tokens=True)
        return [str(text) for text in decoded]

    def token_id(self, token: str) -> int | None:
        """Returns the id of a (special) token, if the vocabulary has it."""
        found = self._tokenizer.token_to_id(token)
        return None if found is None else int(found)

    def piece_bytes(self) -> Sequence[bytes] | None:
        if not self._pieces_checked:  # once (the loader asks: ~5 ms for 4k tokens)
            self._pieces = _byte_level_pieces(self._tokenizer, self._decode_batch)
            self._pieces_checked = True
        return self._pieces


def _byte_level_alphabet() -> dict[str, int]:
    """Returns GPT-2's byte-level alphabet: the byte each vocabulary character stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    printable += range(ord("\xae"), ord("\xff") + 1)
    chars = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in chars)
    chars.update({byte: chr(256 + n) for n, byte in enumerate(shifted)})
    return {char: byte for byte, char in chars.items()}


def _byte_level_pieces(
    tokenizer: Any, decode_batch: Callable[[list[list[int]]], list[str]]
) -> list[bytes] | None:
    """Returns each id's bytes if `tokenizer` decodes byte-level BPE and nothing else.

    Checked against the tokenizer's own decoding, id by id and on mixed
    sequences, so a vocabulary or decoder this reading gets wrong keeps the
    window decoding (slower, always right).
    """
    from tokenizers import decoders

    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_level_alphabet()
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    pieces: list[bytes] = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(token_id)
        if token_id in special or token is None:
            pieces.append(b"")
        elif all(char in alphabet for char in token):
            pieces.append(bytes(alphabet[char] for char in token))
        else:
            return None  # a token outside the alphabet (an added word, say)
    return pieces if _decodes_alike(pieces, decode_batch) else None


def _decodes_alike(
    pieces: list[bytes], decode_batch: Callable[[list[list[int]]], list[str]]
) -> bool:
    """Tells whether `pieces` read as UTF-8 give what `decode_batch` gives, one id at a
    time and for a fixed sample of sequences."""
    sample = random.Random(0)
    mixed = [[sample.randrange(len(pieces)) for _ in range(12)] for _ in range(64)]
    batch = [[i] for i in range(len(pieces))] + mixed
    expected = [b"".join(pieces[i] for i in ids).decode("utf-8", "replace") for ids in batch]
    return decode_batch(batch) == expected


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

    def piece_bytes(self) -> Sequence[bytes] | None:
        return [b"", *((" " + word).encode() for word in self.words[1:])]

    def _hash_id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        return 1 + int.from_bytes(digest, "big") % (len(self.words) - 1)


#: Mark: where a decoder stood, for `IncrementalDecoder.rewound`.
Mark = tuple[int, int, int, int] | bytes


class IncrementalDecoder(abc.ABC):
    """IncrementalDecoder turns a stream's tokens into text deltas, each as soon as
    its characters are complete (`incremental_decoder` picks the implementation)."""

    @abc.abstractmethod
    def push(self, token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the text they complete."""

    @abc.abstractmethod
    def flush(self) -> str:
        """Returns whatever is left, incomplete characters included."""

    @abc.abstractmethod
    def mark(self) -> Mark:
        """Returns the decoder's position, for `rewound`."""

    @abc.abstractmethod
    def rewound(self, mark: Mark) -> IncrementalDecoder:
        """Returns a new decoder in the state this one had at `mark`."""


def incremental_decoder(tokenizer: Tokenizer) -> IncrementalDecoder:
    """Returns the cheapest exact incremental decoder for `tokenizer`."""
    pieces = tokenizer.piece_bytes()
    return WindowDecoder(tokenizer) if pieces is None else ByteDecoder(pieces)


class ByteDecoder(IncrementalDecoder):
    """ByteDecoder decodes tokens whose text is their bytes, concatenated, read as
    UTF-8: a table lookup per token and one UTF-8 decoding that holds back a
    character's first bytes until the rest arrive. Every stream message pays
    this (the window decoding below costs two tokenizer calls a message).
    """

    __slots__ = ("_pieces", "_pending")

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = pieces
        self._pending = b""  # the start of a character whose other bytes are to come

    def push(self, token_ids: Sequence[int]) -> str:
        pieces = self._pieces
        try:
            if len(token_ids) == 1:  # the usual message
                return self._decode(pieces[token_ids[0]])
            return self._decode(b"".join([pieces[i] for i in token_ids]))
        except IndexError:  # an id past the vocabulary (padded logits) has no text
            size = len(pieces)
            return self._decode(b"".join([pieces[i] for i in token_ids if i < size]))

    def _decode(self, data: bytes) -> str:
        if self._pending:
            data = self._pending + data
        text, used = codecs.utf_8_decode(data, "replace", False)
        self._pending = data[used:]
        return text

    def flush(self) -> str:
        text, _ = codecs.utf_8_decode(self._pending, "replace", True)
        self._pending = b""
        return text

    def mark(self) -> Mark:
        return self._pending

    def rewound(self, mark: Mark) -> IncrementalDecoder:
        if not isinstance(mark, bytes):
            raise TypeError("not a ByteDecoder's mark")
        other = ByteDecoder(self._pieces)
        other._pending = mark
        return other


class WindowDecoder(IncrementalDecoder):
    """WindowDecoder decodes with the tokenizer itself, for any tokenizer.

    Byte-level BPE pieces may only form a character together, and a token's
    text can depend on its neighbours, so it decodes a short window (the last
    emitted tokens as context plus the new ones) rather than one token — and
    never the whole sequence, which would make long streams quadratic. A
    trailing replacement character (an incomplete one) is held back until its
    bytes complete; the complete characters before it are returned at once,
    as ByteDecoder returns them: a stop sequence in them then ends the stream
    at the token that completed it (holding them back too sent and billed the
    tokens after it).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text has been emitted
        self._partial = 0  # characters emitted of the tokens after _read

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        start = len(prefix_text) + self._partial
        if text.endswith("\ufffd"):
            # The tokens after _read stay in the window until the character completes.
            complete = len(text.rstrip("\ufffd"))
            if complete <= start:
                return ""
            self._partial = complete - len(prefix_text)
            return text[start:complete]
        if len(text) <= start:
            return ""
        self._prefix, self._read, self._partial = self._read, len(self._ids), 0
        return text[start:]

    def mark(self) -> Mark:
        return len(self._ids), self._prefix, self._read, self._partial  # cheap: ids only grow

    def rewound(self, mark: Mark) -> IncrementalDecoder:
        if isinstance(mark, bytes):
            raise TypeError("not a WindowDecoder's mark")
        size, prefix, read, partial = mark
        other = WindowDecoder(self._tokenizer)
        other._ids, other._prefix, other._read = self._ids[:size], prefix, read
        other._partial = partial
        return other

    def flush(self) -> str:
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        start = len(prefix_text) + self._partial
        self._prefix = self._read = len(self._ids)
        self._partial = 0
        return text[start:]
