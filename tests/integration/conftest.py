"""In-process servers on ephemeral ports, reached over real channels."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.pki import IdentityFiles
from services.core.server import serving
from services.inference.budget import TokenBudgets
from services.inference.service import InferenceService, InferenceSettings
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.workers import WorkerDirectory
from services.launcher.mesh import spawn_redis
from services.router.catalog import CATALOG_KEY, ModelEntry, VersionEntry
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.conftest import private_db_url

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "models"


def inference_settings(tmp_path: Path, redis_url: str, **overrides: Any) -> InferenceSettings:
    """Returns fast worker settings; `overrides` replace any field."""
    values: dict[str, Any] = dict(
        metrics_port=-1,
        grace_s=1.0,
        redis_url=redis_url,
        models=(),
        test_models=("deterministic-test:1", "deterministic-test:2"),
        test_engine_step_ms=5.0,
        model_repository=MODEL_REPOSITORY,
        usage_spool_dir=tmp_path / "spool",
        lease_token_dir=tmp_path / "lease-tokens",
        usage_stream=f"usage-test:{tmp_path.name}",
        engine="onnxruntime",
        worker_id="w0",
        pki_dir=mtls.pki_dir(),
    )
    values.update(overrides)
    return InferenceSettings(**values)


async def start_inference(settings: InferenceSettings) -> Any:
    """Returns an async context manager yielding (service, channel)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
        service = InferenceService(settings)
        async with serving(service, settings) as server:
            async with mtls.aio_channel(server.port, peer="worker") as channel:
                yield service, channel

    return running()


@dataclass
class JobsWorker:
    """A worker the jobs service's item executor finds, and that executor."""

    service: InferenceService
    client: aioredis.Redis  # the private database the worker is registered in
    executor: ItemExecutor  # calls as the jobs identity
    edge_channel: grpc.aio.Channel  # calls the worker as the edge


@contextlib.asynccontextmanager
async def jobs_worker(tmp_path: Path, redis_url: str, db: int) -> AsyncIterator[JobsWorker]:
    """Serves deterministic-test:1 on a worker registered in database `db` (one no jobs
    service of the session mesh reads), with an item executor of the jobs identity."""
    url = private_db_url(redis_url, db)
    client = aioredis.from_url(url)
    settings = inference_settings(tmp_path, url, test_models=("deterministic-test:1",))
    executor = ItemExecutor(
        WorkerDirectory(client), IdentityFiles.of(mtls.pki_dir(), contract.JOBS), Backoff(), 30
    )
    worker_id = f"w-jobs-{uuid.uuid4().hex[:6]}"
    try:
        async with await start_inference(settings) as (service, edge_channel):
            assert service._running is not None  # noqa: SLF001 - started: its port
            models = (("deterministic-test", "1"),)
            entry = WorkerEntry(
                worker_id,
                "127.0.0.1",
                service._running.port,  # noqa: SLF001
                models,
                lease_expires_at=time.time() + 600,
            )
            await client.hset(WORKERS_KEY, worker_id, entry.to_json())
            yield JobsWorker(service, client, executor, edge_channel)
    finally:
        await client.hdel(WORKERS_KEY, worker_id)
        await executor.close()
        await client.aclose()


@pytest.fixture
async def inference_channel(tmp_path: Path, redis_url: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a real inference server with the deterministic test engine."""
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        yield channel


@pytest.fixture
async def model_server(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
    """A worker serving the real demo-lm and all-minilm-l6-v2 from models/."""
    settings = inference_settings(
        tmp_path, redis_url, models=("demo-lm:1", "all-minilm-l6-v2:1"), test_models=()
    )
    async with await start_inference(settings) as pair:
        yield pair


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own (auth state is encrypted under each test's server secret, and
    its keys have global names): its URL."""
    child, url = spawn_redis(tmp_path / "redis", tmp_path / "redis.log", durable=False)
    try:
        yield url
    finally:
        child.terminate()
        child.wait(10)


# The worker registry is one hash of global names: its tests take a database apart
# from the session mesh's router (which heartbeats into database 0).
REGISTRY_DB = 14


@pytest.fixture
async def registry_url(redis_url: str) -> AsyncIterator[str]:
    """A Redis database of its own for the registry and catalogue, emptied around a test."""
    url = private_db_url(redis_url, REGISTRY_DB)
    client = aioredis.from_url(url)
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def registry_client(registry_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of `registry_url`."""
    client = aioredis.from_url(registry_url)
    yield client
    await client.aclose()


class RegistryOperator:
    """A registry call's context as the servicer reads it: no worker certificate."""

    def peer_identities(self) -> None:
        return None


async def catalogue(redis_url: str, *models: str) -> None:
    """Puts `models` (version 1 each) in the catalogue of the Redis at `redis_url`: jobs
    and batches are refused for models nothing knows. No worker serves them, so their
    items wait (as for a model whose workers are restarting)."""
    client = aioredis.from_url(redis_url)
    try:
        for model in models:
            entry = ModelEntry(model, versions=(VersionEntry("1", 100),))
            await client.hset(CATALOG_KEY, model, entry.to_json())
    finally:
        await client.aclose()


async def no_refresh() -> None:
    """A route refresh that does nothing (the registry's tests build no routes)."""


async def month_charged(client: aioredis.Redis, key_id: str, within_s: float = 86400) -> int:
    """Returns what `key_id` is charged in the UTC months of the last `within_s` (this
    month, and the one before when it ended within them).

    A token budget charges a request in the UTC month it was reserved in
    (services.inference.budget). "This month's" counter, read at the check, was the
    next month's once a month ended between a reservation and the read (a run late
    on the 31st read 0). A test's key is its own: its months add up to what it was
    charged. One round trip, as the GET it replaces (a check made while a background
    settlement is due sees what it saw). Which month holds a charge is tested with
    that month's key (test_budgets, test_budget_reaper).
    """
    now = time.time()
    months = dict.fromkeys(TokenBudgets.month_key(key_id, at) for at in (now - within_s, now))
    return sum(int(used or 0) for used in await client.mget(list(months)))
