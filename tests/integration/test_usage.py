"""Metering against a real Redis: exact totals, idempotence, crash takeover, scoping."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.core.server import serving
from services.usage.meter import Meter, Retention, bucket_key, bucket_start
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as rpc
from tokenmesh.usage.v2 import usage_service_pb2 as v2_pb
from tokenmesh.usage.v2 import usage_service_pb2_grpc as v2_rpc


def _event(
    request_id: str,
    key: str,
    tenant: str,
    prompt: int,
    completion: int,
    reason: str = "length",
    model: str = "demo-lm",
    version: str = "1",
) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=request_id,
        key_id=key,
        tenant=tenant,
        finish_reason=reason,
        model=types_pb2.ModelRef(name=model, version=version),
        usage=types_pb2.TokenUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
        finish_unix_ms=int(time.time() * 1000),
        rpc="/tokenmesh.inference.v1.InferenceService/Complete",
    )


@pytest.fixture
async def stream_and_client(redis_url):
    client = aioredis.from_url(redis_url)
    yield f"usage-test:{uuid.uuid4().hex}", client
    await client.aclose()


async def _publish(client, stream: str, *events: inference_pb2.UsageEvent) -> None:
    for event in events:
        await client.xadd(
            stream, {"request_id": event.request_id, "event": event.SerializeToString()}
        )


def _meter(client, stream: str, consumer: str, claim_idle_s: float = 30.0) -> Meter:
    return Meter(client, stream, "meter", consumer, Retention(), claim_idle_s)


async def _drain(meter: Meter) -> None:
    while await meter.run_once(block_ms=50):
        pass


def _headers(key: str, tenant: str, scopes: str = "usage:read") -> list[tuple[str, str]]:
    return [
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-tenant", tenant),
        ("x-tokenmesh-scopes", scopes),
    ]


async def test_totals_are_exact_and_replays_count_once(stream_and_client, redis_url):
    stream, client = stream_and_client
    key, tenant = f"key_{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:6]}"
    run = uuid.uuid4().hex[:8]  # request ids are deduplicated across the whole Redis
    events = [
        _event(f"r{i}-{run}", key, tenant, 10 + i, 2 * i, "length" if i % 3 else "cancelled")
        for i in range(20)
    ]
    await _publish(client, stream, *events, events[3], events[7])  # two replays
    meter = _meter(client, stream, "c1")
    await meter.ensure_group()
    await _drain(meter)
    async with _usage_channel(redis_url, stream) as channel:
        stub = rpc.UsageServiceStub(channel)
        own = await stub.GetUsage(pb.GetUsageRequest(), metadata=_headers(key, tenant))
        assert own.requests == 20, own
        assert own.prompt_tokens == sum(e.usage.prompt_tokens for e in events)
        assert own.completion_tokens == sum(e.usage.completion_tokens for e in events)
        assert own.total_tokens == own.prompt_tokens + own.completion_tokens
        assert own.requests_by_finish_reason == {"length": 13, "cancelled": 7}
        assert [(m.model, m.totals.requests) for m in own.by_model] == [("demo-lm", 20)]
        by_tenant = await stub.GetUsage(
            pb.GetUsageRequest(tenant=tenant, granularity=usage_pb2.GRANULARITY_DAY),
            metadata=_headers(key, tenant),
        )
        assert by_tenant.total_tokens == own.total_tokens and len(by_tenant.buckets) == 1


async def test_a_crashed_consumer_s_pending_events_are_taken_over(stream_and_client):
    stream, client = stream_and_client
    key = f"key_{uuid.uuid4().hex[:8]}"
    await _publish(client, stream, *(_event(f"p{i}", key, "t", 1, 1) for i in range(5)))
    crashed = _meter(client, stream, "crashed")
    await crashed.ensure_group()
    read = await client.xreadgroup("meter", "crashed", {stream: ">"}, count=10)  # read, never acked
    assert len(read[0][1]) == 5
    survivor = _meter(client, stream, "survivor", claim_idle_s=0.05)
    time.sleep(0.1)
    assert await survivor.claim_stale() == 5
    pending = await client.xpending(stream, "meter")
    assert pending["pending"] == 0
    fields = await client.hgetall(
        bucket_key(f"key:{key}", "month", bucket_start(time.time(), "month"))
    )
    assert int(fields[b"demo-lm|1|requests"]) == 5


async def test_trimming_deletes_only_what_was_metered(stream_and_client):
    stream, client = stream_and_client
    key = f"key_{uuid.uuid4().hex[:8]}"
    meter = _meter(client, stream, "c1")
    await meter.ensure_group()
    await _publish(client, stream, *(_event(f"a{i}", key, "t", 1, 1) for i in range(6)))
    await _drain(meter)
    await _publish(client, stream, *(_event(f"b{i}", key, "t", 1, 1) for i in range(4)))
    # Another consumer read the next two and crashed before metering them.
    await client.xreadgroup("meter", "crashed", {stream: ">"}, count=2)
    assert await meter.trim() == 6  # the metered ones, up to the oldest pending entry
    assert await client.xlen(stream) == 4  # 2 pending + 2 never read
    await _drain(meter)
    survivor = _meter(client, stream, "survivor", claim_idle_s=0.001)
    time.sleep(0.01)
    assert await survivor.claim_stale() == 2
    await survivor.trim()
    assert await client.xlen(stream) == 1  # only the last delivered entry stays
    fields = await client.hgetall(
        bucket_key(f"key:{key}", "month", bucket_start(time.time(), "month"))
    )
    assert int(fields[b"demo-lm|1|requests"]) == 10


async def test_gone_replicas_consumer_names_are_forgotten_but_not_their_pending_entries(
    stream_and_client,
):
    # A replica's consumer name is its pod's: every restart left one in the group
    # for good. Those idle with nothing pending go; one with entries pending stays
    # (deleting it would drop them from every claim), as does the meter's own.
    stream, client = stream_and_client
    key = f"key_{uuid.uuid4().hex[:8]}"
    meter = _meter(client, stream, "live")
    await meter.ensure_group()
    await _publish(client, stream, *(_event(f"g{i}", key, "t", 1, 1) for i in range(2)))
    await client.xreadgroup("meter", "crashed", {stream: ">"}, count=1)  # one pending
    await client.xreadgroup("meter", "gone", {stream: ">"}, count=1)
    await client.xack(stream, "meter", *[e for e, _ in await client.xrange(stream)][1:])
    await client.xreadgroup("meter", "live", {stream: "0"})

    def names(consumers: Any) -> set[str]:
        return {
            c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers
        }

    assert await meter.forget_idle_consumers(idle_s=60) == 0  # none idle that long
    time.sleep(0.05)  # the idle time itself is what is waited for
    assert await meter.forget_idle_consumers(idle_s=0.02) == 1
    assert names(await client.xinfo_consumers(stream, "meter")) == {"live", "crashed"}
    assert (await client.xpending(stream, "meter"))["pending"] == 1


async def test_callers_see_only_what_they_may(redis_url):
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=f"usage-test:{uuid.uuid4().hex}",
    )
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            stub = rpc.UsageServiceStub(channel)
            for request in (
                pb.GetUsageRequest(tenant="other"),
                pb.GetUsageRequest(key_id="key_other"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetUsage(request, metadata=_headers("key_a", "mine"))
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            admin = _headers("key_admin", "admin", "admin")
            assert (
                await stub.GetUsage(pb.GetUsageRequest(tenant="other"), metadata=admin)
            ).requests == 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetUsage(pb.GetUsageRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListAuditEntries(
                    pb.ListAuditEntriesRequest(tenant="mine"), metadata=_headers("key_a", "mine")
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_audit_log_lists_requests_without_prompts(stream_and_client, redis_url):
    stream, client = stream_and_client
    tenant = f"t{uuid.uuid4().hex[:6]}"
    await _publish(
        client, stream, *(_event(f"a{i}-{tenant}", "key_x", tenant, 3, 4) for i in range(3))
    )
    meter = _meter(client, stream, "c")
    await meter.ensure_group()
    await _drain(meter)
    async with _usage_channel(redis_url, stream) as channel:
        stub = rpc.UsageServiceStub(channel)
        page = await stub.ListAuditEntries(
            pb.ListAuditEntriesRequest(tenant=tenant, page_size=2),
            metadata=_headers("key_admin", "admin", "admin"),
        )
        assert len(page.entries) == 2 and page.next_page_token
        assert page.entries[0].completion_tokens == 4 and page.entries[0].key_id == "key_x"
        assert "prompt" not in {f.name for f in usage_pb2.AuditEntry.DESCRIPTOR.fields}


async def _metered(client: Any, stream: str, *events: inference_pb2.UsageEvent) -> None:
    """Publishes events to `stream` and meters them."""
    await _publish(client, stream, *events)
    meter = _meter(client, stream, "c")
    await meter.ensure_group()
    await _drain(meter)


@contextlib.asynccontextmanager
async def _usage_channel(redis_url: str, stream: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a usage service reading `stream`."""
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=stream,
    )
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            yield channel


async def test_an_admin_reads_the_whole_meshs_usage(own_redis):
    """Every event was counted in a mesh-wide scope that no report served: 8 hash
    writes an event for nothing. `tenant: "*"` is the whole mesh, for admins."""
    client = aioredis.from_url(own_redis)
    stream = f"usage-test:{uuid.uuid4().hex}"
    try:
        await _metered(
            client,
            stream,
            _event("m1", "key_a", "acme", 3, 4),
            _event("m2", "key_b", "globex", 5, 6),
            _event("m3", "key_c", "", 7, 8),  # a key without a tenant
        )
    finally:
        await client.aclose()
    admin = _headers("key_admin", "acme", "admin")
    async with _usage_channel(own_redis, stream) as channel:
        stub = rpc.UsageServiceStub(channel)
        mesh = await stub.GetUsage(pb.GetUsageRequest(tenant="*"), metadata=admin)
        assert (mesh.requests, mesh.prompt_tokens, mesh.completion_tokens) == (3, 15, 18)
        grouped = await v2_rpc.UsageServiceStub(channel).GetUsage(
            v2_pb.GetUsageRequest(tenant="*", group_by="tenant"), metadata=admin
        )
        by_tenant = {g.value: g.totals.requests for g in grouped.groups}
        assert by_tenant == {"acme": 1, "globex": 1, "": 1}, by_tenant
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetUsage(pb.GetUsageRequest(tenant="*"), metadata=_headers("key_a", "acme"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_usage_stamped_by_a_clock_far_off_counts_now_not_in_another_month(
    stream_and_client, redis_url
):
    """An event 400 days ahead went into a month no report read yet (billed a year
    late), one 6 years behind into a month past retention (never billed, no audit
    entry), with no error anywhere. Both count at the nearest bound now."""
    stream, client = stream_and_client
    key, tenant = f"key_{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:6]}"
    day_ms = 86_400_000
    ahead, behind = (
        _event(f"ahead-{key}", key, tenant, 3, 4),
        _event(f"behind-{key}", key, tenant, 5, 6),
    )
    ahead.finish_unix_ms += 400 * day_ms
    behind.finish_unix_ms -= 6 * 365 * day_ms
    await _metered(client, stream, ahead, behind)
    async with _usage_channel(redis_url, stream) as channel:
        stub = rpc.UsageServiceStub(channel)
        start = timestamp_pb2.Timestamp(seconds=int(time.time()) - 8 * 86400)
        end = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
        report = await stub.GetUsage(
            pb.GetUsageRequest(start_time=start, end_time=end), metadata=_headers(key, tenant)
        )
        assert (report.requests, report.prompt_tokens) == (2, 8)
        audit = await stub.ListAuditEntries(
            pb.ListAuditEntriesRequest(tenant=tenant, start_time=start, end_time=end),
            metadata=_headers("key_admin", "admin", "admin"),
        )
        # Listed, each with the worker's own stamp.
        stamps = sorted(e.time.ToMilliseconds() for e in audit.entries)
        assert stamps == sorted([ahead.finish_unix_ms, behind.finish_unix_ms])
