"""The engine interface, and the deterministic test engine.

An `Engine` turns prompt token ids into a stream of generated token ids; a
`Tokenizer` maps text to ids and back. Real engines (ONNX Runtime, TensorRT)
implement the same interface. `DeterministicTestEngine` is what it says: a
small, fully deterministic token source for tests and local runs without a
trained model. It is not a language model.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """SamplingParams are the validated sampling settings of one request."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


class Tokenizer(abc.ABC):
    """Tokenizer maps text to token ids and back."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Returns the text of `token_ids` (a concatenable piece)."""


class Engine(abc.ABC):
    """Engine generates token ids for one model version."""

    #: name identifies the engine kind, e.g. "onnxruntime".
    name: str
    #: eos_token_id ends generation with finish_reason "stop".
    eos_token_id: int

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yields generated token ids until EOS or until the caller stops reading.

        The caller enforces max_tokens and stop sequences; cancelling the
        iteration frees whatever the engine holds for the sequence.
        """

    async def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Runs a first inference so the first request pays no start-up cost."""


# A small closed vocabulary keeps the test engine's output readable.
_WORDS = (
    "<eos> the mesh routes tokens through envoy to workers and back again while "
    "every stream carries usage timing model version plus errors when something "
    "fails late so clients always know what happened a deterministic engine "
    "repeats itself given one seed"
).split()


class WordTokenizer(Tokenizer):
    """WordTokenizer is the test engine's tokenizer: one id per vocabulary word.

    Unknown words in prompts map to a stable id by hashing, so every prompt
    has a well-defined length in tokens.
    """

    def __init__(self, words: Sequence[str] = _WORDS) -> None:
        self.words = list(words)
        self._ids = {word: i for i, word in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(word, self._hash_id(word)) for word in text.split()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(" " + self.words[i] for i in token_ids if i != 0)

    def _hash_id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        return 1 + int.from_bytes(digest, "big") % (len(self.words) - 1)


class DeterministicTestEngine(Engine):
    """DeterministicTestEngine emits seeded pseudo-random vocabulary words.

    Same prompt + same seed + same parameters give the same tokens. Each step
    takes `step_s` seconds so streams behave like a real model's. With
    temperature 0 it follows a fixed walk through the vocabulary.

    Args:
        vocab_size: number of token ids (id 0 is EOS).
        step_s: simulated seconds per decode step.
        eos_probability: chance per sampled step of emitting EOS.
    """

    name = "deterministic-test"
    eos_token_id = 0

    def __init__(self, vocab_size: int, step_s: float = 0.02, eos_probability: float = 0.0) -> None:
        self.vocab_size = vocab_size
        self.step_s = step_s
        self.eos_probability = eos_probability

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[int]:
        seed = params.seed if params.seed is not None else _stable_seed(prompt_ids)
        rng = random.Random(seed)
        last = prompt_ids[-1] if prompt_ids else 1
        while True:
            await asyncio.sleep(self.step_s)
            if params.temperature == 0:
                last = 1 + (last * 7 + 3) % (self.vocab_size - 1)
            elif rng.random() < self.eos_probability:
                yield self.eos_token_id
                return
            else:
                last = rng.randrange(1, self.vocab_size)
            yield last


def _stable_seed(prompt_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(repr(list(prompt_ids)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
