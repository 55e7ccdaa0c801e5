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


async def test_registrations_add_versions_up_to_the_bound_and_still_succeed(
    router: tuple[RunningServer, str],
) -> None:
    running, url = router
    async with mtls.aio_channel(running.port, peer="router", caller="worker") as channel:
        stub = rpc.WorkerRegistryServiceStub(channel)
        for worker in range(2):
            request = pb.RegisterWorkerRequest(
                worker_id=f"w{worker}",
                address=f"127.0.0.1:{40001 + worker}",
                models=[ModelRef(name=f"made-up-{worker}-{i}", version="1") for i in range(4)],
                lease_token="t" * 40,
            )
            await stub.RegisterWorker(request, timeout=30)  # registered, all the same
    redis = aioredis.from_url(url)
    try:
        assert await redis.hlen(CATALOG_KEY) == BOUND
    finally:
        await redis.aclose()


async def test_registrations_at_the_same_time_stay_within_the_bound(
    router: tuple[RunningServer, str],
) -> None:
    # The bound was counted before the transactions that add each version: workers
    # registering at once each passed it, and together went past it.
    running, url = router
    async with mtls.aio_channel(running.port, peer="router", caller="worker") as channel:
        stub = rpc.WorkerRegistryServiceStub(channel)
        requests = [
            pb.RegisterWorkerRequest(
                worker_id=f"w{worker}",
                address=f"127.0.0.1:{40001 + worker}",
                models=[ModelRef(name=f"made-up-{worker}-{i}", version="1") for i in range(3)],
                lease_token="t" * 40,
            )
            for worker in range(8)
        ]
        await asyncio.gather(*(stub.RegisterWorker(r, timeout=30) for r in requests))
    redis = aioredis.from_url(url)
    try:
        assert await redis.hlen(CATALOG_KEY) == BOUND
    finally:
        await redis.aclose()
