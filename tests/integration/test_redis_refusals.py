"""A Redis that answers but refuses for now makes a Redis-backed RPC UNAVAILABLE + RetryInfo.

READONLY (the old primary during a failover) and OOM (maxmemory under
noeviction) pass by themselves, as a lost connection does: the error boundary
answered them INTERNAL "internal error" with a traceback per call, so SDKs and
Envoy did not retry (REST: 500, not 503 + Retry-After), while the rate limiter
called the same errors "store unavailable" (services/core/store_errors.py is
now the one definition). Real router over mTLS, a real Redis of the test's own:
the bundled 6.2, whose Lua scripts wrap a refused write in a generic ERR, and
the system's Redis 7 (production's major) where there is one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core.redis_acl import binary_major
from services.core.server import serving
from services.launcher.mesh import spawn_redis
from services.router.service import RouterService, RouterSettings
from tests import mtls
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc
from tokenmesh.type.v1 import types_pb2


def _system_redis_7() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found and binary_major(Path(found)) >= 7 else None


@pytest.fixture(params=["bundled", "system"])
def refusing_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A Redis of the test's own (it is made to refuse writes): its URL."""
    binary = None
    if request.param == "system":
        binary = _system_redis_7()
        if binary is None:
            pytest.skip("no redis-server 7 on PATH")
    child, url = spawn_redis(
        tmp_path / "redis", tmp_path / "redis.log", durable=False, binary=binary
    )
    try:
        yield url
    finally:
        child.terminate()
        child.wait(10)


@contextlib.asynccontextmanager
async def _refusing(admin: aioredis.Redis, refusal: str) -> AsyncIterator[None]:
    """Makes the Redis refuse writes with `refusal` inside the block; restores it after."""
    if refusal == "OOM":
        before = {
            **await admin.config_get("maxmemory"),
            **await admin.config_get("maxmemory-policy"),
        }
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        try:
            yield
        finally:
            for name, value in before.items():
                await admin.config_set(str(name), str(value))
    else:  # READONLY: a replica of a primary that is gone, as a failover's old primary
        await admin.execute_command("REPLICAOF", "127.0.0.1", "1")
        try:
            yield
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")


def _register(n: int) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(
        worker_id=f"w{n}",
        address="127.0.0.1:5999",
        models=[types_pb2.ModelRef(name="m", version="1")],
    )


@pytest.mark.parametrize("refusal", ["OOM", "READONLY"])
async def test_a_refusing_redis_answers_unavailable_with_retry_info(
    refusing_url: str, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=refusing_url
    )
    admin = aioredis.from_url(refusing_url)
    try:
        async with serving(RouterService(settings), settings) as running:
            async with mtls.aio_channel(running.port, peer="router", caller="worker") as channel:
                registry = rpc.WorkerRegistryServiceStub(channel)
                await registry.RegisterWorker(_register(1), timeout=10)
                caplog.clear()
                async with _refusing(admin, refusal):
                    call = registry.RegisterWorker(_register(2), timeout=10)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    status = await rpc_status.aio.from_call(call)
                # It passes by itself: the same call succeeds once Redis takes writes.
                await registry.RegisterWorker(_register(2), timeout=10)
    finally:
        await admin.aclose()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert status is not None
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1
    assert ("retry-after", "1") in tuple(info.value.trailing_metadata() or ())
    # One warning line, no traceback (it was "unhandled error" with one per call).
    boundary = [r for r in caplog.records if r.name == "services.core.interceptors"]
    assert [r.levelno for r in boundary] == [logging.WARNING], [r.getMessage() for r in boundary]
    assert boundary[0].exc_info is None and "Redis refused" in boundary[0].getMessage()
