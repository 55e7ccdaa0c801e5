"""A v1 Complete handed over to the jobs service is metered as v1.

`Prefer: respond-async` on /v1/...:complete makes a job item, which the jobs
service runs on the worker's v2 Complete: its usage event said api_version "v2"
and the v2 RPC, so reports grouped by API version (how an operator sees who
still calls v1 before its sunset) missed every such caller. The jobs service now
sends the item's API version (contract.API_VERSION_HEADER), honoured from the
jobs service only. A real worker, real Redis, real mTLS, the real item executor.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.pki import IdentityFiles
from services.inference.service import InferenceService
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.workers import WorkerDirectory
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_embed_job_attempts import _events
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.jobs.v1 import jobs_pb2

PRIVATE_DB = 12  # no jobs service of the session mesh reads it
V1_COMPLETE = "/tokenmesh.inference.v1.InferenceService/Complete"
V2_COMPLETE = "/tokenmesh.inference.v2.InferenceService/Complete"


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[InferenceService, aioredis.Redis, ItemExecutor, object]]:
    url = private_db_url(redis_url, PRIVATE_DB)
    client = aioredis.from_url(url)
    settings = inference_settings(tmp_path, url, test_models=("deterministic-test:1",))
    executor = ItemExecutor(
        WorkerDirectory(client), IdentityFiles.of(mtls.pki_dir(), contract.JOBS), Backoff(), 30
    )
    worker_id = f"w-v1-{uuid.uuid4().hex[:6]}"
    try:
        async with await start_inference(settings) as (service, edge_channel):
            assert service._running is not None  # noqa: SLF001 - started: its port
            port = service._running.port  # noqa: SLF001
            models = (("deterministic-test", "1"),)
            entry = WorkerEntry(
                worker_id, "127.0.0.1", port, models, lease_expires_at=time.time() + 600
            )
            await client.hset(WORKERS_KEY, worker_id, entry.to_json())
            yield service, client, executor, edge_channel
    finally:
        await client.hdel(WORKERS_KEY, worker_id)
        await executor.close()
        await client.aclose()


def _identity(key: str) -> dict[str, str]:
    return {
        contract.KEY_ID_HEADER: key,
        contract.SCOPES_HEADER: "inference:generate",
        contract.API_VERSION_HEADER: "v1",  # what a v1 hand-over's job keeps
    }


async def _event_of(
    client: aioredis.Redis, stream: str, request_id: str
) -> inference_pb2.UsageEvent:
    async with asyncio.timeout(10):
        while not (events := await _events(client, stream, request_id)):
            await asyncio.sleep(0.02)
    assert len(events) == 1, events  # metered once
    event: inference_pb2.UsageEvent = events[0]
    return event


async def test_a_handed_over_v1_complete_is_metered_as_v1(worker) -> None:
    service, client, executor, _ = worker
    item = jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model="deterministic-test", prompt="hi", max_output_tokens=3)
    )
    key = f"key_{uuid.uuid4().hex[:8]}"
    outcome = await executor.run(item, 0, "job-v1:0", _identity(key), time.time() + 30)
    assert outcome.result.WhichOneof("outcome") == "complete", outcome.result
    event = await _event_of(client, service.settings.usage_stream, "job-v1:0")
    assert (event.api_version, event.rpc) == ("v1", V1_COMPLETE)  # old code: v2's


async def test_the_header_from_anyone_but_the_jobs_service_changes_nothing(worker) -> None:
    # The edge (a client's copy of the header passes it) is not the jobs service.
    service, client, _, edge_channel = worker
    key = f"key_{uuid.uuid4().hex[:8]}"
    request = v2.CompleteRequest(
        model="deterministic-test", prompt="hi", max_output_tokens=3, request_id="direct-v2"
    )
    await v2_rpc.InferenceServiceStub(edge_channel).Complete(
        request, metadata=tuple(_identity(key).items()), timeout=30
    )
    event = await _event_of(client, service.settings.usage_stream, "direct-v2")
    assert (event.api_version, event.rpc) == ("v2", V2_COMPLETE)
