"""After the router (or its Redis) was away, workers keep their endpoints for a lease:
they could not renew meanwhile (real Redis, a real router build)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import redis.asyncio as aioredis

from services.core.server import serving
from services.launcher.mesh import spawn_redis
from services.launcher.processes import reserve_port
from services.router.catalog import Catalog
from services.router.registry import WORKERS_KEY, WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import EdgeFlags
from tests import mtls

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
MODEL = ("m", "1")


async def test_a_router_back_after_minutes_keeps_the_workers_it_could_not_hear(registry_url: str):
    # Its first build forgot every worker whose lease ended over a minute ago, before
    # the lease grace it gives them could apply: the edges got empty endpoints (503
    # for every model) until each worker's next heartbeat registered it again.
    client = aioredis.from_url(registry_url)
    router = RouterService(
        RouterSettings(pki_dir=mtls.pki_dir(), metrics_port=-1, redis_url=registry_url)
    )
    try:
        away_since = time.time() - 180  # its lease (30 s) ended 150 s ago
        await WorkerRegistry(client, lease_s=30).register("w", "10.0.0.1:1001", [MODEL], away_since)
        await Catalog(client).register([MODEL])
        (built,) = await router._build([EdgeFlags()])  # a fresh router: in its grace
        inference = built.by_type[EDS]["inference"]
        assert [len(group["lb_endpoints"]) for group in inference["endpoints"]] == [1]
        assert await client.hexists(WORKERS_KEY, "w")
    finally:
        await router.redis.aclose()
        await client.aclose()


async def test_only_the_route_build_forgets_long_gone_workers(registry_url: str):
    # A rollout tick or an admin's ListWorkers right after the outage forgot them too,
    # and the next build, in its grace, had none left to keep.
    client = aioredis.from_url(registry_url)
    try:
        registry = WorkerRegistry(client, lease_s=30)
        await registry.register("w", "10.0.0.1:1001", [MODEL], time.time() - 180)
        assert [w.worker_id for w in await registry.all(time.time())] == ["w"]
        assert await client.hexists(WORKERS_KEY, "w")
        assert await registry.all(time.time(), forget=True) == []
        assert not await client.hexists(WORKERS_KEY, "w")
    finally:
        await client.aclose()


async def test_a_router_started_while_redis_is_away_gives_the_grace_once_it_is_back(
    tmp_path: Path,
) -> None:
    """The grace was counted from the router's construction, and `start` waits for Redis:
    started during an outage longer than a lease, its first build had none, dropped
    every worker (their leases lapsed meanwhile) and pushed empty endpoints to every
    edge, which the runbook says a restarted router never does."""
    port = reserve_port()
    data = tmp_path / "redis"
    child, url = spawn_redis(data, tmp_path / "redis.log", port=port, durable=True)
    client = aioredis.from_url(url)
    # A worker that heartbeat until the outage began (1 s leases).
    await WorkerRegistry(client, lease_s=1).register(
        "w", "10.0.0.1:1001", [MODEL], time.time() - 0.5
    )
    await Catalog(client).register([MODEL])
    await client.aclose()
    child.terminate()
    child.wait(10)
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=url, lease_s=1
    )
    router = RouterService(settings)
    stop = asyncio.Event()

    async def run() -> None:
        async with serving(router, settings):
            await stop.wait()

    task = asyncio.create_task(run())
    try:
        constructed_grace_end = router._lease_grace_until
        async with asyncio.timeout(10):  # the outage outlasts the grace it was given then
            while time.monotonic() < constructed_grace_end + 1.0:
                assert not router.plane.ready.is_set()
                await asyncio.sleep(0.05)
        child, url = spawn_redis(data, tmp_path / "redis2.log", port=port, durable=True)
        async with asyncio.timeout(20):
            await router.plane.ready.wait()
        first = router.plane.resources(EdgeFlags()).source
        endpoints = first.by_type[EDS][f"model:{MODEL[0]}:{MODEL[1]}"]["endpoints"]
        assert [len(group["lb_endpoints"]) for group in endpoints] == [1]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        child.terminate()
        child.wait(10)


async def test_a_restarted_router_keeps_out_the_workers_a_running_router_saw_die(
    registry_url: str,
):
    # The grace counted every expired lease: a router's restart put each worker that
    # died in the last minute back in every cluster's endpoints for the grace (the
    # edges' health checks then kept traffic off it). A worker whose lease ended
    # before the last build outside a grace died while a router heard heartbeats.
    client = aioredis.from_url(registry_url)
    router = RouterService(
        RouterSettings(pki_dir=mtls.pki_dir(), metrics_port=-1, redis_url=registry_url)
    )
    try:
        registry = WorkerRegistry(client, lease_s=30)
        at = time.time()
        await registry.register("dead", "10.0.0.1:1001", [MODEL], at - 50)  # ended 20 s ago
        await registry.register("away", "10.0.0.2:1001", [MODEL], at - 35)  # ended 5 s ago
        await registry.mark_built(at - 10)  # the last router's last build
        await Catalog(client).register([MODEL])
        (built,) = await router._build([EdgeFlags()])  # a fresh router: in its grace
        inference = built.by_type[EDS]["inference"]
        addresses = [
            endpoint["endpoint"]["address"]["socket_address"]["address"]
            for group in inference["endpoints"]
            for endpoint in group["lb_endpoints"]
        ]
        assert addresses == ["10.0.0.2"]
    finally:
        await router.redis.aclose()
        await client.aclose()


async def test_only_a_build_outside_the_grace_records_its_time(registry_url: str):
    # A build in the grace has not heard the workers for a lease: recorded, a router
    # restarting again before they renewed would have left them all out.
    client = aioredis.from_url(registry_url)
    router = RouterService(
        RouterSettings(pki_dir=mtls.pki_dir(), metrics_port=-1, redis_url=registry_url)
    )
    try:
        registry = WorkerRegistry(client, lease_s=30)
        await Catalog(client).register([MODEL])
        await router._build([EdgeFlags()])
        assert await registry.built_at() == float("-inf")
        router._lease_grace_until = time.monotonic()  # the grace is over
        before = time.time()
        await router._build([EdgeFlags()])
        assert before - 1 <= await registry.built_at() <= time.time() + 1
    finally:
        await router.redis.aclose()
        await client.aclose()


async def test_the_build_time_is_never_ahead_of_redis_nor_moved_back(registry_url: str):
    # A plain SET: a replica whose clock estimate ran ahead by δ pushed built-at δ
    # ahead (another replica's grace then dropped live workers whose leases lapsed
    # within δ of it), and an older build's write landing late moved it back.
    client = aioredis.from_url(registry_url)
    try:
        registry = WorkerRegistry(client, lease_s=30)
        seconds, microseconds = await client.time()
        redis_now = seconds + microseconds / 1e6
        await registry.mark_built(redis_now + 3600)  # an estimate an hour ahead
        capped = await registry.built_at()
        assert redis_now <= capped <= redis_now + 5
        await registry.mark_built(capped - 10)  # an older build, landing late
        assert await registry.built_at() == capped
    finally:
        await client.aclose()
