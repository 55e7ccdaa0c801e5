"""Redis-backed services (auth, router, usage) against a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.auth.service import AuthService, AuthSettings
from services.core.errors import AlreadyExists
from services.core.server import serving
from services.launcher.mesh import spawn_redis
from services.router.registry import WorkerRegistry
from services.router.service import RouterService, RouterSettings
from tests import mtls
from tokenmesh.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from tokenmesh.router.v1 import router_pb2, router_service_pb2, router_service_pb2_grpc


async def test_catalogue_errors_carry_bad_request_details(redis_url):
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=redis_url
    )
    async with serving(RouterService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="router", caller="operator") as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            await stub.RegisterModelVersion(
                router_service_pb2.RegisterModelVersionRequest(model="errs", version="1")
            )
            call = stub.SetTrafficSplit(
                router_service_pb2.SetTrafficSplitRequest(
                    model="errs", weights=[router_pb2.TrafficWeight(version="1", weight=90)]
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sum to 100 (they sum to 90)" in (info.value.details() or "")
            status = await rpc_status.aio.from_call(call)
            bad_request = error_details_pb2.BadRequest()
            assert status.details[1].Unpack(bad_request)
            assert bad_request.field_violations[0].field == "weights"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetCatalogModel(router_service_pb2.GetCatalogModelRequest(model="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_follows_redis(tmp_path: Path):
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    settings = AuthSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=url, secret="s" * 32
    )
    service = AuthService(settings)
    service.monitor.interval_s = 0.1
    name = "tokenmesh.auth.v1.AuthService"
    try:
        async with serving(service, settings) as running:
            async with mtls.aio_channel(running.port, peer="auth") as channel:
                health: Any = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service=name)
                assert (
                    await health.Check(request)
                ).status == health_pb2.HealthCheckResponse.SERVING
                child.terminate()
                child.wait(10)
                for _ in range(50):
                    if (
                        await health.Check(request)
                    ).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.1)
                assert (
                    await health.Check(request)
                ).status == health_pb2.HealthCheckResponse.NOT_SERVING
                # RPCs still answer with a status rather than hanging.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await auth_service_pb2_grpc.AuthServiceStub(channel).IssueToken(
                        auth_service_pb2.IssueTokenRequest(api_key="tm_x"), timeout=5
                    )
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        child.terminate()
        child.wait(10)


async def test_a_worker_id_cannot_be_taken_by_a_second_live_worker(redis_url):
    client = aioredis.from_url(redis_url)
    registry = WorkerRegistry(client, lease_s=2)
    worker_id, now = f"w-{uuid.uuid4().hex[:6]}", time.time()
    try:
        await registry.register(worker_id, "127.0.0.1:1001", [("m", "1")], now)
        await registry.register(worker_id, "127.0.0.1:1001", [("m", "1")], now + 1)  # itself
        with pytest.raises(AlreadyExists, match="127.0.0.1:1001"):
            await registry.register(worker_id, "127.0.0.1:1002", [("m", "1")], now + 1)
        # Once the first one's lease ran out (a crash), the id is free again.
        taken = await registry.register(worker_id, "127.0.0.1:1002", [("m", "1")], now + 3.5)
        assert taken.port == 1002
    finally:
        await client.aclose()
