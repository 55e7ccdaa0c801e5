"""Embeddings: tokenize, pad per chunk, run the engine off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

import numpy as np

from services.core.errors import FieldViolation, InvalidArgument
from services.inference.engines.base import EmbeddingEngine
from services.inference.tokenizer import Tokenizer


class Embedder:
    """Embedder serves one embedding model version.

    Args:
        engine: the model's engine.
        tokenizer: adds the model's special tokens ([CLS] ... [SEP]).
        max_input_tokens: longest input accepted (longer ones are refused, not cut).
        max_batch_size: inputs per engine call.
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        tokenizer: Tokenizer,
        max_input_tokens: int,
        max_batch_size: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.max_batch_size = max_batch_size
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedder")

    def tokenize(self, inputs: Sequence[str]) -> list[list[int]]:
        """Returns token ids per input; raises InvalidArgument for over-long ones."""
        encoded = self.tokenizer.encode_batch(inputs)
        violations = [
            FieldViolation(
                f"inputs[{i}]",
                f"has {len(ids)} tokens; the model accepts at most {self.max_input_tokens}",
            )
            for i, ids in enumerate(encoded)
            if len(ids) > self.max_input_tokens
        ]
        if violations:
            raise InvalidArgument(violations, reason="INPUT_TOO_LONG")
        return encoded

    def tokenize_truncated(self, inputs: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Returns token ids per input cut to max_input_tokens, and which inputs were cut.

        A cut input keeps its first tokens and the tokenizer's closing special
        token (BERT's [SEP]), which the model expects last.
        """
        closing = self._closing_tokens()
        keep = self.max_input_tokens - len(closing)
        encoded, cut = [], []
        for ids in self.tokenizer.encode_batch(inputs):
            too_long = len(ids) > self.max_input_tokens
            encoded.append([*ids[:keep], *closing] if too_long else ids)
            cut.append(too_long)
        return encoded, cut

    def _closing_tokens(self) -> list[int]:
        """Returns the special tokens the tokenizer ends every input with (none, or [SEP])."""
        specials = self.tokenizer.encode("")
        return specials[1:] if len(specials) >= 2 else []

    async def embed(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """Returns [len(encoded), dims] unit vectors, computed in chunks off the loop."""
        loop = asyncio.get_running_loop()
        chunks = [
            encoded[i : i + self.max_batch_size]
            for i in range(0, len(encoded), self.max_batch_size)
        ]
        parts = [await loop.run_in_executor(self._executor, self._run, chunk) for chunk in chunks]
        return np.concatenate(parts) if parts else np.empty((0, self.engine.dimensions), np.float32)

    def _run(self, chunk: Sequence[Sequence[int]]) -> np.ndarray:
        width = max(len(ids) for ids in chunk)
        ids = np.zeros((len(chunk), width), np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return self.engine.embed(ids, mask)

    async def warm_up(self) -> None:
        """Runs one batch so the first request pays no start-up cost."""
        await self.embed(self.tokenize(["warm up"]))

    def close(self) -> None:
        """Stops the compute thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
