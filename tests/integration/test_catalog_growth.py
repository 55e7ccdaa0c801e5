"""Workers' registrations grow the catalogue only up to a bound.

Each RegisterWorker added every version it named that the catalogue lacked (up
to 256 a call, kept for good): one worker certificate grew the catalogue without
bound, every version a cluster and routes on every edge, until a new edge got no
routes (the route configuration outgrew the ADS stream) and each poll's rebuild
blocked the router for seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.core.server import RunningServer, serving
from services.router import catalog
from services.router.catalog import CATALOG_KEY
from services.router.service import RouterService, RouterSettings
from tests import mtls
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc
from tokenmesh.type.v1.types_pb2 import ModelRef

BOUND = 5


@pytest.fixture
async def router(
    own_redis: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningServer, str]]:
    monkeypatch.setattr(catalog, "MAX_REGISTERED_VERSIONS", BOUND, raising=False)
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis, lease_s=30
    )
    async with serving(RouterService(settings), settings) as running:
        yield running, own_redis


def _registration(worker: int, versions: int) -> pb.RegisterWorkerRequest:
    """Worker `worker`'s registration, naming `versions` models the catalogue lacks."""
    return pb.RegisterWorkerRequest(
        worker_id=f"w{worker}",
        address=f"127.0.0.1:{40001 + worker}",
        models=[ModelRef(name=f"made-up-{worker}-{i}", version="1") for i in range(versions)],
        lease_token="t" * 40,
    )


async def _catalogued(url: str) -> int:
    redis = aioredis.from_url(url)
    try:
        return int(await redis.hlen(CATALOG_KEY))
    finally:
        await redis.aclose()


async def test_registrations_add_versions_up_to_the_bound_and_still_succeed(
    router: tuple[RunningServer, str],
) -> None:
    running, url = router
    async with mtls.aio_channel(running.port, peer="router", caller="worker") as channel:
        stub = rpc.WorkerRegistryServiceStub(channel)
        for worker in range(2):
            # Registered, all the same.
            await stub.RegisterWorker(_registration(worker, 4), timeout=30)
    assert await _catalogued(url) == BOUND


async def test_registrations_at_the_same_time_stay_within_the_bound(
    router: tuple[RunningServer, str],
) -> None:
    # The bound was counted before the transactions that add each version: workers
    # registering at once each passed it, and together went past it.
    running, url = router
    async with mtls.aio_channel(running.port, peer="router", caller="worker") as channel:
        stub = rpc.WorkerRegistryServiceStub(channel)
        registrations = (stub.RegisterWorker(_registration(w, 3), timeout=30) for w in range(8))
        await asyncio.gather(*registrations)
    assert await _catalogued(url) == BOUND
