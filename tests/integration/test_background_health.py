"""A service whose background task cannot recover reports NOT_SERVING, and
SERVING again once the task runs: real servers, real Redis, real health checks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.core.server import serving
from services.core.tasks import RestartPolicy
from services.launcher.mesh import spawn_redis
from services.usage.service import SERVICE_NAME, UsageService, UsageSettings
from tests import mtls

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Fast, so the test waits fractions of a second; production uses the defaults.
FAST = RestartPolicy(
    first_backoff_s=0.05, max_backoff_s=0.2, unhealthy_after=3, healthy_after_s=0.3
)


def _usage(redis_url: str) -> UsageService:
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=f"usage-health:{uuid.uuid4().hex}",
    )
    service = UsageService(settings)
    service.tasks.policy = FAST
    service.monitor.interval_s = 0.1
    return service


def _meter_restarts() -> float:
    labels = {"service": "usage", "task": "usage-meter"}
    return REGISTRY.get_sample_value("tokenmesh_background_task_restarts_total", labels) or 0.0


async def _until(condition: Callable[[], Any], timeout_s: float = 15.0) -> None:
    """Waits until `condition()` (sync or async) is true, polling."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


def _status_is(health: Any, status: int) -> Callable[[], Any]:
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)

    async def check() -> bool:
        return bool((await health.Check(request, timeout=5)).status == status)

    return check


async def test_a_meter_that_keeps_failing_flips_health_while_redis_is_fine(redis_url):
    service = _usage(redis_url)
    stream = service.settings.usage_stream
    async with serving(service, service.settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert await _status_is(health, SERVING)()
            restarts = _meter_restarts()
            # The meter's dependency breaks while Redis itself answers every PING:
            # its stream key now holds a string, so every read and every restart fails.
            await service.redis.delete(stream)
            await service.redis.set(stream, "not a stream")
            await _until(_status_is(health, NOT_SERVING))
            assert service.monitor.reachable
            assert service.health.failing() == {"task usage-meter"}
            assert _meter_restarts() >= restarts + FAST.unhealthy_after
            await service.redis.delete(stream)  # repaired: the next run recreates the group
            await _until(_status_is(health, SERVING))
            assert service.health.serving


async def test_killing_the_meter_s_redis_flips_health_and_restoring_it_recovers(tmp_path: Path):
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    service = _usage(url)
    try:
        async with serving(service, service.settings) as running:
            async with mtls.aio_channel(running.port, peer="usage") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                assert await _status_is(health, SERVING)()
                restarts = _meter_restarts()
                child.terminate()
                child.wait(10)
                await _until(_status_is(health, NOT_SERVING))
                # Not only the Redis monitor: the meter itself gave up and said so.
                await _until(lambda: "task usage-meter" in service.health.failing())
                assert _meter_restarts() >= restarts + FAST.unhealthy_after
                child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
                await _until(_status_is(health, SERVING))
                assert service.health.failing() == frozenset()
    finally:
        child.terminate()
        child.wait(10)


async def test_a_condition_failing_before_start_keeps_the_service_not_serving(redis_url):
    # The server turned SERVING once start returned whatever the gate said, and the
    # gate, attached as if serving, never passed the condition's recovery on.
    service = _usage(redis_url)
    await service.health.report("warming up", False)
    async with serving(service, service.settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert await _status_is(health, NOT_SERVING)()
            await service.health.report("warming up", True)
            await _until(_status_is(health, SERVING))
