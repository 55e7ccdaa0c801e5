"""S1's requests served in-process: the worker's scheduler and engine, no server.

The engine ceiling (bench.ceiling) is the raw engine decoding one aligned
batch greedily. A worker does more for the same tokens before any server
is involved: it prefills each call's prompt, samples with the model's
defaults (top-k, top-p), keeps a continuous batch of sequences at different
positions, and detokenizes. This runs exactly that, as vLLM's offline
throughput benchmark runs its engine without its API server: the worker's
model loading and settings (the same environment), its scheduler on its
engine thread, and STREAMS callers on uvloop submitting S1's calls back to
back and reading their text deltas. S1 served over this is what the server
(gRPC, the request pipeline, metering) costs; this over the engine ceiling
is what serving requests costs the engine itself.

    python -m bench.offline SECONDS   # prints {"tokens_per_s", "cpu_us_per_token", ...}, last line

The benchmarks run it pinned to the worker's core with the worker's environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.clients import variant
from bench.serving import STREAMS, served_request
from services.core.settings import load
from services.inference.generation import GenerationState, stream_deltas
from services.inference.models import LoadedModel, ModelDefaults
from services.inference.repository import load_from_repository
from services.inference.sampling import SamplingParams
from services.inference.service import InferenceSettings


def call_params(defaults: ModelDefaults, stream: int, repeat: int) -> SamplingParams:
    """Returns the sampling of S1's call `repeat` of `stream`: the request the streaming
    client sends then (bench.clients.variant), the model's defaults for what it leaves unset."""
    call = variant(served_request(), stream, repeat)
    return SamplingParams(
        max_tokens=call.max_tokens,
        temperature=call.temperature,
        top_p=defaults.top_p,
        top_k=defaults.top_k,
        seed=call.seed,
        stop=(),
    )


async def _caller(model: LoadedModel, stream: int, deadline: float, tokens: list[int]) -> None:
    """Calls back to back until `deadline`; the call in flight then is cut (its tokens count)."""
    assert model.scheduler is not None
    prompt = model.tokenizer.encode(served_request().prompt)
    repeat = 0
    while time.monotonic() < deadline:
        seq = model.scheduler.submit(prompt, call_params(model.defaults, stream, repeat), 0, None)
        deltas = stream_deltas(model.scheduler, seq, model.tokenizer, (), GenerationState(0))
        try:
            async for delta in deltas:
                tokens[stream] += len(delta.token_ids)
                if time.monotonic() >= deadline:
                    break
        finally:
            await deltas.aclose()
        repeat += 1


async def serve(seconds: float, streams: int = STREAMS) -> dict[str, Any]:
    """Loads demo-lm as a worker would and serves `streams` callers for `seconds`; returns
    tokens/s and this process's CPU µs per token (all threads) over that window."""
    settings = load(InferenceSettings, os.environ)
    model = await asyncio.to_thread(
        load_from_repository, settings.model_repository, "demo-lm", "1", settings.engine_options()
    )
    assert model.scheduler is not None
    await model.scheduler.start()  # allocates and warms up, as a worker before it is ready
    try:
        tokens = [0] * streams
        started, cpu = time.perf_counter(), time.process_time()
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_caller(model, s, deadline, tokens) for s in range(streams)))
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await model.scheduler.stop(drain_timeout_s=5.0)
    total = sum(tokens)
    return {
        "tokens_per_s": total / elapsed,
        "cpu_us_per_token": used / max(total, 1) * 1e6,
        "tokens": total,
        "streams": streams,
        "streams_served": sum(1 for n in tokens if n > 0),
    }


def main() -> None:
    import uvloop  # as the worker runs (services.core.server)

    print(json.dumps(uvloop.run(serve(float(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
