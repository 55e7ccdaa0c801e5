"""Samples wait for one redaction thread, each holding its request's texts: past
MAX_PENDING_SAMPLES waiting, a sampled request's sample is dropped and counted,
so a burst of sampled large requests cannot grow the worker's memory without bound."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.inference.pipeline import content, samples
from services.inference.service import InferenceService
from services.router.policies import PolicyCatalog, SampleSettings
from tests.integration import test_shadow_samples as shadow_samples
from tokenmesh.inference.v2 import inference_service_pb2 as pb

MODEL = "deterministic-test"
BOUND = 3
SENT = 8


# A real worker (mTLS, the deterministic engine) and a Redis client: the shadow-samples
# tests' fixtures.
worker, client = shadow_samples.worker, shadow_samples.client


def _outcome(name: str) -> float:
    return samples.SAMPLES_WRITTEN.labels(name)._value.get()  # type: ignore[no-any-return]


async def _sampled_stream_length(client: aioredis.Redis, tenant: str) -> int:
    return int(await client.xlen(samples.stream_key(tenant)))


async def test_samples_past_the_backlog_bound_are_dropped_and_counted(
    worker: tuple[InferenceService, Any],
    client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, stub = worker
    monkeypatch.setattr(content, "MAX_PENDING_SAMPLES", BOUND)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await PolicyCatalog(client).set_samples(
        SampleSettings(tenant, 1.0, "admin-key", time.time(), "ticket 1")
    )
    await service.policies.refresh()
    # The redaction thread busy (as with a large sample before these): builds queue.
    busy = threading.Event()
    blocker = content._SAMPLES.submit(busy.wait, 30)
    dropped_before = _outcome("dropped")
    metadata = ((contract.TENANT_HEADER, tenant), (contract.KEY_ID_HEADER, f"key-{tenant}"))
    try:
        for i in range(SENT):
            await stub.Complete(
                pb.CompleteRequest(model=MODEL, prompt=f"sample me {i}", max_output_tokens=2),
                metadata=metadata,
                timeout=10,
            )
        async with asyncio.timeout(10):  # each request's sample is taken as it ends
            while len(content._SAMPLE_WRITES) + _outcome("dropped") - dropped_before < SENT:
                await asyncio.sleep(0.02)
        assert len(content._SAMPLE_WRITES) == BOUND
        assert _outcome("dropped") - dropped_before == SENT - BOUND
    finally:
        busy.set()
        blocker.result(timeout=10)
    async with asyncio.timeout(10):
        while content._SAMPLE_WRITES:
            await asyncio.sleep(0.02)
    assert await _sampled_stream_length(client, tenant) == BOUND
