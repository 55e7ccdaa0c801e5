"""Redis-backed services (auth, router, usage) against a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.auth.service import AuthService, AuthSettings
from services.core.server import serving
from services.core.settings import RedisSettings
from services.launcher.mesh import spawn_redis
from services.router.service import RouterService
from tokenmesh.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from tokenmesh.router.v1 import router_service_pb2, router_service_pb2_grpc


async def test_unimplemented_rpcs_answer_unimplemented_with_error_info(redis_url):
    settings = RedisSettings(metrics_port=-1, grace_s=0.5, redis_url=redis_url)
    async with serving(RouterService(settings), settings) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = router_service_pb2_grpc.RouterServiceStub(channel).ListCatalogModels(
                router_service_pb2.ListCatalogModelsRequest()
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            status = await rpc_status.aio.from_call(call)
            error_info = error_details_pb2.ErrorInfo()
            status.details[0].Unpack(error_info)
            assert error_info.reason == "NOT_IMPLEMENTED"


async def test_health_follows_redis(tmp_path: Path):
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    settings = AuthSettings(metrics_port=-1, grace_s=0.5, redis_url=url, secret="s" * 32)
    service = AuthService(settings)
    service.monitor.interval_s = 0.1
    name = "tokenmesh.auth.v1.AuthService"
    try:
        async with serving(service, settings) as running:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
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
