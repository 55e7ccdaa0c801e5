"""Tokenizers and incremental detokenization."""

from __future__ import annotations

import abc
import codecs
import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# A rendered template marks each special token that the template's own text holds (a
# chat template's role markers) with one character of Unicode's last private use plane,
# one per special token: only those become special tokens. Text a client sent (a
# prompt, a message, a variable) is always read as text, as OpenAI reads it: spelling
# "<|im_start|>system" in a message must not open a system turn. Clients never need
# this plane's characters; `unmarked` replaces them in client text before a render.
_MARK_BASE = 0x100000
_MARK_COUNT = 0xFFFE
_MARKS = re.compile("[\U00100000-\U0010ffff]")
# `tokenizers` holds the GIL through `encode`, so a thread tokenizing a long prompt
# stopped the event loop as surely as tokenizing on it (0.4-1.9 s for 256K characters
# here); `encode_batch` lets it go. Texts longer than this go through it (shorter ones
# take `encode`, a few microseconds cheaper).
_GIL_FREE_CHARS = 1024


def mark(index: int) -> str:
    """Returns the character that marks the special token numbered `index`."""
    if not 0 <= index < _MARK_COUNT:
        raise ValueError(f"a mark index is 0-{_MARK_COUNT - 1}, not {index}")
    return chr(_MARK_BASE + index)


def unmarked(text: str) -> str:
    """Returns client `text` with each character a mark could be replaced by U+FFFD, so
    that nothing a client sends can stand for a special token once rendered."""
    return _MARKS.sub("\ufffd", text) if _MARKS.search(text) is not None else text


class Tokenizer(abc.ABC):
    """Tokenizer maps text to token ids and back.

    `encode` reads all of its text as text: a special token's spelling in it
    ("<|endoftext|>", "[SEP]") is not that token. Only `encode_marked` gives
    special tokens, where a rendered template marked them (`special_marks`).
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`, read as text (no special tokens but those the
        tokenizer itself adds around every input, such as BERT's [CLS] and [SEP])."""

    def special_marks(self) -> Mapping[str, str]:
        """Returns the mark (see `mark`) of each special token, by its text; the same
        object every call. Empty when the tokenizer has no special tokens."""
        return {}

    def encode_marked(self, text: str) -> list[int]:
        """Returns the token ids of a rendered template: each mark of `special_marks` is
        its special token, and the rest is text, as `encode` reads it.

        Tokenized as a whole (the text around a mark is split there, as the
        tokenizer splits it at a special token's spelling), so a template's
        special tokens give the ids they gave when their spelling was matched.
        """
        return self.encode(text)

    def max_token_chars(self) -> int | None:
        """Returns the most characters of text one token can stand for, when the tokenizer
        drops and merges nothing (a text longer than N times this needs more than N
        tokens); None when that is not known."""
        return None

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
        # `add_special_tokens=False` only stops the post-processor's additions: the
        # tokenizer still matched a special token's spelling anywhere in the text.
        self._tokenizer.encode_special_tokens = True
        self._special = add_special_tokens
        self._pieces: list[bytes] | None = None
        self._pieces_checked = False
        self._marks, self._marked, self._mark_ids = _marked_tokenizer(self._tokenizer)
        # Read by every generation request on the event loop: a walk over the whole
        # vocabulary each time cost 230 µs a request with demo-lm's (~6 ms at 131K
        # entries), so it is worked out once, here, while the model loads.
        self._max_token_chars = self._longest_token_chars()

    def encode(self, text: str) -> list[int]:
        return _encode(self._tokenizer, text, self._special)

    def special_marks(self) -> Mapping[str, str]:
        return self._marks

    def encode_marked(self, text: str) -> list[int]:
        if self._marked is None or _MARKS.search(text) is None:
            return self.encode(text)
        ids = _encode(self._marked, text, self._special)
        mark_ids = self._mark_ids
        return [mark_ids.get(i, i) for i in ids]

    def max_token_chars(self) -> int | None:
        return self._max_token_chars

    def _longest_token_chars(self) -> int | None:
        from tokenizers import pre_tokenizers

        pieces = self.piece_bytes()
        if pieces is None or self._tokenizer.normalizer is not None:
            return None  # a normalizer may drop or merge characters
        if not isinstance(self._tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
            return None  # another pre-tokenizer may drop some (whitespace splitting does)
        # A character is at least one byte; a special token (no bytes) is one mark.
        return max(1, max((len(piece) for piece in pieces), default=1))

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


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Returns `tokenizer`'s ids of `text`, letting the GIL go while a long one encodes."""
    if len(text) > _GIL_FREE_CHARS:
        (encoding,) = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


def _marked_tokenizer(tokenizer: Any) -> tuple[dict[str, str], Any, dict[int, int]]:
    """Returns the marks of `tokenizer`'s special tokens, a copy of it that reads each
    mark as a token of its own, and the special token's id for each such token's id.

    The marks are added to the copy as ordinary (not special) tokens, which are
    matched while `encode_special_tokens` keeps the special ones' spellings as
    text; each takes its special token's stripping of the spaces around it, so
    the text around a mark is tokenized as it was around the spelling.
    (The copy is None, and the marks empty, when there are no special tokens.)
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _Tokenizer

    decoder = tokenizer.get_added_tokens_decoder()
    specials = sorted((i, t) for i, t in decoder.items() if t.special)[:_MARK_COUNT]
    if not specials:
        return {}, None, {}
    marks = {token.content: mark(n) for n, (_, token) in enumerate(specials)}
    marked = _Tokenizer.from_str(tokenizer.to_str())
    marked.encode_special_tokens = True
    marked.add_tokens(
        [
            AddedToken(
                marks[token.content],
                single_word=token.single_word,
                lstrip=token.lstrip,
                rstrip=token.rstrip,
                normalized=False,
                special=False,
            )
            for _, token in specials
        ]
    )
    mark_ids: dict[int, int] = {}
    for special_id, token in specials:
        mark_id = marked.token_to_id(marks[token.content])
        if mark_id is None:  # add_tokens always adds a character new to the vocabulary
            raise ValueError(f"tokenizer copy lacks the mark of {token.content!r}")
        mark_ids[int(mark_id)] = special_id
    return marks, marked, mark_ids


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
        self._marks = {self.words[0]: mark(0)}  # id 0, <eos>, is the special token

    def encode(self, text: str) -> list[int]:
        # A word that spells <eos> is text, like any other unknown word.
        return [self._ids.get(word) or self._hash_id(word) for word in text.split()]

    def special_marks(self) -> Mapping[str, str]:
        return self._marks

    def encode_marked(self, text: str) -> list[int]:
        eos = mark(0)
        if eos not in text:
            return self.encode(text)
        words = text.replace(eos, f" {eos} ").split()
        return [0 if word == eos else self._ids.get(word) or self._hash_id(word) for word in words]

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
