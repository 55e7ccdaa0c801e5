"""Stopping the real all-minilm-l6-v2 embedder: drained, or ended retryably after the timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.core.errors import Unavailable
from services.inference.repository import EngineOptions, load_from_repository

MODELS = Path(__file__).resolve().parents[2] / "models"


async def test_an_embed_left_after_the_drain_timeout_ends_unloaded_not_internal() -> None:
    # close() shut the compute thread: the running embed's next chunk raised
    # RuntimeError (INTERNAL), a queued chunk was cancelled (CANCELLED).
    model = load_from_repository(MODELS, "all-minilm-l6-v2", "1", EngineOptions(threads=1))
    embedder = model.embedder
    assert embedder is not None
    encoded = embedder.tokenize([f"input number {i}" for i in range(4 * embedder.max_batch_size)])
    running = asyncio.ensure_future(embedder.embed(encoded))
    queued = asyncio.ensure_future(embedder.embed(encoded))
    async with asyncio.timeout(10):
        while embedder.in_flight < 2:
            await asyncio.sleep(0.001)
    await embedder.stop(drain_timeout_s=0.0)
    for call in (running, queued):
        with pytest.raises(Unavailable) as ended:
            await asyncio.wait_for(call, 30)
        assert ended.value.reason == "MODEL_UNLOADED"
    with pytest.raises(Unavailable) as refused:
        await embedder.embed(encoded[:1])
    assert refused.value.reason == "MODEL_UNLOADING"
    assert embedder.in_flight == 0
