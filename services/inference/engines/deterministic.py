"""The deterministic test engine: real scheduling, synthetic logits.

It is what it says — not a language model. Logits are a pure function of the
last token and its position, so sampled text depends only on the prompt, the
seed and the parameters. Each forward call sleeps `step_s` to stand in for
compute (in the step thread, never on the event loop).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from services.inference.engines.base import GenerativeEngine, StepItem


class DeterministicTestEngine(GenerativeEngine):
    """DeterministicTestEngine produces seeded synthetic logits.

    Args:
        vocab_size: number of token ids; `eos_token_id` ends sequences.
        context_length: maximum tokens per sequence.
        step_s: simulated seconds per forward call (0 for a zero-compute engine).
        eos_token_id: the id whose logit is pushed down so sequences run long.
    """

    name = "deterministic-test"

    def __init__(
        self, vocab_size: int, context_length: int, step_s: float = 0.0, eos_token_id: int = 0
    ) -> None:
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.step_s = step_s
        self.eos_token_id = eos_token_id
        rng = np.random.default_rng(20261122)
        # Logits depend on (last token, position); two small tables keep it cheap.
        self._by_token = rng.normal(0.0, 2.0, (vocab_size, vocab_size)).astype(np.float32)
        self._by_position = rng.normal(0.0, 1.0, (64, vocab_size)).astype(np.float32)
        self._by_token[:, eos_token_id] = -20.0  # runs until max_tokens or a stop sequence

    def allocate(self, max_slots: int) -> None:
        """Nothing to reserve: the logits depend only on the fed tokens."""

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        if self.step_s:
            time.sleep(self.step_s)  # noqa: TID251 - simulated compute, in the step thread
        lasts = np.fromiter((item.token_ids[-1] % self.vocab_size for item in items), np.int64)
        positions = np.fromiter((item.start + len(item.token_ids) - 1 for item in items), np.int64)
        logits: np.ndarray = self._by_token[lasts] + self._by_position[positions % 64]
        return logits
