"""An embedding computation that ends forgets only its own pending inputs.

A `no-cache` request computes an input again and takes its pending entry; the
first computation's end dropped that entry too, so a request arriving while
the second still ran found nothing pending and computed the input a third time.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from services.inference.pipeline.coalesce import EmbeddingInputs
from services.inference.pipeline.embed import EmbeddingPipeline


class GatedEmbedder:
    """Embeds each call once its gate opens (one gate per call, in call order)."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return [[1.0, 0.0] for _ in inputs]


async def _stored(_: Any) -> None:
    return None


async def test_a_computation_that_ends_leaves_another_ones_pending_input() -> None:
    inputs = EmbeddingInputs()
    stage: Any = SimpleNamespace(embedding_inputs=inputs, store=SimpleNamespace(put_many=_stored))
    embedder: Any = GatedEmbedder()
    start = EmbeddingPipeline._start
    first = start(None, stage, embedder, ["k"], {"k": [1]})  # type: ignore[arg-type]
    second = start(None, stage, embedder, ["k"], {"k": [1]})  # type: ignore[arg-type]  # no-cache
    async with asyncio.timeout(5):
        while len(embedder.gates) < 2:
            await asyncio.sleep(0)
        embedder.gates[0].set()
        await first["k"]
        while inputs.stored < 1:
            await asyncio.sleep(0)
    assert inputs.pending.get("k") is second["k"]  # still findable while it computes
    embedder.gates[1].set()
    async with asyncio.timeout(5):
        await second["k"]
        while inputs.stored < 2:
            await asyncio.sleep(0)
    assert inputs.pending == {}
