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
from tests.integration.conftest import JobsWorker, jobs_worker
from tests.integration.test_embed_job_attempts import _events
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.jobs.v1 import jobs_pb2

PRIVATE_DB = 12  # no jobs service of the session mesh reads it
V1_COMPLETE = "/tokenmesh.inference.v1.InferenceService/Complete"
V2_COMPLETE = "/tokenmesh.inference.v2.InferenceService/Complete"


@pytest.fixture
async def worker(tmp_path: Path, redis_url: str) -> AsyncIterator[JobsWorker]:
    async with jobs_worker(tmp_path, redis_url, PRIVATE_DB) as running:
        yield running


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


async def test_a_handed_over_v1_complete_is_metered_as_v1(worker: JobsWorker) -> None:
    item = jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model="deterministic-test", prompt="hi", max_output_tokens=3)
    )
    key = f"key_{uuid.uuid4().hex[:8]}"
    outcome = await worker.executor.run(item, 0, "job-v1:0", _identity(key), time.time() + 30)
    assert outcome.result.WhichOneof("outcome") == "complete", outcome.result
    event = await _event_of(worker.client, worker.service.settings.usage_stream, "job-v1:0")
    assert (event.api_version, event.rpc) == ("v1", V1_COMPLETE)  # old code: v2's


async def test_the_header_from_anyone_but_the_jobs_service_changes_nothing(
    worker: JobsWorker,
) -> None:
    # Only the jobs service's is honoured: not the edge's (which strips a client's copy).
    key = f"key_{uuid.uuid4().hex[:8]}"
    request = v2.CompleteRequest(
        model="deterministic-test", prompt="hi", max_output_tokens=3, request_id="direct-v2"
    )
    await v2_rpc.InferenceServiceStub(worker.edge_channel).Complete(
        request, metadata=tuple(_identity(key).items()), timeout=30
    )
    event = await _event_of(worker.client, worker.service.settings.usage_stream, "direct-v2")
    assert (event.api_version, event.rpc) == ("v2", V2_COMPLETE)
