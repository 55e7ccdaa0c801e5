"""A busy worker none of whose requests finish (a stalled engine, long generations) keeps a
low weight at the edge (real Redis, the registry's heartbeats and the xDS build)."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.router import catalog as cat
from services.router import snapshot
from services.router.load_weights import MIN_WEIGHT, LoadReport
from services.router.registry import WorkerRegistry

MODELS = [("m", "1")]
FAST = LoadReport(running=2, slots=8, ttft_samples=40, ttft_p50_ms=40.0)
SLOW = LoadReport(queue_depth=24, running=8, slots=8, ttft_samples=40, ttft_p50_ms=900.0)


def endpoint_weights(resources: snapshot.Resources) -> dict[str, int]:
    endpoints = resources.by_type[snapshot.ENDPOINT_TYPE]["model:m:1"]["endpoints"][0]
    return {
        e["endpoint"]["address"]["socket_address"]["address"]: e["load_balancing_weight"]
        for e in endpoints["lb_endpoints"]
    }


async def test_a_stalled_worker_stays_at_the_floor_while_its_queue_grows(own_redis: str):
    # It was at the floor for being slow; then nothing finished (no TTFT sample in the
    # report's window) while its queue grew. Taken as idle, it was back at 100 within
    # four heartbeats: half of the version's new requests queued behind it.
    client = aioredis.from_url(own_redis)
    try:
        registry = WorkerRegistry(client, lease_s=3.0)
        now = 1000.0
        await registry.register("a", "10.0.0.1:5000", MODELS, now)
        await registry.register("b", "10.0.0.2:5000", MODELS, now)
        for _ in range(6):
            now += 1
            await registry.renew("a", MODELS, now, FAST)
            renewal = await registry.renew("b", MODELS, now, SLOW)
        assert renewal.worker.weight.weight == MIN_WEIGHT
        for queue in range(60, 160, 20):
            now += 1
            stalled = LoadReport(queue_depth=queue, running=8, slots=8, kv_utilization=1.0)
            await registry.renew("a", MODELS, now, FAST)
            renewal = await registry.renew("b", MODELS, now, stalled)
            assert renewal.worker.weight.weight == MIN_WEIGHT, renewal.worker.weight.reason
        assert f"no request finished lately, {queue} queued" in renewal.worker.weight.reason
        model = cat.add_version(None, "m", "1", 0)
        resources = snapshot.build(
            {"m": model},
            await registry.all(now),
            now,
            snapshot.EdgeFlags(),
            snapshot.ClusterOptions(),
        )
        assert endpoint_weights(resources) == {"10.0.0.1": 100, "10.0.0.2": MIN_WEIGHT}
    finally:
        await client.aclose()
