"""`Prefer: wait=N` on a handed-over Complete: an item that ends while the wait polls
is answered inline. The wait read the item's result, then its job's status: an item
that ended between the two reads showed no result and a final status, and the caller
got a 202 for a job that had just answered (CI: `wait=10; respond-async` answered 202
at once). Real Redis; the item's end is made to land right after the first read of
the results hash, whichever way the wait reads it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from services.core import contract
from services.core.redis_service import text
from services.jobs import store as jobstore
from services.jobs.handover import HandoverServicer
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2


@pytest.fixture
async def job(redis_url: str) -> Any:
    client = aioredis.from_url(redis_url)
    store = jobstore.JobStore(client, 3600)
    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = jobstore.Owner(key, "", {contract.KEY_ID_HEADER: key})
    stream = jobstore.work_stream(owner.lane)
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    job_id, _ = await store.create(
        jobstore.NewJob(owner, [item], "", {}, "", jobstore.now_ms() + 600_000)
    )
    reply: Any = await client.xreadgroup(jobstore.GROUP, "a", {stream: ">"}, count=1)
    entry_id = text(reply[0][1][0][0])
    try:
        yield store, job_id, stream, entry_id
    finally:
        await client.delete(stream, jobstore.owner_key(key))
        await client.srem(jobstore.LANES_KEY, owner.lane)
        await client.aclose()


async def test_an_item_that_ends_while_the_wait_reads_is_answered_inline(job, monkeypatch):
    store, job_id, stream, entry_id = job
    answer = jobs_pb2.JobResult(index=0, complete=v2.CompleteResponse(request_id="r-1"))
    ended: list[bool] = []

    async def end_the_item() -> None:
        if not ended:
            ended.append(True)
            assert await store.finish_item(job_id, 0, answer, (1, 1, 0), stream, entry_id, "a")

    hmget, execute = aioredis.Redis.hmget, Pipeline.execute

    async def hmget_then_end(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        replies = await hmget(self, name, *args, **kwargs)
        if name == jobstore.results_key(job_id):
            await end_the_item()
        return replies

    async def execute_then_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        reads = any(jobstore.results_key(job_id) in map(str, c[0]) for c in self.command_stack)
        replies = await execute(self, *args, **kwargs)  # it empties its command stack
        if reads:
            await end_the_item()
        return replies

    monkeypatch.setattr(aioredis.Redis, "hmget", hmget_then_end)
    monkeypatch.setattr(Pipeline, "execute", execute_then_end)
    servicer = HandoverServicer(jobs=None, store=store)
    result = await servicer._result_within(job_id, 5.0)
    assert ended and result is not None and result.complete.request_id == "r-1"
