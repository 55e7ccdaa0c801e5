"""A job item's answer that reached the jobs service before a cancel is kept.

The worker meters an answer once it has sent it. A cancel of the item's task
(its job stopping, its entry taken over) that landed after the answer arrived,
before the task next ran, used to throw the answer away: the item ran again
from the start, or its stopped job ended without a result its owner paid for.
The cancel here lands at the moment the call ends (the call's done callback,
which gRPC runs as the status arrives, before the awaiting task resumes), so
the window is hit every time. A real worker, registered in a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.pki import IdentityFiles
from services.core.server import serving
from services.inference.service import InferenceService
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.workers import Placement, WorkerDirectory
from services.router.catalog import CATALOG_KEY, ModelEntry, VersionEntry
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

MODEL = "deterministic-test"
EMBEDDER = "all-minilm-l6-v2"
OWNER = {contract.KEY_ID_HEADER: "k", contract.SCOPES_HEADER: "inference:generate inference:embed"}


class _Watched(ItemExecutor):
    """An executor that keeps its calls (to see them cut) and, with
    `cancel_as_answered`, cancels each call's caller task as the call ends (answered
    or not): the cancel lands between the answer's arrival and the caller's next
    step, as a job's stop can."""

    def __init__(self, client: aioredis.Redis, cancel_as_answered: bool) -> None:
        files = IdentityFiles.of(mtls.pki_dir(), contract.JOBS)
        super().__init__(WorkerDirectory(client), files, Backoff(0.05, 0.2), call_timeout_s=30)
        self.cancel_as_answered = cancel_as_answered
        self.calls: list[Any] = []

    def _stub(self, placement: Placement) -> Any:
        stub, watched = super()._stub(placement), self

        class Stub:
            def __getattr__(self, method: str) -> Any:
                def call(*args: Any, **kwargs: Any) -> Any:
                    caller = asyncio.current_task()
                    assert caller is not None
                    started = getattr(stub, method)(*args, **kwargs)
                    if watched.cancel_as_answered:
                        started.add_done_callback(lambda _call: caller.cancel())
                    watched.calls.append(started)
                    return started

                return call

        return Stub()


@contextlib.asynccontextmanager
async def _watched_worker(
    tmp_path: Path, own_redis: str, cancel_as_answered: bool, **overrides: Any
) -> AsyncIterator[_Watched]:
    """A `_Watched` executor and one worker (inference_settings with `overrides`),
    registered and its models catalogued in a Redis of their own."""
    client = aioredis.from_url(own_redis)
    settings = inference_settings(tmp_path, own_redis, **overrides)
    names = (m.partition(":") for m in (*settings.models, *settings.test_models))
    served = tuple((name, version) for name, _, version in names)
    watched = _Watched(client, cancel_as_answered)
    try:
        async with serving(InferenceService(settings), settings) as server:
            worker = WorkerEntry(
                "w0", "127.0.0.1", server.port, served, lease_expires_at=time.time() + 600
            )
            await client.hset(WORKERS_KEY, "w0", worker.to_json())
            for name, version in served:
                entry = ModelEntry(name, versions=(VersionEntry(version, 100),))
                await client.hset(CATALOG_KEY, name, entry.to_json())
            yield watched
    finally:
        await watched.close()
        await client.aclose()


@pytest.fixture
async def executor(tmp_path: Path, own_redis: str) -> AsyncIterator[ItemExecutor]:
    """An executor whose calls cancel their task as they end, and one worker."""
    models = {"models": (f"{EMBEDDER}:1",), "test_models": (f"{MODEL}:1",)}
    async with _watched_worker(tmp_path, own_redis, True, **models) as watched:
        yield watched


async def _run(executor: ItemExecutor, item: jobs_pb2.JobItem) -> asyncio.Task[Any]:
    """Runs `item` in a task of its own (as the runner does) and waits for it to end."""
    task = asyncio.create_task(
        executor.run(item, 0, f"job-{uuid.uuid4().hex}:0", OWNER, deadline_s=time.time() + 10)
    )
    await asyncio.wait([task], timeout=10)
    assert task.done()
    return task


async def test_a_complete_answered_before_a_cancel_is_the_items_result(executor):
    request = v2.CompleteRequest(model=MODEL, prompt="a b c", max_output_tokens=3)
    task = await _run(executor, jobs_pb2.JobItem(complete=request))
    assert not task.cancelled(), "the worker's answer (metered) was thrown away"
    outcome = task.result()
    assert outcome.result.WhichOneof("outcome") == "complete", outcome.result
    assert outcome.usage[1] == 3  # the completion tokens the worker metered
    assert task.cancelling() == 0  # the cancel was taken back: the runner stores it


async def test_an_embed_answered_before_a_cancel_is_the_items_result(executor):
    task = await _run(
        executor, jobs_pb2.JobItem(embed=v2.EmbedRequest(model=EMBEDDER, inputs=["a"]))
    )
    assert not task.cancelled(), "the worker's answer (metered) was thrown away"
    assert task.result().result.WhichOneof("outcome") == "embed"


async def test_a_call_that_failed_as_it_was_cancelled_ends_the_item_cancelled(executor):
    # An answer that is an error loses nothing: the cancel goes on, no retry.
    request = v2.CompleteRequest(model=MODEL, prompt="a", max_output_tokens=1, n=9)
    task = await _run(executor, jobs_pb2.JobItem(complete=request))
    assert task.cancelled()


@contextlib.asynccontextmanager
async def _long_item(tmp_path: Path, own_redis: str) -> AsyncIterator[tuple[_Watched, Any]]:
    """A plain executor running one item of 200 steps of 50 ms (10 s) on a real worker,
    its call made: yields the executor and the item's task."""
    task: asyncio.Task[Any] | None = None
    async with _watched_worker(
        tmp_path, own_redis, False, test_models=(f"{MODEL}:1",), test_engine_step_ms=50.0
    ) as plain:
        try:
            request = v2.CompleteRequest(model=MODEL, prompt="a", max_output_tokens=200)
            item = jobs_pb2.JobItem(complete=request)
            task = asyncio.create_task(plain.run(item, 0, "job-cut:0", OWNER, time.time() + 30))
            async with asyncio.timeout(10):
                while not plain.calls:
                    await asyncio.sleep(0.01)
            yield plain, task
        finally:
            if task is not None:
                task.cancel()


async def test_a_call_not_answered_yet_is_cut_by_a_cancel(tmp_path: Path, own_redis: str):
    async with _long_item(tmp_path, own_redis) as (plain, task):
        task.cancel()
        await asyncio.wait([task], timeout=5)
        assert task.cancelled()
        assert plain.calls[0].cancelled()


@pytest.mark.timeout(20)  # a spin blocks the loop: only pytest-timeout's signal ends it
async def test_a_call_cut_by_its_channels_close_ends_the_item(tmp_path: Path, own_redis: str):
    # The call ends (cut here, not answered) with the item's task not cancelled: a
    # first version took the ended call for an answer on its way and spun for ever
    # without yielding, freezing the jobs replica (its stop closes the channels).
    async with _long_item(tmp_path, own_redis) as (plain, task):
        await plain.close()
        await asyncio.wait([task], timeout=5)
        assert task.cancelled()  # the signal's error instead, raised inside the spin
