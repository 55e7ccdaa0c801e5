"""OpenAI's files and batches on the jobs service over real gRPC (mTLS, as the edge calls
it) and a Redis of its own: what an owner may keep, a batch created once however its
creation is retried, downloads held to a read of results, and the error file.

A TCP proxy between the service and Redis drops a connection the way a network blip
does: after the creating transaction reached Redis, before its reply came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
import httpx
import openai
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody

from services.core import contract, identity
from services.core.redis_service import text
from services.core.server import MAX_MESSAGE_BYTES, serving
from services.jobs import openai_batches, openai_files, openai_servicer
from services.jobs import store as jobstore
from services.jobs.service import JobsService, JobsSettings
from services.jobs.store import Owner
from tests import mtls
from tests.integration.conftest import catalogue
from tests.rpc_errors import failed_call_reason
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2, jobs_service_pb2_grpc
from tokenmesh.openai.v1 import openai_batch_service_pb2 as batch_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

Headers = tuple[tuple[str, str], ...]
QUOTA_BYTES = 64 * 1024
FILE_MAX_BYTES = 32 * 1024
FILES_PER_OWNER = 4
# docs/openai.md's bounds (openai_batches.MAX_CUSTOM_ID, MAX_RECORD_BYTES).
MAX_CUSTOM_ID = 512
MAX_RECORD_BYTES = 4 * 1024 * 1024


# -- a Redis connection that drops -------------------------------------------

MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"
BATCH_RECORD = openai_batches.batch_key("").encode()


@dataclass
class _Link:
    """One client connection through the proxy: the transaction being sent, and
    whether the reply to its EXEC is to be swallowed (the connection dropped)."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    sending: bytes = b""
    swallow: bool = False


@dataclass
class DroppingProxy:
    """A TCP proxy to Redis. Armed, it forwards the next transaction that writes a
    batch's record to Redis, then drops the connection instead of passing the reply
    on (`then_down`: and refuses every connection until `down` is cleared)."""

    target: tuple[str, int]
    armed: bool = False
    then_down: bool = False
    down: bool = False
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    links: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        link = _Link(writer, server_writer)
        self.links |= {writer, server_writer}
        await asyncio.gather(self._upstream(reader, link), self._downstream(server_reader, link))

    async def _upstream(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while data := await reader.read(1 << 16):
            start = data.rfind(MULTI)
            if start >= 0:
                link.sending = data[start:]
            elif link.sending:
                link.sending += data
            if link.sending.endswith(EXEC):
                if self.armed and BATCH_RECORD in link.sending:
                    self.armed, link.swallow = False, True
                link.sending = b""
            link.server.write(data)
            await link.server.drain()
        link.server.close()

    async def _downstream(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while data := await reader.read(1 << 16):
            if link.swallow:  # the transaction ran; its reply never arrives
                self._drop_all() if self.then_down else self._drop(link)
                self.down = self.then_down
                self.dropped.set()
                return
            link.client.write(data)
            await link.client.drain()
        link.client.close()

    def _drop(self, link: _Link) -> None:
        link.client.transport.abort()
        link.server.transport.abort()

    def _drop_all(self) -> None:
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()


@pytest.fixture
async def proxy(own_redis: str) -> AsyncIterator[tuple[DroppingProxy, str]]:
    """The proxy, and the URL of own_redis through it."""
    parts = urlsplit(own_redis)
    dropping = DroppingProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    server = await dropping.serve()
    port = server.sockets[0].getsockname()[1]
    try:
        yield dropping, parts._replace(netloc=f"127.0.0.1:{port}").geturl()
    finally:
        dropping._drop_all()
        server.close()


@contextlib.asynccontextmanager
async def _jobs_service(
    redis_url: str, **settings: Any
) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    config = JobsSettings(
        redis_url=redis_url,
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"storage-{uuid.uuid4().hex[:6]}",
        **settings,
    )
    await catalogue(redis_url, "absent")  # no worker serves it: its items wait
    service = JobsService(config)
    async with serving(service, config) as server:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        target = f"127.0.0.1:{server.port}"
        async with identity.secure_channel(
            target, mtls.files(contract.EDGE), contract.JOBS, options
        ) as channel:
            yield service, channel


@pytest.fixture
async def jobs(own_redis: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service (no worker serves its items)."""
    async with _jobs_service(own_redis) as pair:
        yield pair


@pytest.fixture
async def small(own_redis: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service with a small storage quota."""
    async with _jobs_service(
        own_redis,
        openai_storage_bytes_per_owner=QUOTA_BYTES,
        openai_file_max_bytes=FILE_MAX_BYTES,
        openai_files_per_owner=FILES_PER_OWNER,
    ) as pair:
        yield pair


# -- helpers -----------------------------------------------------------------


def _owner(tenant: str = "") -> tuple[Owner, Headers]:
    key = f"key_{uuid.uuid4().hex[:8]}"
    headers = {contract.KEY_ID_HEADER: key, contract.SCOPES_HEADER: contract.ADMIN_SCOPE}
    if tenant:
        headers[contract.TENANT_HEADER] = tenant
    return Owner(key, tenant, headers), tuple(headers.items())


def _stub(channel: grpc.aio.Channel) -> openai_batch_service_pb2_grpc.OpenAIBatchServiceStub:
    return openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)


def _upload_body(data: bytes) -> HttpBody:
    """The multipart body openai-python's files.create sends (httpx writes it)."""
    request = httpx.Request(
        "POST",
        "http://edge/openai/v1/files",
        data={"purpose": "batch"},
        files={"file": ("requests.jsonl", data, "application/octet-stream")},
    )
    return HttpBody(content_type=request.headers["content-type"], data=request.read())


def _line(n: int, custom_id: str = "", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id or f"r{n}",
        "method": "POST",
        "url": openai_batches.EMBEDDINGS,
        "body": {"model": "absent", "input": "x", **body},
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _padded(size: int) -> bytes:
    """One valid line of exactly `size` bytes (a long input text)."""
    line = _jsonl([_line(0, input="")])
    return _jsonl([_line(0, input="x" * (size - len(line)))])


async def _upload(channel: grpc.aio.Channel, headers: Headers, data: bytes) -> dict[str, Any]:
    created = await _stub(channel).CreateFile(_upload_body(data), metadata=headers)
    found: dict[str, Any] = json.loads(created.data)
    return found


def _batch_body(file_id: str, **extra: Any) -> HttpBody:
    body = {
        "input_file_id": file_id,
        "endpoint": openai_batches.EMBEDDINGS,
        "completion_window": "24h",
        **extra,
    }
    return HttpBody(content_type="application/json", data=json.dumps(body).encode())


async def _create_batch(
    channel: grpc.aio.Channel, headers: Headers, file_id: str
) -> dict[str, Any]:
    created = await _stub(channel).CreateBatch(_batch_body(file_id), metadata=headers)
    found: dict[str, Any] = json.loads(created.data)
    return found


def _openai_error(refused: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> dict[str, Any]:
    trailers = dict(refused.value.trailing_metadata() or ())
    error: dict[str, Any] = json.loads(trailers[contract.OPENAI_ERROR_HEADER])["error"]
    return error


async def _owner_batches(service: JobsService, owner: Owner) -> list[str]:
    members: Any = await service.redis.zrange(openai_batches.owner_batches_key(owner.lane), 0, -1)
    return [text(member) for member in members]


async def _wait_until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- what an owner may keep ----------------------------------------------------


async def test_uploads_past_an_owners_quota_are_refused_until_one_is_deleted(small):
    """Every upload was kept for the retention, with no bound per tenant: one key could
    fill the AOF Redis that every service shares, 8 MiB a request, spending no tokens."""
    _, channel = small
    _, headers = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    big = _padded(FILE_MAX_BYTES)
    kept = [await _upload(channel, headers, big) for _ in range(QUOTA_BYTES // len(big))]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _upload(channel, headers, big)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = _openai_error(refused)
    assert error["code"] == "storage_quota_exceeded" and error["type"] == "rate_limit_error"
    assert "TOKENMESH_OPENAI_STORAGE_BYTES_PER_OWNER" in error["message"], error
    # A retry soon is refused again: OpenAI's SDKs are told not to send 8 MiB twice more.
    assert ("x-should-retry", "false") in tuple(refused.value.trailing_metadata() or ())

    request = batch_pb.DeleteFileRequest(file_id=kept[0]["id"])
    await _stub(channel).DeleteFile(request, metadata=headers)
    assert (await _upload(channel, headers, big))["bytes"] == len(big)
    # Another tenant's room is its own.
    _, other = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    assert (await _upload(channel, other, big))["bytes"] == len(big)


async def test_an_owner_keeps_at_most_its_count_of_files(small):
    _, channel = small
    _, headers = _owner()
    data = _jsonl([_line(0)])
    for _ in range(FILES_PER_OWNER):
        await _upload(channel, headers, data)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _upload(channel, headers, data)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "TOKENMESH_OPENAI_FILES_PER_OWNER" in _openai_error(refused)["message"]


async def test_uploads_at_once_cannot_both_take_the_last_room(small):
    """The check and the write are one step: uploads sent together for the room of one
    are one kept and the others refused (a check then a write let them all pass)."""
    service, channel = small
    owner, headers = _owner()
    big = _padded(FILE_MAX_BYTES)
    await _upload(channel, headers, big)  # one file's room is left
    tries = await asyncio.gather(
        *(_upload(channel, headers, big) for _ in range(4)), return_exceptions=True
    )
    kept = [t for t in tries if isinstance(t, dict)]
    refused = [t for t in tries if isinstance(t, grpc.aio.AioRpcError)]
    assert len(kept) == 1 and len(refused) == 3, tries
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    stored = [
        name
        async for name in service.redis.scan_iter(match=b"tm:jobs:file:*")
        if await service.redis.hget(name, "owner") == owner.lane.encode()
    ]
    assert len(stored) == 2


async def test_a_batch_record_is_charged_until_it_goes(small):
    """Each batch copied its lines' custom_ids into its record, kept for the retention
    after it ended: one upload made into batch after batch (each cancelled at once,
    nothing billed) stored its custom_ids again each time, without bound."""
    service, channel = small
    owner, headers = _owner()
    custom_id = "c" * (MAX_CUSTOM_ID - 3)
    lines = [_line(n, custom_id=f"{n:03d}{custom_id}") for n in range(40)]
    upload = await _upload(channel, headers, _jsonl(lines))
    made: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        for _ in range(10):
            batch = await _create_batch(channel, headers, upload["id"])
            request = batch_pb.CancelBatchRequest(batch_id=batch["id"])
            await _stub(channel).CancelBatch(request, metadata=headers)
            made.append(batch["id"])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(made) == 1, made  # a record is ~22 KiB, the upload ~25 KiB, of 64 KiB
    assert "this batch needs" in _openai_error(refused)["message"]
    # Cancelled, it is charged until its record goes (the retention after it ended,
    # not its window's end), and then no more.
    key = openai_batches.batch_key(made[0])
    charged_until = await service.redis.zscore(f"tm:jobs:stored:{owner.lane}", key)
    retention_ms = service.store.retention_s * 1000
    assert charged_until is not None
    assert charged_until <= jobstore.now_ms() + retention_ms
    await service.redis.delete(key)  # what its retention does
    assert (await _create_batch(channel, headers, upload["id"]))["id"] not in made


async def test_a_batchs_requests_are_charged_until_its_job_ends(small):
    """Each batch copies its input's request bodies into its job's items, kept until the
    job ends (its 24 h window while its items wait: a spent budget, workers away), and
    they were not charged: one 32 KiB upload made 20 batches holding 640 KiB of items
    against a 64 KiB quota."""
    service, channel = small
    owner, headers = _owner()
    big = "x" * (FILE_MAX_BYTES // 4)
    upload = await _upload(channel, headers, _jsonl([_line(0, input=big)]))
    made: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        for _ in range(20):
            made.append((await _create_batch(channel, headers, upload["id"]))["id"])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= len(made) <= 6, made  # ~8 KiB of upload, ~9 KiB a batch, of 64 KiB
    held = 0
    for batch_id in made:
        items = jobstore.items_key(openai_batches.job_id_of(batch_id))
        held += int(await service.redis.memory_usage(items) or 0)
        assert await service.redis.zscore(f"tm:jobs:stored:{owner.lane}", items) is not None
    assert held <= QUOTA_BYTES
    # A job that ended deleted its items: their charge goes, and a batch fits again.
    for batch_id in made:
        await service.redis.delete(jobstore.items_key(openai_batches.job_id_of(batch_id)))
    assert (await _create_batch(channel, headers, upload["id"]))["id"] not in made


def _job_request(text_bytes: int, **fields: Any) -> jobs_service_pb2.CreateJobRequest:
    """A job of embed items whose inputs are `text_bytes` long together (its model: no
    worker serves it)."""
    inputs = ["x" * min(10_000, text_bytes - n) for n in range(0, text_bytes, 10_000)]
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=inputs))
    return jobs_service_pb2.CreateJobRequest(items=[item], **fields)


async def test_a_jobs_items_are_charged_until_it_ends(small):
    """POST /v1/jobs kept each job's items until it ended (its window: up to 7 days
    while they wait on a spent budget or an absent model) and charged them to no
    quota: one key's jobs filled the AOF Redis every service shares."""
    service, channel = small
    owner, headers = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    made: list[str] = []
    for _ in range(20):
        try:
            made.append((await stub.CreateJob(_job_request(12_000), metadata=headers)).id)
        except grpc.aio.AioRpcError:
            break
    assert 3 <= len(made) <= 5, made  # ~12 KiB a job, of 64 KiB
    refusal = stub.CreateJob(_job_request(12_000), metadata=headers)
    assert await failed_call_reason(refusal) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "STORAGE_QUOTA_EXCEEDED",
    )
    assert "unfinished jobs" in (await refusal.details() or "")
    ledger = f"tm:jobs:stored:{owner.lane}"
    for job_id in made:
        assert await service.redis.zscore(ledger, jobstore.items_key(job_id)) is not None
    # Uploads share the room: the tenant's next upload is refused too.
    with pytest.raises(grpc.aio.AioRpcError) as upload_refused:
        await _upload(channel, headers, _padded(FILE_MAX_BYTES))
    assert upload_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A job that ended deleted its items: their charge goes, and a job fits again.
    await service.redis.delete(jobstore.items_key(made[0]))
    assert (await stub.CreateJob(_job_request(12_000), metadata=headers)).id not in made
    # Another tenant's room is its own.
    _, other = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    assert (await stub.CreateJob(_job_request(12_000), metadata=other)).id


def _embed_result(index: int, floats: int) -> jobs_pb2.JobResult:
    values = [(index + n / floats) / 3 for n in range(floats)]
    response = v2.EmbedResponse(embeddings=[inference_pb2.Embedding(index=0, values=values)])
    return jobs_pb2.JobResult(index=index, embed=response)


async def test_a_jobs_results_are_charged_and_a_job_past_the_quota_stops(small):
    """A job's results were charged to no quota and kept the retention (7 days): one
    job of 10,000 embed items of 256 inputs each kept ~4 GB in the AOF Redis, from
    a 30 KB request. They are charged as they are stored; the result that passes
    the owner's quota is kept, and its job stops (no more of its items run)."""
    service, channel = small
    owner, headers = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=["x"]))
    job = await stub.CreateJob(
        jobs_service_pb2.CreateJobRequest(items=[item] * 8), metadata=headers
    )
    sizes = openai_files.ledger_sizes_key(owner.lane)
    stream = jobstore.work_stream(owner.lane)
    stored = []
    for index in range(8):  # ~20 KB a result, of a 64 KiB quota
        result = _embed_result(index, 5_000)
        if not await service.store.finish_item(job.id, index, result, (1, 0, 0), stream, "0-0"):
            break
        stored.append(result.ByteSize())
        charged = await service.redis.hget(sizes, jobstore.results_key(job.id))
        assert int(charged or 0) == sum(stored)
    assert 3 <= len(stored) <= 4, stored  # the one that passed the quota is kept
    done = await stub.GetJob(jobs_service_pb2.GetJobRequest(id=job.id), metadata=headers)
    assert done.status == "CANCELLED", done
    assert done.counts.succeeded == len(stored)
    page = await stub.ListJobResults(
        jobs_service_pb2.ListJobResultsRequest(id=job.id), metadata=headers
    )
    never_ran = [r.error for r in page.results if r.HasField("error")]
    assert never_ran and all(e.reason == jobstore.STORAGE_QUOTA for e in never_ran), never_ran
    # The owner's room is spent: its next upload is refused.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _upload(channel, headers, _padded(1024))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_charges_of_what_went_do_not_stop_a_job(small):
    """Stopped on the ledger's word alone, a job was cut for charges of what had gone:
    cancelled jobs' items (deleted, charged until their deadline), expired results."""
    service, channel = small
    owner, headers = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    cancelled = [
        (await stub.CreateJob(_job_request(12_000), metadata=headers)).id for _ in range(3)
    ]
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=["x"]))
    job = await stub.CreateJob(
        jobs_service_pb2.CreateJobRequest(items=[item] * 8), metadata=headers
    )
    for job_id in cancelled:  # ~36 KiB of items gone, still charged
        await stub.CancelJob(jobs_service_pb2.CancelJobRequest(id=job_id), metadata=headers)
    stream = jobstore.work_stream(owner.lane)
    for index in range(4):  # ~40 KB of results: past 64 KiB only with the stale charges
        result = _embed_result(index, 2_500)
        assert await service.store.finish_item(job.id, index, result, (1, 0, 0), stream, "0-0")
    running = await stub.GetJob(jobs_service_pb2.GetJobRequest(id=job.id), metadata=headers)
    assert running.status != "CANCELLED", running
    # Results are charged until the latest they may go (the deadline, a stop's grace,
    # the retention); a settle lowers that to when their key really expires.
    results = jobstore.results_key(job.id)
    await service.redis.pexpire(results, 3_600_000)
    await service.ledger.settle(owner.lane)
    until = await service.redis.zscore(jobstore.ledger_key(owner.lane), results)
    assert until is not None and until <= jobstore.now_ms() + 3_600_000


async def test_a_job_replayed_under_its_key_near_the_quota_answers_its_job(small):
    _, channel = small
    owner, headers = _owner()
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    keyed = _job_request(40_000, idempotency_key="nightly-3")
    first = await stub.CreateJob(keyed, metadata=headers)
    assert (await stub.CreateJob(keyed, metadata=headers)).id == first.id
    # A refused or replayed creation holds no room beyond the job's own.
    ledger = f"tm:jobs:stored:{owner.lane}:bytes"
    kept = int(await small[0].redis.hget(ledger, "total:bytes") or 0)
    assert 40_000 <= kept <= 40_100, kept


async def test_a_custom_id_is_at_most_512_characters(jobs):
    _, channel = jobs
    _, headers = _owner()
    longest = "i" * MAX_CUSTOM_ID
    upload = await _upload(channel, headers, _jsonl([_line(0, custom_id=longest)]))
    assert (await _create_batch(channel, headers, upload["id"]))["id"]
    upload = await _upload(channel, headers, _jsonl([_line(0, custom_id=longest + "i")]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create_batch(channel, headers, upload["id"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = _openai_error(refused)
    assert error["param"] == "line 1.custom_id" and "at most 512" in error["message"], error


async def test_a_batch_record_over_its_bound_is_refused(jobs):
    """Lines whose custom_ids take more than MAX_RECORD_BYTES to keep are refused
    (every result-file download reads them)."""
    _, channel = jobs
    _, headers = _owner()
    custom_id = "c" * 500
    count = MAX_RECORD_BYTES // len(custom_id) + 1
    lines = [_line(n, custom_id=f"{n:05d}{custom_id}") for n in range(count)]
    upload = await _upload(channel, headers, _jsonl(lines))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create_batch(channel, headers, upload["id"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = _openai_error(refused)
    assert error["param"] == "input_file_id" and "custom_ids" in error["message"], error


async def test_an_embeddings_line_is_refused_naming_openais_parameter(jobs):
    """An empty input was refused naming `line 1.body.inputs[0]` (v2's field), a
    parameter the client never sent; /openai/v1/embeddings names `input[0]`."""
    _, channel = jobs
    _, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0, input="")]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create_batch(channel, headers, upload["id"])
    error = _openai_error(refused)
    assert error["param"] == "line 1.body.input[0]", error
    assert "inputs" not in error["message"], error


# -- created once ----------------------------------------------------------------


async def test_a_dropped_reply_to_the_creating_transaction_makes_one_batch(proxy):
    """The connection dropped after the creating transaction reached Redis: CreateBatch
    answered 503 for a batch that runs, and OpenAI's SDK retried (twice, by default,
    with no idempotency key), running and billing it again."""
    dropping, url = proxy
    async with _jobs_service(url) as (service, channel):
        owner, headers = _owner()
        upload = await _upload(channel, headers, _jsonl([_line(0)]))
        dropping.armed = True
        batch = await _create_batch(channel, headers, upload["id"])
        assert dropping.dropped.is_set()
        assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 1
        assert await _owner_batches(service, owner) == [batch["id"]]
        stream = jobstore.work_stream(owner.lane)
        assert await service.redis.xlen(stream) == 1


async def test_a_client_retry_after_an_error_answers_the_batch_created(proxy):
    """Redis went away after the creating transaction reached it: the creation failed
    (503), and the SDK's retry a moment later made a second batch."""
    dropping, url = proxy
    async with _jobs_service(url) as (service, channel):
        owner, headers = _owner()
        upload = await _upload(channel, headers, _jsonl([_line(0)]))
        dropping.armed = dropping.then_down = True
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _create_batch(channel, headers, upload["id"])
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        dropping.down = False

        retry = (*headers, ("x-stainless-retry-count", "1"))  # what the SDK sends
        batch = await _create_batch(channel, retry, upload["id"])
        assert await _owner_batches(service, owner) == [batch["id"]]
        assert await service.redis.xlen(jobstore.work_stream(owner.lane)) == 1
        # A first try (no retry count) of the same request is a new batch.
        again = await _create_batch(channel, headers, upload["id"])
        assert again["id"] != batch["id"]
        assert sorted(await _owner_batches(service, owner)) == sorted([batch["id"], again["id"]])


async def test_an_idempotency_key_answers_its_batch(jobs):
    service, channel = jobs
    owner, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0)]))
    keyed = (*headers, ("idempotency-key", "nightly-2024-01-01"))
    first = await _create_batch(channel, keyed, upload["id"])
    assert (await _create_batch(channel, keyed, upload["id"]))["id"] == first["id"]
    assert await _owner_batches(service, owner) == [first["id"]]


async def test_an_idempotency_key_reused_for_another_batch_is_refused(jobs):
    # It answered the first batch: a nightly key reused for a new file ran nothing,
    # and its caller downloaded the old file's results as the new batch's.
    service, channel = jobs
    owner, headers = _owner()
    old = await _upload(channel, headers, _jsonl([_line(0)]))
    new = await _upload(channel, headers, _jsonl([_line(0), _line(1)]))
    keyed = (*headers, ("idempotency-key", "nightly"))
    first = await _create_batch(channel, keyed, old["id"])
    for other in (_batch_body(new["id"]), _batch_body(old["id"], metadata={"run": "2"})):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _stub(channel).CreateBatch(other, metadata=keyed)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = _openai_error(refused)
        assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_reused")
    assert await _owner_batches(service, owner) == [first["id"]]


async def test_a_malformed_idempotency_key_names_the_header_as_the_docs_spell_it(jobs):
    # One refusal said `idempotency-key`, the other `Idempotency-Key`.
    _, channel = jobs
    _, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0)]))
    keyed = (*headers, ("idempotency-key", "a b/c"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _stub(channel).CreateBatch(_batch_body(upload["id"]), metadata=keyed)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _openai_error(refused)["param"] == "Idempotency-Key"


async def test_a_replay_under_its_key_near_the_quota_answers_its_batch(small):
    # The replay reserved the new batch's room (its requests: about its file's size)
    # before it found the batch its key made: refused 429 for a batch that exists.
    _, channel = small
    _, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0, input=["x" * 14000] * 2)]))
    keyed = (*headers, ("idempotency-key", "nightly-1"))
    first = await _create_batch(channel, keyed, upload["id"])
    assert (await _create_batch(channel, keyed, upload["id"]))["id"] == first["id"]


async def test_a_request_refused_for_a_reused_key_holds_no_room(small):
    # It kept its reservation (its file's size) for a minute: a client looping on a
    # reused key filled its own quota.
    service, channel = small
    owner, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0, input=["x" * 10000] * 2)]))
    keyed = (*headers, ("idempotency-key", "nightly-2"))
    await _create_batch(channel, keyed, upload["id"])
    ledger = f"tm:jobs:stored:{owner.lane}:bytes"
    before = int(await service.redis.hget(ledger, "total:bytes") or 0)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _stub(channel).CreateBatch(
                _batch_body(upload["id"], metadata={"run": "2"}), metadata=keyed
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert int(await service.redis.hget(ledger, "total:bytes") or 0) == before


@pytest.mark.parametrize("metadata", [[], "", 0, False])
async def test_metadata_must_be_an_object(jobs, metadata):
    # Falsy values read as none: the batch was made, its metadata null.
    _, channel = jobs
    _, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0)]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _stub(channel).CreateBatch(
            _batch_body(upload["id"], metadata=metadata), metadata=headers
        )
    assert _openai_error(refused)["param"] == "metadata"


async def test_a_line_needing_a_scope_the_key_lacks_is_named_by_its_line(jobs):
    # It named `items[0]`, which a batch's client never sent.
    _, channel = jobs
    _, headers = _owner()
    upload = await _upload(channel, headers, _jsonl([_line(0), _line(1)]))
    narrow = tuple((k, "jobs") if k == contract.SCOPES_HEADER else (k, v) for k, v in headers)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _stub(channel).CreateBatch(_batch_body(upload["id"]), metadata=narrow)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    message = _openai_error(refused)["message"]
    assert message.startswith("line 1 (/v1/embeddings) needs the scope 'inference:embed'")


def test_openai_python_counts_its_retries_in_a_header():
    """The header the retry hold trusts is what openai-python sends on each try."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-stainless-retry-count", ""))
        if len(seen) == 1:
            return httpx.Response(503, headers={"retry-after-ms": "1"}, json={"error": {}})
        return httpx.Response(200, json={"id": "batch_x", "object": "batch"})

    client = openai.OpenAI(
        api_key="k",
        base_url="http://edge/openai/v1",
        max_retries=2,
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )
    with contextlib.suppress(Exception):  # the answer is no whole batch object
        client.batches.create(
            input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h"
        )
    assert seen[:2] == ["0", "1"]


# -- result files ----------------------------------------------------------------

INPUTS, DIMS = 64, 384


def _embedding_result(index: int) -> jobs_pb2.JobResult:
    values = [(index + n / DIMS) / 3 for n in range(DIMS)]  # long decimals, like real ones
    embeddings = [inference_pb2.Embedding(index=i, values=values) for i in range(INPUTS)]
    return jobs_pb2.JobResult(index=index, embed=v2.EmbedResponse(embeddings=embeddings))


async def _finished_batch(
    service: JobsService,
    channel: grpc.aio.Channel,
    headers: Headers,
    owner: Owner,
    lines: list[dict[str, Any]],
    results: list[jobs_pb2.JobResult],
) -> dict[str, Any]:
    upload = await _upload(channel, headers, _jsonl(lines))
    batch = await _create_batch(channel, headers, upload["id"])
    job_id = openai_batches.job_id_of(batch["id"])
    stream = jobstore.work_stream(owner.lane)
    for result in results:
        # Entry "0-0": nothing to acknowledge (no runner took these items: no worker).
        await service.store.finish_item(job_id, result.index, result, (1, 0, 0), stream, "0-0")
    request = batch_pb.GetBatchRequest(batch_id=batch["id"])
    done: dict[str, Any] = json.loads(
        (await _stub(channel).GetBatch(request, metadata=headers)).data
    )
    assert done["status"] == "completed", done
    return done


async def _messages(
    channel: grpc.aio.Channel, headers: Headers, file_id: str
) -> AsyncIterator[bytes]:
    request = batch_pb.GetFileContentRequest(file_id=file_id)
    call: Any = _stub(channel).GetFileContent(request, metadata=headers)
    async for message in call:
        yield message.data


async def _content(channel: grpc.aio.Channel, headers: Headers, file_id: str) -> bytes:
    return b"".join([data async for data in _messages(channel, headers, file_id)])


async def _download_size(channel: grpc.aio.Channel, headers: Headers, file_id: str) -> int:
    return sum([len(data) async for data in _messages(channel, headers, file_id)])


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


async def test_a_download_holds_a_read_of_results_not_a_hundred(own_redis, traced):
    """A download read 100 results at a time whatever their size, and wrote them all
    before sending any: embeddings of 256 inputs a line held 230-608 MiB a download."""
    async with _jobs_service(own_redis) as (service, channel):
        owner, headers = _owner()
        count = 60
        done = await _finished_batch(
            service,
            channel,
            headers,
            owner,
            [_line(n) for n in range(count)],
            [_embedding_result(n) for n in range(count)],
        )
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        size = await _download_size(channel, headers, done["output_file_id"])
        peak = tracemalloc.get_traced_memory()[1] - baseline
    assert size > 24 * 1024 * 1024  # ~0.43 MB a line
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"


async def test_the_error_file_writes_only_its_own_lines(jobs, monkeypatch):
    """The error file wrote every output line and kept the few errors: a one-line error
    file of a large batch cost as much as its output file, on every download."""
    service, channel = jobs
    owner, headers = _owner()
    failed = jobs_pb2.JobResult(
        index=3, error=jobs_pb2.JobError(code="INVALID_ARGUMENT", grpc_code=3, message="no")
    )
    results = [jobs_pb2.JobResult(index=n, embed=v2.EmbedResponse()) for n in range(3)]
    done = await _finished_batch(
        service, channel, headers, owner, [_line(n) for n in range(4)], [*results, failed]
    )
    written: list[int] = []
    output_line = openai_batches.output_line

    def counting(batch: Any, result: jobs_pb2.JobResult, created: int) -> Any:
        written.append(result.index)
        return output_line(batch, result, created)

    monkeypatch.setattr(openai_batches, "output_line", counting)
    for _ in range(2):
        content = await _content(channel, headers, done["error_file_id"])
        assert [json.loads(line)["custom_id"] for line in content.splitlines()] == ["r3"]
    request = batch_pb.GetFileRequest(file_id=done["error_file_id"])
    described = json.loads((await _stub(channel).GetFile(request, metadata=headers)).data)
    assert described["bytes"] == len(content)
    assert written == [3, 3, 3]


async def test_a_result_that_renders_as_an_error_is_counted_failed(jobs):
    """A result that renders as an error line (an embedding of another size than the
    line asked for, from a worker that ignored `dimensions`) was counted completed and
    the error file not named: the line was in neither file."""
    service, channel = jobs
    owner, headers = _owner()
    lines = [_line(0), _line(1, dimensions=512)]
    sized = v2.EmbedResponse(embeddings=[inference_pb2.Embedding(index=0, values=[0.5] * 384)])
    results = [jobs_pb2.JobResult(index=n, embed=sized) for n in range(2)]
    done = await _finished_batch(service, channel, headers, owner, lines, results)
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert done["output_file_id"] and done["error_file_id"], done

    async def custom_ids(file_id: str) -> list[str]:
        data = await _content(channel, headers, file_id)
        return [json.loads(line)["custom_id"] for line in data.splitlines()]

    assert await custom_ids(done["output_file_id"]) == ["r0"]
    assert await custom_ids(done["error_file_id"]) == ["r1"]
    listed = await _stub(channel).ListBatches(batch_pb.ListBatchesRequest(), metadata=headers)
    assert json.loads(listed.data)["data"][0]["request_counts"] == done["request_counts"]


async def _listed(channel: grpc.aio.Channel, headers: Headers, **fields: Any) -> dict[str, Any]:
    request = batch_pb.ListFilesRequest(**fields)
    page: dict[str, Any] = json.loads(
        (await _stub(channel).ListFiles(request, metadata=headers)).data
    )
    return page


async def test_an_owners_uploads_are_listed_as_openais(jobs, monkeypatch):
    """GET /files (`client.files.list()`) was not served: 404 to every OpenAI SDK's
    cleanup script."""
    service, channel = jobs
    _, headers = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    clock = iter(range(1_800_000_000_000, 1_900_000_000_000, 1000))
    monkeypatch.setattr(openai_files, "now_ms", lambda: next(clock))  # distinct creation times
    ids = [(await _upload(channel, headers, _jsonl([_line(n)])))["id"] for n in range(3)]
    monkeypatch.undo()
    page = await _listed(channel, headers)
    assert [f["id"] for f in page["data"]] == ids[::-1]  # newest first
    assert page["data"][0] == json.loads(
        (
            await _stub(channel).GetFile(batch_pb.GetFileRequest(file_id=ids[2]), metadata=headers)
        ).data
    )
    assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == (
        "list",
        ids[2],
        ids[0],
        False,
    )
    first = await _listed(channel, headers, limit=2, order="asc")
    assert ([f["id"] for f in first["data"]], first["has_more"]) == (ids[:2], True)
    rest = await _listed(channel, headers, limit=2, order="asc", after=first["last_id"])
    assert ([f["id"] for f in rest["data"]], rest["has_more"]) == (ids[2:], False)
    assert [f["id"] for f in (await _listed(channel, headers, purpose="batch"))["data"]] == ids[
        ::-1
    ]
    # A deleted upload is not listed; another tenant lists its own (none).
    await _stub(channel).DeleteFile(batch_pb.DeleteFileRequest(file_id=ids[1]), metadata=headers)
    assert [f["id"] for f in (await _listed(channel, headers))["data"]] == [ids[2], ids[0]]
    _, stranger = _owner(tenant=f"t-{uuid.uuid4().hex[:6]}")
    assert (await _listed(channel, stranger))["data"] == []
    for fields, param in (
        ({"purpose": "batch_output"}, "purpose"),
        ({"order": "newest"}, "order"),
        ({"limit": 10_001}, "limit"),
        ({"after": ids[1]}, "after"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _listed(channel, headers, **fields)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _openai_error(refused)["param"] == param


async def test_a_batchs_result_files_can_be_deleted_as_openais(jobs):
    """DELETE of a batch's output or error file was refused 400 ("they go with it"):
    OpenAI deletes them, and cleanup scripts written for it stopped there."""
    service, channel = jobs
    owner, headers = _owner()
    failed = jobs_pb2.JobResult(
        index=1, error=jobs_pb2.JobError(code="INVALID_ARGUMENT", grpc_code=3, message="no")
    )
    results = [jobs_pb2.JobResult(index=0, embed=v2.EmbedResponse()), failed]
    done = await _finished_batch(
        service, channel, headers, owner, [_line(n) for n in range(2)], results
    )
    stub = _stub(channel)
    _, stranger = _owner()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DeleteFile(
            batch_pb.DeleteFileRequest(file_id=done["error_file_id"]), metadata=stranger
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    request = batch_pb.DeleteFileRequest(file_id=done["error_file_id"])
    deleted = json.loads((await stub.DeleteFile(request, metadata=headers)).data)
    assert deleted == {"id": done["error_file_id"], "object": "file", "deleted": True}
    for call in (
        stub.GetFile(batch_pb.GetFileRequest(file_id=done["error_file_id"]), metadata=headers),
        _content(channel, headers, done["error_file_id"]),
        stub.DeleteFile(request, metadata=headers),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await call
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # The output file is another file: still there until it is deleted too.
    output = await _content(channel, headers, done["output_file_id"])
    assert [json.loads(line)["custom_id"] for line in output.splitlines()] == ["r0"]
    request = batch_pb.DeleteFileRequest(file_id=done["output_file_id"])
    assert json.loads((await stub.DeleteFile(request, metadata=headers)).data)["deleted"]
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await _content(channel, headers, done["output_file_id"])
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


# -- stopping ---------------------------------------------------------------------

SERVICES_DIR = str(Path(openai_servicer.__file__).resolve().parents[1])
HELD_S = 60.0  # a bound on a held computation, far past what the test needs


def _tasks_running_services_code() -> list[str]:
    """The tasks (but this one) that still run code of services/, by the coroutines
    each awaits: what outlived a service's stop."""
    found = []
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        while task is not asyncio.current_task() and (code := getattr(coro, "cr_code", None)):
            if code.co_filename.startswith(SERVICES_DIR):
                found.append(f"{task.get_name()}: {code.co_qualname}")
                break
            coro = coro.cr_await
    return found


async def _only_client(url: str) -> bool:
    """Whether the Redis at `url` has no connection but the one asking."""
    client = aioredis.from_url(url)
    try:
        mine = await client.client_id()
        return [int(c["id"]) for c in await client.client_list()] == [mine]
    finally:
        await client.aclose()


async def test_a_file_size_computed_for_a_call_that_went_away_ends_with_the_service(
    own_redis, monkeypatch
):
    """GetFile of an output file computes its size once, shielded from its callers. One
    whose call went away ran on past the service's stop: its next Redis command opened
    a connection on the closed pool, still open when the event loop ended (collected
    during a later test, it failed that test: the shape of two CI failures)."""
    computing, release = threading.Event(), threading.Event()
    result_lines = openai_batches.result_lines

    def held_lines(*args: Any) -> Any:  # on a thread: the size waits here
        computing.set()
        release.wait(HELD_S)
        return result_lines(*args)

    try:
        async with _jobs_service(own_redis) as (service, channel):
            owner, headers = _owner()
            done = await _finished_batch(
                service, channel, headers, owner, [_line(0)], [_embedding_result(0)]
            )
            monkeypatch.setattr(openai_batches, "result_lines", held_lines)
            request = batch_pb.GetFileRequest(file_id=done["output_file_id"])
            call = _stub(channel).GetFile(request, metadata=headers)
            assert await asyncio.to_thread(computing.wait, HELD_S)
            call.cancel()
        assert _tasks_running_services_code() == []
    finally:
        release.set()
    # Nothing of the stopped service reconnects: Redis sees it gone (a close that
    # Redis is still to notice is waited for).
    await _wait_until(lambda: _only_client(own_redis))
