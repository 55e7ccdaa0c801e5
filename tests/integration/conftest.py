"""In-process servers on ephemeral ports, reached over real channels."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from services.core.server import serving
from services.inference.service import InferenceService, InferenceSettings


@pytest.fixture
async def inference_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a real inference server with the deterministic test engine."""
    settings = InferenceSettings(
        metrics_port=-1,
        grace_s=1.0,
        test_engine_step_ms=5.0,
        test_models=("deterministic-test:1", "deterministic-test:2"),
    )
    async with serving(InferenceService(settings), settings) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel
