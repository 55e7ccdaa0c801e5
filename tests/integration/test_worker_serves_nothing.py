"""A worker that unloads its last version serves nothing, and the router says so: it
leaves that version's cluster and the mesh's models, and registers again with none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import NotFound
from services.core.server import RunningServer, serving
from services.inference.service import InferenceService
from services.router.registry import WORKERS_KEY, WorkerRegistry
from services.router.service import RouterService, RouterSettings
from tests import mtls
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc
from tokenmesh.type.v1 import types_pb2

LEASE_S = 1.5
WORKER = "w-solo"
PEER_TOKEN = "p" * 43
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[RunningServer]:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis, lease_s=LEASE_S
    )
    async with serving(RouterService(settings), settings) as running:
        yield running


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.05)


async def _peer_sees(router_port: int, registry: WorkerRegistry) -> set[str]:
    """The models another worker's heartbeat answer lists (what its ListModels shows)."""
    await registry.register("w-peer", "127.0.0.1:5999", [("other", "1")], time.time(), PEER_TOKEN)
    refs = [types_pb2.ModelRef(name="other", version="1")]
    async with mtls.aio_channel(router_port, peer="router", caller="worker") as channel:
        answer = await router_rpc.WorkerRegistryServiceStub(channel).RenewLease(
            router_pb.RenewLeaseRequest(worker_id="w-peer", models=refs, lease_token=PEER_TOKEN)
        )
    return {m.name for m in answer.mesh_models}


async def test_a_worker_that_unloads_its_last_version_is_advertised_with_none(
    router, own_redis, tmp_path
):
    settings = inference_settings(
        tmp_path,
        own_redis,
        router_address=f"127.0.0.1:{router.port}",
        test_models=("solo:1",),
        worker_id=WORKER,
    )
    service = InferenceService(settings)
    client = aioredis.from_url(own_redis)
    registry = WorkerRegistry(client, lease_s=LEASE_S)

    async def models_are(expected: tuple[tuple[str, str], ...]) -> bool:
        try:
            return bool((await registry.get(WORKER)).models == expected)
        except NotFound:
            return False

    try:
        async with serving(service, settings) as running:
            await _until(lambda: models_are((("solo", "1"),)), 30)
            assert "solo" in await _peer_sees(router.port, registry)
            async with mtls.aio_channel(running.port, peer="worker", caller="operator") as channel:
                admin = v1_rpc.InferenceAdminServiceStub(channel)
                await admin.UnloadModel(v1.UnloadModelRequest(model="solo", version="1"))
                # Out of the version's cluster and of every worker's ListModels.
                await _until(lambda: models_are(()), 2 * LEASE_S)
                assert "solo" not in await _peer_sees(router.port, registry)

                # The router forgets it (a Redis flush, a lapsed lease): it registers
                # again, with no model, and stays SERVING.
                await client.hdel(WORKERS_KEY, WORKER)
                await _until(lambda: models_are(()), 2 * LEASE_S)
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert reply.status == SERVING
                assert service.health.serving

                await admin.LoadModel(v1.LoadModelRequest(model="demo-lm", version="1"))
                await _until(lambda: models_are((("demo-lm", "1"),)), 2 * LEASE_S)
    finally:
        await client.aclose()


async def test_a_worker_with_no_ready_version_registers_and_heartbeats(
    router: RunningServer,
) -> None:
    refs = [types_pb2.ModelRef(name="m", version="1")]
    token = "q" * 43
    async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
        stub = router_rpc.WorkerRegistryServiceStub(channel)
        await stub.RegisterWorker(
            router_pb.RegisterWorkerRequest(
                worker_id="w-empty", address="127.0.0.1:5998", lease_token=token
            )
        )
        # A worker from before descriptions: no models in a heartbeat keeps the last.
        await stub.RenewLease(
            router_pb.RenewLeaseRequest(worker_id="w-empty", models=refs, lease_token=token)
        )
        old = await stub.RenewLease(
            router_pb.RenewLeaseRequest(worker_id="w-empty", lease_token=token)
        )
        assert old.lease_expire_time.seconds > time.time()
    async with mtls.aio_channel(router.port, peer="router", caller="operator") as channel:
        stub = router_rpc.WorkerRegistryServiceStub(channel)
        workers = await stub.ListWorkers(router_pb.ListWorkersRequest())
    assert [list(w.models) for w in workers.workers] == [refs]
