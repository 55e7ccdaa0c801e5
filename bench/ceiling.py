"""The in-process engine ceiling: tokens/s of the raw engine, no server, no network.

Kept free of gRPC and the mesh so that bench/gpu/ can run it on a machine
with nothing but numpy, the engine's runtime and this repository.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from services.inference.engines.base import GenerativeEngine, StepItem

DEMO_LM = Path(__file__).resolve().parents[1] / "models" / "demo-lm" / "1"
PROMPT_TOKENS = 16
DECODE_STEPS = 64


def _raw_engine(kind: str, threads: int = 0) -> GenerativeEngine:
    card = json.loads((DEMO_LM / "config.json").read_text())
    shape = {k: card[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}
    if kind == "tensorrt":  # GPU machines only (bench/gpu/readiness.py)
        from services.inference.engines.tensorrt import TensorRTGenerativeEngine

        return TensorRTGenerativeEngine(DEMO_LM / "model.onnx", **shape)
    from services.inference.engines.onnx import OnnxGenerativeEngine

    # The worker's decode path (TOKENMESH_ENGINE_DECODE), so that an A/B of the
    # two paths compares each with its own ceiling.
    in_place = os.environ.get("TOKENMESH_ENGINE_DECODE", "in-place") != "padded"
    engine = OnnxGenerativeEngine(
        DEMO_LM / "model.onnx", threads=threads, in_place_decode=in_place, **shape
    )
    print(f"  engine: ONNX Runtime, {engine.decode_path} decode steps", flush=True)
    return engine


def engine_ceiling(
    batches: tuple[int, ...] = (1, 8, 32),
    kind: str = "onnxruntime",
    threads: int = 0,
    min_seconds: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Tokens/s of the raw engine in-process (greedy), per batch size, and its CPU
    µs per token (this process's, all threads).

    threads: intra-op threads (0: one per core, as a worker's default).
    min_seconds: repeat the decode (fresh prompts each pass) until it has run
        this long, so that it spans as much of the machine's drift as the
        served window it is compared with.
    """
    engine = _raw_engine(kind, threads)
    engine.allocate(max(batches))
    engine.warm_up(max(batches))  # as a worker does before it reports ready
    results = {}
    rng = np.random.default_rng(0)
    for batch in batches:
        elapsed = cpu = 0.0
        passes = 0
        while passes == 0 or elapsed < min_seconds:
            pass_elapsed, pass_cpu = _decode_pass(engine, batch, rng)
            elapsed, cpu, passes = elapsed + pass_elapsed, cpu + pass_cpu, passes + 1
        tokens = batch * DECODE_STEPS * passes
        results[str(batch)] = {
            "tokens_per_s": tokens / elapsed,
            "step_ms": elapsed / (DECODE_STEPS * passes) * 1000,
            "cpu_us_per_token": cpu / tokens * 1e6,
        }
        print(
            f"  engine batch {batch:>2}: {results[str(batch)]['tokens_per_s']:8.0f} tokens/s",
            flush=True,
        )
    return results


def _decode_pass(
    engine: GenerativeEngine, batch: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Prefills `batch` fresh prompts, then times DECODE_STEPS greedy decode steps;
    returns their wall and CPU seconds."""
    prompts = [list(rng.integers(1, 4000, PROMPT_TOKENS)) for _ in range(batch)]
    last = [int(np.argmax(engine.forward([StepItem(s, p, 0)])[0])) for s, p in enumerate(prompts)]
    started, cpu = time.perf_counter(), time.process_time()
    for step in range(DECODE_STEPS):
        items = [StepItem(s, [last[s]], PROMPT_TOKENS + step) for s in range(batch)]
        last = [int(t) for t in np.argmax(engine.forward(items), axis=1)]
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    """`python -m bench.ceiling THREADS MIN_SECONDS BATCH...`: prints the ceiling as JSON,
    last line. The benchmarks run it so, pinned to the worker's core (bench.pinning).
    """
    threads, min_seconds, *batches = sys.argv[1:]
    ceiling = engine_ceiling(
        tuple(int(b) for b in batches) or (32,),
        threads=int(threads),
        min_seconds=float(min_seconds),
    )
    print(json.dumps(ceiling), flush=True)


if __name__ == "__main__":
    main()
