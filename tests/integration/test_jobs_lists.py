"""Listing jobs and OpenAI batches page by page over real gRPC (mTLS, as the edge calls)
and a real Redis, while what was listed expires: a cursor naming an object that is
gone goes on from its place, or is refused (never a restart from the first page);
and a batch lives exactly as long as its job, its owner's index no longer."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody

from services.core import contract, identity
from services.core.redis_service import text
from services.core.server import serving
from services.jobs import openai_batches
from services.jobs import store as jobstore
from services.jobs.openai_files import FileStore, Upload
from services.jobs.service import JobsService, JobsSettings
from services.jobs.store import NewJob, Owner, now_ms
from services.jobs.validation import MAX_WINDOW_S
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import catalogue
from tests.rpc_errors import violated_fields
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2, jobs_service_pb2_grpc
from tokenmesh.jobs.v1 import jobs_service_pb2 as jobs_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2 as batch_pb
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

# A database of its own: no worker serves these items, and the session mesh's jobs
# service (database 0) must not take them.
PRIVATE_DB = 1
RETENTION_DAYS = 1.0
SAME_MS = 1_800_000_000_000
Headers = tuple[tuple[str, str], ...]


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[tuple[JobsService, grpc.aio.Channel]]:
    """The jobs service in this process, and a channel to it as the edge."""
    settings = JobsSettings(
        redis_url=private_db_url(redis_url, PRIVATE_DB),
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=1.0,
        consumer=f"lists-{uuid.uuid4().hex[:6]}",
        retention_days=RETENTION_DAYS,
    )
    await catalogue(settings.redis_url, "absent")  # no worker serves it: its items wait
    service = JobsService(settings)
    async with serving(service, settings) as server:
        target = f"127.0.0.1:{server.port}"
        async with identity.secure_channel(
            target, mtls.files(contract.EDGE), contract.JOBS
        ) as channel:
            yield service, channel


def _owner() -> tuple[Owner, Headers]:
    """A key of its own (a lane of its own) and the headers the edge sends for it."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    headers = {contract.KEY_ID_HEADER: key, contract.SCOPES_HEADER: contract.ADMIN_SCOPE}
    return Owner(key, "", headers), tuple(headers.items())


async def _expire_job(service: JobsService, owner: Owner, job_id: str) -> None:
    """What the job's retention does: its keys go (its batch's too), not its index member."""
    await service.redis.delete(jobstore.job_key(job_id), jobstore.items_key(job_id))
    await service.redis.delete(openai_batches.batch_key(openai_batches.batch_id_of(job_id)))


# -- ListJobs --------------------------------------------------------------


async def _jobs_in_one_millisecond(service: JobsService, owner: Owner, count: int) -> list[str]:
    """Creates `count` jobs, all listed as created in one millisecond; returns their ids
    in the list's order (one millisecond's jobs by id, descending)."""
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model="absent", inputs=["x"]))
    ids = []
    for _ in range(count):
        job_id, _ = await service.store.create(
            NewJob(owner, [item], "", {}, "", now_ms() + 600_000)
        )
        ids.append(job_id)
    await service.redis.zadd(jobstore.owner_key(owner.key_id), dict.fromkeys(ids, SAME_MS))
    return sorted(ids, reverse=True)


async def test_jobs_listed_while_each_listed_one_expires_are_each_listed_once(jobs):
    """A token names the last job listed ("<ms>:<id>"). Once that job was gone, the next
    page began before its millisecond: the same millisecond's later jobs were skipped."""
    service, channel = jobs
    owner, headers = _owner()
    expected = await _jobs_in_one_millisecond(service, owner, 4)
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    listed: list[str] = []
    token = ""
    while True:
        request = jobs_pb.ListJobsRequest(page_size=1, page_token=token)
        reply = await stub.ListJobs(request, metadata=headers)
        if not reply.jobs:
            break
        listed += [job.id for job in reply.jobs]
        await _expire_job(service, owner, reply.jobs[-1].id)  # gone before the next page
        await service.redis.zrem(jobstore.owner_key(owner.key_id), reply.jobs[-1].id)
        token = reply.next_page_token
    assert listed == expected


async def _pages(stub: jobs_service_pb2_grpc.JobsServiceAsyncStub, headers: Headers, size: int):
    """Every page a client reads, following next_page_token until it is empty."""
    pages: list[list[str]] = []
    token = ""
    while True:
        request = jobs_pb.ListJobsRequest(page_size=size, page_token=token)
        reply = await stub.ListJobs(request, metadata=headers)
        pages.append([job.id for job in reply.jobs])
        token = reply.next_page_token
        if not token:
            return pages


async def test_a_filtered_page_reads_a_bounded_number_of_jobs_and_goes_on_by_token(jobs):
    """A status filter few jobs match read every job of the key in one call (400 reads
    for an empty page of 1). A page reads at most max(10 x page_size, 100) jobs now:
    a short page, whose token goes on from the last job read, until the match."""
    service, channel = jobs
    owner, headers = _owner()
    ids = await _jobs_in_one_millisecond(service, owner, 250)
    await service.store.stop(ids[-1])  # the oldest: the one CANCELLED job
    # Stopped while this replica's runner held its item (waiting for a worker of
    # "absent"), it reads CANCELLING until the item is let go (CI saw it so once):
    # the listing, not the stop, is what this test is about.
    await service.redis.hset(jobstore.job_key(ids[-1]), "status", "CANCELLED")
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    pages, found, reads = 0, [], []
    token = ""
    read_job = service.store.get

    async def counted(job_id: str) -> Any:  # the job records a page reads (a spy)
        reads.append(job_id)
        return await read_job(job_id)

    service.store.get = counted
    while True:
        reads.clear()
        request = jobs_pb.ListJobsRequest(page_size=1, status="CANCELLED", page_token=token)
        reply = await stub.ListJobs(request, metadata=headers)
        assert len(reads) <= 102  # 100 jobs read (and the page's own reads)
        pages += 1
        found += [job.id for job in reply.jobs]
        token = reply.next_page_token
        if not token:
            break
    assert found == [ids[-1]] and pages == 3


@pytest.mark.parametrize("count", [2, 4])
async def test_the_last_page_of_jobs_has_no_token(jobs, count):
    """A list of a multiple of page_size jobs gave its last full page a token, and the
    client's next request answered an empty page (the proto says "empty on the last
    page")."""
    service, channel = jobs
    owner, headers = _owner()
    expected = await _jobs_in_one_millisecond(service, owner, count)
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    pages = await _pages(stub, headers, 2)
    assert pages == [expected[i : i + 2] for i in range(0, count, 2)]


async def test_a_page_followed_only_by_gone_jobs_has_no_token(jobs):
    """The jobs after a full page are all gone (expired, still in the key's list): no
    token, and the gone ones leave the list."""
    service, channel = jobs
    owner, headers = _owner()
    first, second, *gone = await _jobs_in_one_millisecond(service, owner, 4)
    for job_id in gone:
        await _expire_job(service, owner, job_id)
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    assert await _pages(stub, headers, 2) == [[first, second]]
    listed = await service.redis.zrange(jobstore.owner_key(owner.key_id), 0, -1)
    assert sorted(text(m) for m in listed) == sorted([first, second])


@pytest.mark.parametrize("token", [":job-0123", "abc", "12:" + "x" * 100, "-5:job-1"])
async def test_a_job_page_token_without_a_place_is_refused(jobs, token):
    """ ":<id>" read as "from the newest": a client paging on with it listed page 1 again."""
    service, channel = jobs
    owner, headers = _owner()
    await _jobs_in_one_millisecond(service, owner, 1)
    stub = jobs_service_pb2_grpc.JobsServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListJobs(jobs_pb.ListJobsRequest(page_token=token), metadata=headers)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(refused.value)[0] == "page_token"


# -- ListBatches -----------------------------------------------------------


async def _batches(service: JobsService, channel: grpc.aio.Channel, headers: Headers, count: int):
    """Creates `count` batches through the RPC; returns their ids, newest first."""
    owner = dict(headers)[contract.KEY_ID_HEADER]
    line = {
        "custom_id": "r0",
        "method": "POST",
        "url": openai_batches.EMBEDDINGS,
        "body": {"model": "absent", "input": "x"},
    }
    stored = await FileStore(service.redis, 3600).create(
        f"k.{owner}", Upload("batch", "in.jsonl", json.dumps(line).encode() + b"\n")
    )
    body = {
        "input_file_id": stored.file_id,
        "endpoint": openai_batches.EMBEDDINGS,
        "completion_window": "24h",
    }
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    ids = []
    for _ in range(count):
        request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
        ids.append(json.loads((await stub.CreateBatch(request, metadata=headers)).data)["id"])
    return ids[::-1]


async def _list_batches(channel: grpc.aio.Channel, headers: Headers, after: str, limit: int):
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    request = batch_pb.ListBatchesRequest(after=after, limit=limit)
    return json.loads((await stub.ListBatches(request, metadata=headers)).data)


def _ids(page: dict[str, object]) -> list[str]:
    data = page["data"]
    assert isinstance(data, list)
    return [batch["id"] for batch in data]


async def test_batches_listed_after_one_that_is_no_batch_of_the_list_is_refused(jobs):
    """An unknown `after` started again from the newest batch: a client paging through
    read the same batches again, and an SDK iterating stopped at nothing."""
    service, channel = jobs
    owner, headers = _owner()
    await _batches(service, channel, headers, 2)
    _, other_headers = _owner()
    (others,) = await _batches(service, channel, other_headers, 1)
    for after in ("batch_0123456789abcdef01234567", "garbage", others):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list_batches(channel, headers, after, 20)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailers = dict(refused.value.trailing_metadata() or ())
        error = json.loads(trailers[contract.OPENAI_ERROR_HEADER])
        assert error["error"]["param"] == "after"


async def test_a_page_of_batches_skips_those_gone_and_fills_from_older_ones(jobs):
    """A page of expired batches came back empty with has_more and no last_id: nothing
    to go on from."""
    service, channel = jobs
    owner, headers = _owner()
    newest, middle, oldest = await _batches(service, channel, headers, 3)
    for gone in (newest, middle):
        await _expire_job(service, owner, openai_batches.job_id_of(gone))
    page = await _list_batches(channel, headers, "", 1)
    assert (_ids(page), page["has_more"], page["last_id"]) == ([oldest], False, oldest)
    index = openai_batches.owner_batches_key(owner.lane)
    assert [text(m) for m in await service.redis.zrange(index, 0, -1)] == [oldest]


async def test_a_full_page_of_batches_is_the_last_when_only_gone_ones_follow(jobs):
    """has_more said whether the owner's index had another member, gone or not: a page
    followed only by expired batches had has_more, and the next page was empty."""
    service, channel = jobs
    owner, headers = _owner()
    newest, middle, oldest = await _batches(service, channel, headers, 3)
    page = await _list_batches(channel, headers, "", 3)
    assert (_ids(page), page["has_more"]) == ([newest, middle, oldest], False)
    await _expire_job(service, owner, openai_batches.job_id_of(oldest))
    page = await _list_batches(channel, headers, "", 2)
    assert (_ids(page), page["has_more"], page["last_id"]) == ([newest, middle], False, middle)


async def test_batches_after_one_no_longer_listed_go_on_from_its_place(jobs):
    service, channel = jobs
    owner, headers = _owner()
    newest, middle, oldest = await _batches(service, channel, headers, 3)
    await service.redis.zrem(openai_batches.owner_batches_key(owner.lane), middle)
    page = await _list_batches(channel, headers, middle, 20)
    assert (_ids(page), page["has_more"]) == ([oldest], False)


# -- lifetimes ---------------------------------------------------------------


async def _batch_status(
    stub: openai_batch_service_pb2_grpc.OpenAIBatchServiceStub, headers: Headers, batch_id: str
) -> str:
    reply = await stub.GetBatch(batch_pb.GetBatchRequest(batch_id=batch_id), metadata=headers)
    return str(json.loads(reply.data)["status"])


async def _ttls(redis: aioredis.Redis, keys: Sequence[str]) -> list[int]:
    return [await redis.ttl(key) for key in keys]


async def test_a_batch_expires_with_its_job(jobs):
    """A batch record was kept its window and the retention from its creation, its job
    the retention from when it ended: a batch that ended early outlived its job by
    about a day (listed, read, then 404), and a cancelled one died first."""
    service, channel = jobs
    _, headers = _owner()
    (batch_id,) = await _batches(service, channel, headers, 1)
    stub = openai_batch_service_pb2_grpc.OpenAIBatchServiceStub(channel)
    request = batch_pb.CancelBatchRequest(batch_id=batch_id)
    await stub.CancelBatch(request, metadata=headers)
    # CANCELLING while a runner lets its item go (it waits for a worker), then CANCELLED.
    deadline = time.monotonic() + 10
    while await _batch_status(stub, headers, batch_id) != "cancelled":
        assert time.monotonic() < deadline, "the batch did not end cancelled"
        await asyncio.sleep(0.05)
    job_key = jobstore.job_key(openai_batches.job_id_of(batch_id))
    job_ttl, batch_ttl = await _ttls(service.redis, [job_key, openai_batches.batch_key(batch_id)])
    retention_s = int(RETENTION_DAYS * 86400)
    assert retention_s - 5 <= job_ttl <= retention_s
    assert abs(batch_ttl - job_ttl) <= 1


async def test_an_owners_batch_index_drops_what_no_batch_can_outlive_and_expires(jobs):
    """The index of an owner's batches kept every batch it ever made, and never expired."""
    service, channel = jobs
    owner, headers = _owner()
    index = openai_batches.owner_batches_key(owner.lane)
    lifetime_s = int(MAX_WINDOW_S) + jobstore.STOP_GRACE_S + int(RETENTION_DAYS * 86400)
    await service.redis.zadd(index, {"batch_long_gone": now_ms() - lifetime_s * 1000 - 1})
    (batch_id,) = await _batches(service, channel, headers, 1)
    assert [text(m) for m in await service.redis.zrange(index, 0, -1)] == [batch_id]
    assert lifetime_s - 5 <= await service.redis.ttl(index) <= lifetime_s
