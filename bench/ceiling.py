"""The in-process engine ceiling: tokens/s of the raw engine, no server, no network.

Kept free of gRPC and the mesh so that bench/gpu/ can run it on a machine
with nothing but numpy, the engine's runtime and this repository.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from services.inference.engines.base import GenerativeEngine, StepItem

DEMO_LM = Path(__file__).resolve().parents[1] / "models" / "demo-lm" / "1"
PROMPT_TOKENS = 16
DECODE_STEPS = 64


def _raw_engine(kind: str) -> GenerativeEngine:
    card = json.loads((DEMO_LM / "config.json").read_text())
    shape = {k: card[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}
    if kind == "tensorrt":  # GPU machines only (bench/gpu/readiness.py)
        from services.inference.engines.tensorrt import TensorRTGenerativeEngine

        return TensorRTGenerativeEngine(DEMO_LM / "model.onnx", **shape)
    from services.inference.engines.onnx import OnnxGenerativeEngine

    return OnnxGenerativeEngine(DEMO_LM / "model.onnx", **shape)


def engine_ceiling(
    batches: tuple[int, ...] = (1, 8, 32), kind: str = "onnxruntime"
) -> dict[str, dict[str, float]]:
    """Tokens/s of the raw engine in-process (greedy), per batch size."""
    engine = _raw_engine(kind)
    engine.allocate(max(batches))
    engine.warm_up(max(batches))  # as a worker does before it reports ready
    results = {}
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = [list(rng.integers(1, 4000, PROMPT_TOKENS)) for _ in range(batch)]
        last = [
            int(np.argmax(engine.forward([StepItem(s, p, 0)])[0])) for s, p in enumerate(prompts)
        ]
        started = time.perf_counter()
        for step in range(DECODE_STEPS):
            items = [StepItem(s, [last[s]], PROMPT_TOKENS + step) for s in range(batch)]
            last = [int(t) for t in np.argmax(engine.forward(items), axis=1)]
        elapsed = time.perf_counter() - started
        results[str(batch)] = {
            "tokens_per_s": batch * DECODE_STEPS / elapsed,
            "step_ms": elapsed / DECODE_STEPS * 1000,
        }
        print(
            f"  engine batch {batch:>2}: {results[str(batch)]['tokens_per_s']:8.0f} tokens/s",
            flush=True,
        )
    return results
