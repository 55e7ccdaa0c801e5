"""Reading jobs and batches over real gRPC (mTLS, as the edge calls) and a Redis of
their own: a page of results is bounded by bytes, a batch's sizes and counts cost
what they report, and an upload is read off the event loop."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from google.protobuf import json_format

from services.core import contract, identity
from services.core.server import serving
from services.jobs import openai_batches, openai_servicer
from services.jobs import store as jobstore
from services.jobs.service import JobsService, JobsSettings
from services.jobs.store import NewJob, Owner, now_ms
from tests import mtls
from tests.integration.conftest import catalogue
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2 as batch_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

# A gRPC client's default receive limit, and the REST transcoder's response cap.
DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024
TRANSCODED_BYTES = 8 * 1024 * 1024
RETENTION_S = 7 * 86400  # TOKENMESH_JOBS_RETENTION_DAYS's default


@pytest.fixture
async def jobs(own_redis: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service in this process on a Redis of its own (no worker serves its
    items), and a channel to it as the edge with gRPC's default receive limit."""
    settings = JobsSettings(
        redis_url=own_redis,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"pages-{uuid.uuid4().hex[:6]}",
    )
    await catalogue(settings.redis_url, "absent")  # no worker serves it: its items wait
    service = JobsService(settings)
    async with serving(service, settings) as server:
        target = f"127.0.0.1:{server.port}"
        async with identity.secure_channel(
            target, mtls.files(contract.EDGE), contract.JOBS, []
        ) as channel:
            yield service, channel


def _owner() -> tuple[Owner, tuple[tuple[str, str], ...]]:
    key = f"key_{uuid.uuid4().hex[:8]}"
    headers = {contract.KEY_ID_HEADER: key, contract.SCOPES_HEADER: contract.ADMIN_SCOPE}
    return Owner(key, "", headers), tuple(headers.items())


def _embeddings(index: int, inputs: int, dims: int) -> jobs_pb2.JobResult:
    """all-minilm's answer to `inputs` texts (384 floats each), with long decimals."""
    values = [(index + n / dims) / 3 for n in range(dims)]
    embeddings = [inference_pb2.Embedding(index=i, values=values) for i in range(inputs)]
    return jobs_pb2.JobResult(index=index, embed=v2.EmbedResponse(embeddings=embeddings))


async def _finish(service: JobsService, job_id: str, owner: Owner, results: list[Any]) -> None:
    stream = jobstore.work_stream(owner.lane)
    for result in results:
        # Entry "0-0": nothing to acknowledge (no runner took these items: no worker).
        await service.store.finish_item(job_id, result.index, result, (1, 0, 0), stream, "0-0")
    record = await service.store.get(job_id)
    assert record is not None and record.status == "SUCCEEDED"


async def test_a_job_of_large_results_pages_through_a_default_client(jobs):
    """A page was page_size results whatever their size: 100 results of 256 embeddings
    each were ~38 MiB, past the server's 16 MiB cap, and the job's results could not be
    listed at all (over REST a 429 the clients retried)."""
    service, channel = jobs
    owner, headers = _owner()
    count = 100
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=["x"] * 256))
    job_id, _ = await service.store.create(
        NewJob(owner, [item] * count, "", {}, "", now_ms() + 600_000)
    )
    await _finish(service, job_id, owner, [_embeddings(i, 256, 384) for i in range(count)])

    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    for page_size in (0, 1000):  # the default (100) and the most
        seen: list[int] = []
        token = ""
        while True:
            request = jobs_pb.ListJobResultsRequest(
                id=job_id, page_size=page_size, page_token=token
            )
            page = await stub.ListJobResults(request, metadata=headers)
            assert page.results, "a page always holds a result"
            assert page.ByteSize() < DEFAULT_RECEIVE_BYTES
            if not seen:  # what the edge's transcoder prints for REST (slow in Python)
                assert len(json_format.MessageToJson(page, indent=None)) < TRANSCODED_BYTES
            seen += [result.index for result in page.results]
            token = page.next_page_token
            if not token:
                break
        assert seen == list(range(count))
        assert all(len(r.embed.embeddings) == 256 for r in page.results)


async def test_a_page_of_small_results_is_still_page_size_long(jobs):
    service, channel = jobs
    owner, headers = _owner()
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=["x"]))
    job_id, _ = await service.store.create(
        NewJob(owner, [item] * 30, "", {}, "", now_ms() + 60_000)
    )
    await _finish(service, job_id, owner, [_embeddings(i, 1, 8) for i in range(30)])
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    request = jobs_pb.ListJobResultsRequest(id=job_id, page_size=25)
    page = await stub.ListJobResults(request, metadata=headers)
    assert [r.index for r in page.results] == list(range(25)) and page.next_page_token == "25"


# -- OpenAI's files and batches ---------------------------------------------


def _sdk_upload(data: bytes) -> HttpBody:
    """The multipart body openai-python's files.create sends (httpx writes it)."""
    request = httpx.Request(
        "POST",
        "http://edge/openai/v1/files",
        data={"purpose": "batch"},
        files={"file": ("requests.jsonl", data, "application/octet-stream")},
    )
    return HttpBody(content_type=request.headers["content-type"], data=request.read())


def _lines(count: int, custom_id: str = "r") -> bytes:
    lines = [
        {
            "custom_id": f"{custom_id}{n}",
            "method": "POST",
            "url": openai_batches.EMBEDDINGS,
            "body": {"model": "absent", "input": "x"},
        }
        for n in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


async def _batch(
    service: JobsService, stub: Any, owner: Owner, headers: Any, data: bytes
) -> dict[str, Any]:
    upload = json.loads((await stub.CreateFile(_sdk_upload(data), metadata=headers)).data)
    body = {
        "input_file_id": upload["id"],
        "endpoint": openai_batches.EMBEDDINGS,
        "completion_window": "24h",
    }
    request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
    batch: dict[str, Any] = json.loads((await stub.CreateBatch(request, metadata=headers)).data)
    return batch


async def test_create_file_reads_the_upload_off_the_event_loop(jobs, monkeypatch):
    """CreateFile parsed the upload on the event loop (which the replica's runners,
    heartbeats and webhooks share); a body of empty parts held it ~70 s."""
    service, channel = jobs
    _, headers = _owner()
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    parse_upload = openai_servicer.parse_upload
    threads: list[int] = []

    def recording(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return parse_upload(*args)

    monkeypatch.setattr(openai_servicer, "parse_upload", recording)
    data = _lines(2)
    created = json.loads((await stub.CreateFile(_sdk_upload(data), metadata=headers)).data)
    assert threads and threading.get_ident() not in threads
    assert created["bytes"] == len(data) and created["filename"] == "requests.jsonl"
    assert created["expires_at"] == created["created_at"] + RETENTION_S
    content = stub.GetFileContent(
        batch_pb.GetFileContentRequest(file_id=created["id"]), metadata=headers
    )
    assert b"".join([message.data async for message in content]) == data

    crafted = b"--b\r\n\r\n" + b"\r\n--b\r\n\r\n" * 700_000 + b"\r\n--b--\r\n"  # ~8 MiB
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateFile(
            HttpBody(content_type="multipart/form-data; boundary=b", data=crafted),
            metadata=headers,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < 5  # the email parser took ~70 s


async def test_a_result_files_size_is_computed_once(jobs, monkeypatch):
    """GetFile wrote every line of a result file to report its size, on every call
    (~14 s of CPU for 10,000 lines of 3072-dim embeddings, per files.retrieve)."""
    service, channel = jobs
    owner, headers = _owner()
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    batch = await _batch(service, stub, owner, headers, _lines(6))
    job_id = openai_batches.job_id_of(batch["id"])
    failed = jobs_pb2.JobResult(
        index=5, error=jobs_pb2.JobError(code="INVALID_ARGUMENT", grpc_code=3, message="no")
    )
    await _finish(service, job_id, owner, [_embeddings(i, 1, 384) for i in range(5)] + [failed])
    done = json.loads(
        (await stub.GetBatch(batch_pb.GetBatchRequest(batch_id=batch["id"]), metadata=headers)).data
    )
    assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}

    written: list[int] = []
    output_line = openai_batches.output_line

    def counting(*args: Any) -> Any:
        written.append(1)
        return output_line(*args)

    monkeypatch.setattr(openai_batches, "output_line", counting)

    async def described(file_id: str) -> dict[str, Any]:
        request = batch_pb.GetFileRequest(file_id=file_id)
        found: dict[str, Any] = json.loads((await stub.GetFile(request, metadata=headers)).data)
        return found

    async def content(file_id: str) -> bytes:
        request = batch_pb.GetFileContentRequest(file_id=file_id)
        return b"".join([m.data async for m in stub.GetFileContent(request, metadata=headers)])

    output = await described(done["output_file_id"])
    assert len(written) == 6  # each result once
    errors = await described(done["error_file_id"])
    assert len(written) == 7  # the error file's own line only
    again = await described(done["output_file_id"])
    assert await described(done["error_file_id"]) == errors
    assert len(written) == 7 and again == output
    assert output["bytes"] == len(await content(done["output_file_id"]))
    assert errors["bytes"] == len(await content(done["error_file_id"]))
    assert output["created_at"] == done["completed_at"]
    assert output["expires_at"] == errors["expires_at"] == done["completed_at"] + RETENTION_S


async def _commands_during(
    client: aioredis.Redis, calls: Callable[[], Awaitable[None]]
) -> list[str]:
    """Returns the commands Redis ran while `calls` ran (its MONITOR's view), up to a
    marker sent after them."""
    marker = f"marker-{uuid.uuid4().hex}"
    seen: list[str] = []
    async with client.monitor() as monitor:
        await calls()
        await client.echo(marker)
        while True:
            command = (await monitor.next_command())["command"]
            if marker in command:
                return seen
            seen.append(command)


async def test_get_batch_and_list_batches_do_not_read_the_lines(jobs):
    """GetBatch and ListBatches read each batch's whole record, every line's custom_id
    (up to ~8 MB a batch, ~800 MB for a list of 100), to count the lines."""
    service, channel = jobs
    owner, headers = _owner()
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    batch = await _batch(service, stub, owner, headers, _lines(50, custom_id="c" * 200))
    monitored = aioredis.from_url(service.settings.redis_url)

    async def reads() -> None:
        request = batch_pb.GetBatchRequest(batch_id=batch["id"])
        got = json.loads((await stub.GetBatch(request, metadata=headers)).data)
        assert got["request_counts"]["total"] == 50
        listed = await stub.ListBatches(batch_pb.ListBatchesRequest(limit=10), metadata=headers)
        assert [b["id"] for b in json.loads(listed.data)["data"]] == [batch["id"]]

    try:
        commands = await _commands_during(monitored, reads)
    finally:
        await monitored.aclose()
    key = openai_batches.batch_key(batch["id"])
    on_batch = [command for command in commands if key in command]
    assert on_batch, commands  # the monitor saw the reads
    assert not [c for c in on_batch if "HGETALL" in c.upper() or "lines" in c], on_batch
