"""Jobs and batches naming a model nothing knows, or one the key may not use, are
refused when they are created.

Before, CreateJob and CreateBatch checked neither: an item naming a typo'd model
was never placed (no worker serves it), so the job sat QUEUED (the batch
in_progress) for its whole completion window, up to 7 days, then expired; a key
limited to some models had its job accepted and every item fail later. The real
jobs service over mTLS as the edge calls it, a real Redis holding the catalogue
and the worker registry.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.api.httpbody_pb2 import HttpBody
from google.rpc import error_details_pb2, status_pb2

from services.core import contract, identity
from services.core.server import serving
from services.jobs import openai_batches
from services.jobs.service import JobsService, JobsSettings
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.integration.conftest import catalogue
from tests.integration.test_openai_batch_storage import _jsonl, _line, _openai_error, _upload
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

KNOWN = "known-model"  # in the catalogue, no worker serves it now: its items wait
SERVED = "served-model"  # not in the catalogue, a routable worker serves it
Headers = tuple[tuple[str, str], ...]


@pytest.fixture
async def jobs(own_redis: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service and a channel to it as the edge; KNOWN catalogued, SERVED served."""
    await catalogue(own_redis, KNOWN)
    settings = JobsSettings(
        redis_url=own_redis,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"unknown-{uuid.uuid4().hex[:6]}",
    )
    service = JobsService(settings)
    async with serving(service, settings) as server:
        worker = WorkerEntry(
            "w0", "127.0.0.1", 1, ((SERVED, "1"),), lease_expires_at=time.time() + 600
        )
        await service.store.redis.hset(WORKERS_KEY, "w0", worker.to_json())
        target = f"127.0.0.1:{server.port}"
        async with identity.secure_channel(
            target, mtls.files(contract.EDGE), contract.JOBS
        ) as channel:
            yield service, channel


def _headers(models: str = "") -> Headers:
    """A key of its own (any scope), limited to `models` when given."""
    headers = {
        contract.KEY_ID_HEADER: f"key_{uuid.uuid4().hex[:8]}",
        contract.SCOPES_HEADER: contract.ADMIN_SCOPE,
    }
    if models:
        headers[contract.MODELS_HEADER] = models
    return tuple(headers.items())


def _items(*models: str) -> list[jobs_pb2.JobItem]:
    return [
        jobs_pb2.JobItem(complete=v2.CompleteRequest(model=model, prompt="a")) for model in models
    ]


def _reason(error: grpc.aio.AioRpcError) -> str:
    """Returns the status's ErrorInfo reason ("" without one)."""
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    )
    info = error_details_pb2.ErrorInfo()
    return next((info.reason for detail in status.details if detail.Unpack(info)), "")


async def _job_count(channel: grpc.aio.Channel, headers: Headers) -> int:
    listed = await jobs_service_pb2_grpc.JobsServiceStub(channel).ListJobs(
        pb.ListJobsRequest(), metadata=headers
    )
    return len(listed.jobs)


async def test_a_job_naming_a_model_nothing_knows_is_refused_not_found_naming_its_item(
    jobs: tuple[JobsService, grpc.aio.Channel],
) -> None:
    _, channel = jobs
    headers = _headers()
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    request = pb.CreateJobRequest(items=_items(KNOWN, SERVED, "typo-model", "typo-model"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateJob(request, metadata=headers)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "items[2]" in (refused.value.details() or "")
    assert "typo-model" in (refused.value.details() or "")
    assert _reason(refused.value) == "MODEL_NOT_FOUND"
    assert await _job_count(channel, headers) == 0


async def test_a_job_of_catalogued_or_served_models_is_created(
    jobs: tuple[JobsService, grpc.aio.Channel],
) -> None:
    _, channel = jobs
    headers = _headers()
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    job = await stub.CreateJob(pb.CreateJobRequest(items=_items(KNOWN, SERVED)), metadata=headers)
    assert job.status == "QUEUED"
    assert await _job_count(channel, headers) == 1


@pytest.mark.parametrize("model", [KNOWN, "typo-model"])
async def test_a_job_naming_a_model_the_key_may_not_use_is_refused_as_its_workers_refuse_it(
    jobs: tuple[JobsService, grpc.aio.Channel], model: str
) -> None:
    # PERMISSION_DENIED whether the model exists or not: a restricted key learns
    # nothing of the others (NOT_FOUND for the typo would tell it which exist).
    _, channel = jobs
    headers = _headers(models=SERVED)
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateJob(pb.CreateJobRequest(items=_items(SERVED, model)), metadata=headers)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _reason(refused.value) == "MODEL_NOT_ALLOWED"
    assert await _job_count(channel, headers) == 0


async def _create_batch(channel: grpc.aio.Channel, headers: Headers, file_id: str) -> HttpBody:
    body = {
        "input_file_id": file_id,
        "endpoint": openai_batches.EMBEDDINGS,
        "completion_window": "24h",
    }
    request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    created: HttpBody = await stub.CreateBatch(request, metadata=headers)
    return created


async def test_a_batch_whose_lines_name_a_model_nothing_knows_is_refused_naming_the_lines(
    jobs: tuple[JobsService, grpc.aio.Channel],
) -> None:
    _, channel = jobs
    headers = _headers()
    lines = [_line(1, model=KNOWN), _line(2, model="typo-model"), _line(3, model="typo-model")]
    uploaded = await _upload(channel, headers, _jsonl(lines))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create_batch(channel, headers, uploaded["id"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = _openai_error(refused)
    assert error["param"] == "line 2.body.model", error
    assert "typo-model" in error["message"]
    assert "line 3.body.model" in (refused.value.details() or ""), refused.value.details()


async def test_a_batch_naming_a_model_the_key_may_not_use_is_refused_forbidden(
    jobs: tuple[JobsService, grpc.aio.Channel],
) -> None:
    _, channel = jobs
    headers = _headers(models=KNOWN)
    uploaded = await _upload(channel, headers, _jsonl([_line(1, model="typo-model")]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create_batch(channel, headers, uploaded["id"])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_batch_of_known_models_is_created(
    jobs: tuple[JobsService, grpc.aio.Channel],
) -> None:
    _, channel = jobs
    headers = _headers()
    uploaded = await _upload(channel, headers, _jsonl([_line(1, model=KNOWN)]))
    created = json.loads((await _create_batch(channel, headers, uploaded["id"])).data)
    assert created["status"] in {"validating", "in_progress"}, created
