"""The deterministic test engine: real scheduling, synthetic logits.

It is what it says — not a language model. Logits are a pure function of the
last token and its position, so sampled text depends only on the prompt, the
seed and the parameters. Each forward call sleeps `step_s` to stand in for
compute (in the step thread, never on the event loop). With `error_rate`, a
seeded share of prefill steps fails (the scheduler ends their requests with
INTERNAL): a faulty model version for rollout tests, nothing else honours it.
"""

from __future__ import annotations

import random
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
        error_rate: share (0-1) of prefill steps that fail, i.e. of new requests.
    """

    name = "deterministic-test"

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        step_s: float = 0.0,
        eos_token_id: int = 0,
        error_rate: float = 0.0,
    ) -> None:
        self.vocab_size = vocab_size
        self.error_rate = error_rate
        self._faults = random.Random(20261122)  # seeded: the same requests fail each run
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

    def warm_up(self, max_slots: int = 1) -> None:
        """Warms up without injected faults (they are for requests, not for starting)."""
        rate, self.error_rate = self.error_rate, 0.0
        try:
            super().warm_up(max_slots)
        finally:
            self.error_rate = rate

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        if self.error_rate and all(item.start == 0 for item in items):
            if self._faults.random() < self.error_rate:
                raise InjectedFault(f"injected fault (error rate {self.error_rate:g})")
        if self.step_s:
            time.sleep(self.step_s)  # noqa: TID251 - simulated compute, in the step thread
        lasts = np.fromiter((item.token_ids[-1] % self.vocab_size for item in items), np.int64)
        positions = np.fromiter((item.start + len(item.token_ids) - 1 for item in items), np.int64)
        logits: np.ndarray = self._by_token[lasts] + self._by_position[positions % 64]
        return logits


class InjectedFault(RuntimeError):
    """InjectedFault is the failure TOKENMESH_TEST_ENGINE_ERROR_RATE injects."""
