"""The jobs service's RPCs over real gRPC (mTLS, as the edge calls them) and a real Redis:
downloads of large results, and a batch that is created whole or not at all."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from redis.asyncio.client import Pipeline

from services.core import contract, identity
from services.core.redis_service import text
from services.core.server import MAX_MESSAGE_BYTES, serving
from services.jobs import openai_batches
from services.jobs import store as jobstore
from services.jobs.openai_files import FileStore, Upload
from services.jobs.service import JobsService, JobsSettings
from services.jobs.store import NewJob, Owner, now_ms
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import catalogue
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2 as batch_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

# A database of its own: no worker serves these items, and the session mesh's jobs
# service (database 0) must not take them.
PRIVATE_DB = 13
RESULTS = 3
# Floats per result: ~6-7 MB of JSON a line, so the 3 lines (~20 MB) are past the
# servers' 16 MiB message cap together, and each line is larger than a message.
# OpenAI's lines print ~19 characters a float (Python's float of the float32),
# JobsService's ~11 (the shortest float32 text): more floats for those.
VALUES = 350_000
JOB_VALUES = 600_000


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service in this process, and a channel to it as the edge."""
    settings = JobsSettings(
        redis_url=private_db_url(redis_url, PRIVATE_DB),
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"rpcs-{uuid.uuid4().hex[:6]}",
    )
    await catalogue(settings.redis_url, "absent")  # no worker serves it: its items wait
    service = JobsService(settings)
    async with serving(service, settings) as server:
        # As much as a server may send: what fails is the service's message, not this limit.
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        target = f"127.0.0.1:{server.port}"
        async with identity.secure_channel(
            target, mtls.files(contract.EDGE), contract.JOBS, options
        ) as channel:
            yield service, channel


def _owner() -> tuple[Owner, tuple[tuple[str, str], ...]]:
    """A key of its own (a lane of its own) and the headers the edge sends for it."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    headers = {contract.KEY_ID_HEADER: key, contract.SCOPES_HEADER: contract.ADMIN_SCOPE}
    return Owner(key, "", headers), tuple(headers.items())


def _large_embed_result(index: int, size: int) -> jobs_pb2.JobResult:
    values = [(index + n / size) / 3 for n in range(size)]  # long decimals, like real ones
    response = v2.EmbedResponse(embeddings=[inference_pb2.Embedding(index=0, values=values)])
    return jobs_pb2.JobResult(index=index, embed=response)


async def _finish_with_large_results(
    service: JobsService, job_id: str, owner: Owner, size: int
) -> None:
    stream = jobstore.work_stream(owner.lane)
    for index in range(RESULTS):
        # Entry "0-0": nothing to acknowledge (no runner took these items: no worker).
        await service.store.finish_item(
            job_id, index, _large_embed_result(index, size), (1, 0, 0), stream, "0-0"
        )
    record = await service.store.get(job_id)
    assert record is not None and record.status == "SUCCEEDED"


async def _download(call: Any) -> list[bytes]:
    return [message.data async for message in call]


async def test_a_job_download_larger_than_a_message_arrives_whole(jobs):
    """DownloadJobResults sent 500 results a message: three large embeddings were one
    ~20 MB message, past the 16 MiB cap, and every download ended RESOURCE_EXHAUSTED."""
    service, channel = jobs
    owner, headers = _owner()
    items = [jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=["x"]))] * RESULTS
    job_id, _ = await service.store.create(NewJob(owner, items, "", {}, "", now_ms() + 600_000))
    await _finish_with_large_results(service, job_id, owner, JOB_VALUES)

    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    call = stub.DownloadJobResults(jobs_pb.DownloadJobResultsRequest(id=job_id), metadata=headers)
    messages = await _download(call)

    data = b"".join(messages)
    assert len(data) > MAX_MESSAGE_BYTES
    lines = data.splitlines()
    assert len(messages) > len(lines) == RESULTS  # a line larger than a message spans several
    for index, line in enumerate(lines):
        result = json.loads(line)
        assert result["index"] == index
        assert len(result["embed"]["embeddings"][0]["values"]) == JOB_VALUES


async def _upload(service: JobsService, owner: Owner, count: int) -> str:
    lines = [
        {
            "custom_id": f"r{n}",
            "method": "POST",
            "url": openai_batches.EMBEDDINGS,
            "body": {"model": "absent", "input": "x"},
        }
        for n in range(count)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    stored = await FileStore(service.redis, 3600).create(
        owner.lane, Upload("batch", "in.jsonl", data)
    )
    return stored.file_id


def _create_batch_body(file_id: str) -> HttpBody:
    body = {
        "input_file_id": file_id,
        "endpoint": openai_batches.EMBEDDINGS,
        "completion_window": "24h",
    }
    return HttpBody(content_type="application/json", data=json.dumps(body).encode())


async def test_a_batch_output_file_larger_than_a_message_arrives_whole(jobs):
    """GetFileContent sent 500 output lines a message: ~65 KB a line of 3072-dim
    embeddings made ~33 MB messages, and no such batch's output could be downloaded."""
    service, channel = jobs
    owner, headers = _owner()
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    file_id = await _upload(service, owner, RESULTS)
    created = await stub.CreateBatch(_create_batch_body(file_id), metadata=headers)
    batch = json.loads(created.data)
    job_id = openai_batches.job_id_of(batch["id"])
    await _finish_with_large_results(service, job_id, owner, VALUES)
    done = await stub.GetBatch(batch_pb.GetBatchRequest(batch_id=batch["id"]), metadata=headers)
    output_file_id = json.loads(done.data)["output_file_id"]
    assert output_file_id

    call = stub.GetFileContent(
        batch_pb.GetFileContentRequest(file_id=output_file_id), metadata=headers
    )
    messages = await _download(call)

    data = b"".join(messages)
    assert len(data) > MAX_MESSAGE_BYTES
    lines = data.splitlines()
    assert len(messages) > len(lines) == RESULTS
    for n, line in enumerate(lines):
        output = json.loads(line)
        assert output["custom_id"] == f"r{n}"
        assert len(output["response"]["body"]["data"][0]["embedding"]) == VALUES
    described = await stub.GetFile(
        batch_pb.GetFileRequest(file_id=output_file_id), metadata=headers
    )
    assert json.loads(described.data)["bytes"] == len(data)


async def test_a_batch_whose_record_cannot_be_written_leaves_no_job(jobs, monkeypatch):
    """CreateBatch wrote the job, then the batch in a second transaction: a failure (or a
    cancelled call) between the two left a queued, billed job no batch names, and the
    SDK's retry ran and billed it again. The write of the batch's record fails here."""
    service, channel = jobs
    owner, headers = _owner()
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    file_id = await _upload(service, owner, 2)
    execute = Pipeline.execute

    async def failing_batch_writes(self: Pipeline, raise_on_error: bool = True) -> Any:
        for args, _ in self.command_stack:
            if len(args) > 1 and text(args[1]).startswith(openai_batches.batch_key("")):
                raise aioredis.ConnectionError("the connection dropped (injected)")
        return await execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", failing_batch_writes)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateBatch(_create_batch_body(file_id), metadata=headers)
    monkeypatch.undo()

    client = service.redis
    jobs_of_owner = [
        name
        async for name in client.scan_iter(match=jobstore.job_key("*"))
        if await client.type(name) == b"hash"
        and await client.hget(name, "owner") == owner.key_id.encode()
    ]
    assert jobs_of_owner == []
    assert await client.xlen(jobstore.work_stream(owner.lane)) == 0
    assert await client.zcard(jobstore.owner_key(owner.key_id)) == 0
    assert await client.zcard(openai_batches.owner_batches_key(owner.lane)) == 0


async def _first(call: Any) -> jobs_pb.WatchJobResponse:
    """Returns a watch's first event (it is open)."""
    message = await call.read()
    assert isinstance(message, jobs_pb.WatchJobResponse), message
    return message


async def test_a_key_holds_a_bounded_number_of_job_watches_open(
    jobs: tuple[JobsService, grpc.aio.Channel],
) -> None:
    # Each watch polls Redis twice a second while its job runs (up to the retention),
    # and its keepalive outlives every idle timeout: ~1,100 of one key's filled the
    # event loop that runs every tenant's items.
    from services.jobs.servicer import MAX_WATCHES_PER_KEY

    service, channel = jobs
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)

    async def held_job(owner: Owner) -> str:
        item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="absent", prompt="a"))
        job_id, _ = await service.store.create(
            NewJob(owner, [item], "", {}, "", now_ms() + 600_000)
        )
        return job_id

    owner, headers = _owner()
    job_id = await held_job(owner)
    watches = [
        stub.WatchJob(jobs_pb.WatchJobRequest(id=job_id), metadata=headers)
        for _ in range(MAX_WATCHES_PER_KEY)
    ]
    try:
        for watch in watches:
            assert (await _first(watch)).event.job.id == job_id  # open, its first event sent
        refused = stub.WatchJob(jobs_pb.WatchJobRequest(id=job_id), metadata=headers)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watches" in (info.value.details() or "")
        # Another key's watches are its own.
        other, other_headers = _owner()
        elsewhere = stub.WatchJob(
            jobs_pb.WatchJobRequest(id=await held_job(other)), metadata=other_headers
        )
        assert (await _first(elsewhere)).event.job.id
        elsewhere.cancel()
        # A closed watch gives its place back.
        watches.pop().cancel()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            again = stub.WatchJob(jobs_pb.WatchJobRequest(id=job_id), metadata=headers)
            try:
                assert (await _first(again)).event.job.id == job_id
                again.cancel()
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert asyncio.get_running_loop().time() < deadline, "the place never came back"
                await asyncio.sleep(0.05)
    finally:
        for watch in watches:
            watch.cancel()
