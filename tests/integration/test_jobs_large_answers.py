"""Items whose answers are large: up to the servers' message cap they are results, and
past any size limit they fail at once instead of retrying until their job expires.

No model the tests run answers 4 MiB (all-minilm's largest answer is ~0.4 MB), so
the worker here is a stand-in over real gRPC with a worker's server options: it
answers Embed with an embedding of the size a test asks for. Everything on the jobs
side (the worker directory in Redis, the executor and its channel) is real.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.core.server import MAX_MESSAGE_BYTES, SERVER_OPTIONS
from services.jobs.execution import Backoff, ItemExecutor, Outcome
from services.jobs.workers import WorkerDirectory
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests.conftest import private_db_url
from tokenmesh.inference.v2 import inference_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

PRIVATE_DB = 15  # the session mesh's jobs service must not see this worker
MODEL = "large-answers"
# The bytes an answer's floats take: 4 each (a packed repeated float).
FLOAT_BYTES = 4


class _LargeAnswers(inference_service_pb2_grpc.InferenceServiceServicer):
    """Answers Embed with one embedding of `inputs[0]` bytes (a decimal count)."""

    async def Embed(
        self, request: v2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.EmbedResponse:
        values = [0.5] * (int(request.inputs[0]) // FLOAT_BYTES)
        embedding = inference_pb2.Embedding(index=0, values=values)
        return v2.EmbedResponse(embeddings=[embedding], request_id=request.request_id)


@pytest.fixture
async def executor(redis_url: str) -> AsyncIterator[ItemExecutor]:
    """An executor whose directory lists one worker of MODEL: the stand-in, which may
    send any size (a worker's own cap is tested apart from the client's limit)."""
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    options = [*SERVER_OPTIONS, ("grpc.max_send_message_length", -1)]
    server = grpc.aio.server(options=options)
    answers = _LargeAnswers()  # type: ignore[abstract]  # Embed is all these items call
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(answers, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    worker_id = f"large-{uuid.uuid4().hex[:6]}"
    entry = WorkerEntry(
        worker_id, "127.0.0.1", port, ((MODEL, "1"),), lease_expires_at=time.time() + 600
    )
    await client.hset(WORKERS_KEY, worker_id, entry.to_json())
    running = ItemExecutor(WorkerDirectory(client), None, Backoff(0.05, 0.2), call_timeout_s=30)
    try:
        yield running
    finally:
        await running.close()
        await server.stop(None)
        await client.hdel(WORKERS_KEY, worker_id)
        await client.aclose()


async def _run(executor: ItemExecutor, answer_bytes: int) -> Outcome:
    item = jobs_pb2.JobItem(embed=v2.EmbedRequest(model=MODEL, inputs=[str(answer_bytes)]))
    # Long enough for one call; an item that waits instead runs into it (DeadlinePassed).
    return await executor.run(item, 0, "job-large:0", {}, deadline_s=time.time() + 5)


async def test_an_answer_over_4_mib_is_the_items_result(executor):
    """The worker may send up to 16 MiB; the jobs service's channel took 4 MiB (gRPC's
    default) and the item retried, refused each time, until its job expired."""
    outcome = await _run(executor, 6 * 1024 * 1024)
    assert outcome.result.WhichOneof("outcome") == "embed"
    assert len(outcome.result.embed.embeddings[0].values) == 6 * 1024 * 1024 // FLOAT_BYTES


async def test_an_answer_past_the_size_limit_fails_the_item_at_once(executor):
    """gRPC's own RESOURCE_EXHAUSTED (no RetryInfo, no ErrorInfo: a size limit) is the
    item's result; it was taken for backpressure and waited out the job's deadline."""
    started = time.monotonic()
    outcome = await _run(executor, MAX_MESSAGE_BYTES + 1024 * 1024)
    assert outcome.result.error.code == "RESOURCE_EXHAUSTED"
    assert time.monotonic() - started < 4  # one call, no waiting for the deadline
