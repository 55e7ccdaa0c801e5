"""Usage v2 against a real Redis and a real usage server: dimensions, prices at metering time."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2

from services.core.pricing import Price
from services.core.server import serving
from services.router import catalog as cat
from services.router.catalog import Catalog
from services.usage import meter as meter_module
from services.usage.dimensions import DIMENSION_FIELD_CAPS, TAG_FIELDS
from services.usage.meter import Meter, Retention, bucket_start, dimension_key
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as v1_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as v1_rpc
from tokenmesh.usage.v2 import usage_service_pb2 as pb
from tokenmesh.usage.v2 import usage_service_pb2_grpc as rpc


def _event(
    model: str,
    key: str,
    prompt: int,
    completion: int,
    finish_ms: int,
    cached: int = 0,
    metadata: dict[str, str] | None = None,
    api_version: str = "v2",
    tenant: str = "acme",
) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=uuid.uuid4().hex,
        key_id=key,
        tenant=tenant,
        finish_reason="stop",
        model=types_pb2.ModelRef(name=model, version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=prompt, completion_tokens=completion),
        cached_prompt_tokens=cached,
        finish_unix_ms=finish_ms,
        metadata=metadata or {},
        api_version=api_version,
    )


@pytest.fixture
async def setup(redis_url):
    client = aioredis.from_url(redis_url)
    stream = f"usage-test:{uuid.uuid4().hex}"
    meter = Meter(client, stream, "meter", "c1", Retention())
    await meter.ensure_group()
    model = f"priced-{uuid.uuid4().hex[:8]}"  # the catalogue is shared by every test
    await Catalog(client).change(model, lambda current, _: cat.add_version(current, model, "1", 0))
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=stream,
    )
    async with serving(UsageService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            yield client, stream, meter, model, channel
    await client.aclose()


async def _meter(client, stream: str, meter: Meter, *events: inference_pb2.UsageEvent) -> None:
    for event in events:
        await client.xadd(
            stream, {"request_id": event.request_id, "event": event.SerializeToString()}
        )
    while await meter.run_once(block_ms=50):
        pass


def _headers(key: str, scopes: str = "usage:read") -> list[tuple[str, str]]:
    return [
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-tenant", "acme"),
        ("x-tokenmesh-scopes", scopes),
    ]


async def _set_price(client, model: str, price: Price | None, at: float) -> None:
    await Catalog(client).update(model, lambda m, _: cat.set_price(m, "1", price, at))


async def test_each_request_costs_the_price_in_effect_when_it_finished(setup):
    client, stream, meter, model, channel = setup
    key = f"key_{uuid.uuid4().hex[:8]}"
    now = time.time()
    await _set_price(client, model, Price(Decimal("1"), Decimal("2")), now - 60)
    await _set_price(client, model, Price(Decimal("10"), Decimal("20"), Decimal("5")), now - 30)
    ms = int(now * 1000)
    events = [
        _event(model, key, 1_000_000, 1_000_000, ms - 90_000),  # before any price
        _event(model, key, 1_000_000, 1_000_000, ms - 45_000, metadata={"team": "a"}),
        _event(model, key, 1_000_000, 0, ms - 1_000, cached=500_000, metadata={"team": "b"}),
    ]
    await _meter(client, stream, meter, *events, events[1])  # a replay counts once
    stub = rpc.UsageServiceStub(channel)
    start = pb.GetUsageRequest(group_by="tag:team")
    start.start_time.FromSeconds(int(now) - 3600)
    report = await stub.GetUsage(start, metadata=_headers(key))
    groups = {g.value: g.totals for g in report.groups}
    assert set(groups) == {"", "a", "b"}
    assert (groups["a"].cost.total, groups["a"].cost.completion) == ("3", "2")
    b = groups["b"]
    assert (b.cached_prompt_tokens, b.cost.prompt, b.cost.cached_prompt, b.cost.total) == (
        500_000,
        "5",
        "2.5",
        "7.5",
    )
    assert not groups[""].HasField("cost") and groups[""].unpriced_requests == 1
    assert groups[""].unpriced_tokens == 2_000_000
    assert report.totals.requests == 3 and report.totals.cost.total == "10.5"
    # v1 and v2 report the same totals from the same buckets.
    v1 = await v1_rpc.UsageServiceStub(channel).GetUsage(
        v1_pb.GetUsageRequest(start_time=start.start_time), metadata=_headers(key)
    )
    assert (v1.requests, v1.total_tokens) == (report.totals.requests, report.totals.total_tokens)


async def test_group_by_api_version_version_and_key_within_a_tenant(setup):
    client, stream, meter, model, channel = setup
    tenant_key, other_key = f"key_{uuid.uuid4().hex[:8]}", f"key_{uuid.uuid4().hex[:8]}"
    ms = int(time.time() * 1000)
    await _meter(
        client,
        stream,
        meter,
        _event(model, tenant_key, 3, 4, ms, api_version="v1"),
        _event(model, tenant_key, 5, 6, ms, api_version="v2"),
        _event(model, other_key, 1, 1, ms, api_version="v2"),
    )
    stub = rpc.UsageServiceStub(channel)
    by_api = await stub.GetUsage(
        pb.GetUsageRequest(group_by="api_version"), metadata=_headers(tenant_key)
    )
    assert {g.value: g.totals.total_tokens for g in by_api.groups} == {"v1": 7, "v2": 11}
    by_version = await stub.GetUsage(
        pb.GetUsageRequest(group_by="version"), metadata=_headers(tenant_key)
    )
    assert [(g.value, g.model, g.version) for g in by_version.groups] == [
        (f"{model}@1", model, "1")
    ]
    by_key = await stub.GetUsage(
        pb.GetUsageRequest(tenant="acme", group_by="key"), metadata=_headers(tenant_key)
    )
    keys = {g.value: g.totals.requests for g in by_key.groups}
    assert keys[tenant_key] == 2 and keys[other_key] == 1


async def test_callers_see_what_v1_lets_them_see_and_bad_group_by_names_the_field(setup):
    *_, channel = setup
    stub = rpc.UsageServiceStub(channel)
    for request in (pb.GetUsageRequest(tenant="other"), pb.GetUsageRequest(key_id="key_other")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetUsage(request, metadata=_headers("key_a"))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = await stub.GetUsage(pb.GetUsageRequest(tenant="other"), metadata=_headers("k", "admin"))
    assert admin.totals.requests == 0 and admin.group_by == "model"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUsage(pb.GetUsageRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUsage(pb.GetUsageRequest(group_by="team"), metadata=_headers("key_a"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(
        dict(info.value.trailing_metadata())["grpc-status-details-bin"]
    )
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details)
    assert [v.field for v in bad_request.field_violations] == ["group_by"]


async def test_tag_values_past_the_bound_count_as_other_then_not_by_tag(setup, monkeypatch):
    client, stream, meter, model, channel = setup
    monkeypatch.setattr(meter_module, "MAX_DIMENSION_FIELDS", 12)  # 3 tag rows of 4 counters
    key = f"key_{uuid.uuid4().hex[:8]}"
    ms = int(time.time() * 1000)
    # The base, key and tenant rows do not count: only tag rows (their fields).
    events = [_event(model, key, 1, 1, ms, metadata={"id": f"v{i}"}) for i in range(5)]
    await _meter(client, stream, meter, *events)
    report = await rpc.UsageServiceStub(channel).GetUsage(
        pb.GetUsageRequest(group_by="tag:id"), metadata=_headers(key)
    )
    groups = {g.value: g.totals.requests for g in report.groups}
    assert groups == {"v0": 1, "v1": 1, "v2": 1, "(other)": 2}
    month = dimension_key(f"key:{key}", "month", bucket_start(ms / 1000, "month"))
    assert int(await client.hget(month, TAG_FIELDS)) == 16  # 3 rows and (other)
    # Another tag key gets an (other) row up to twice the bound; past it, none at all.
    await _meter(client, stream, meter, _event(model, key, 1, 1, ms, metadata={"k2": "x"}))
    await _meter(client, stream, meter, _event(model, key, 1, 1, ms, metadata={"k3": "y"}))
    await _meter(client, stream, meter, _event(model, key, 1, 1, ms, metadata={"k4": "z"}))
    assert int(await client.hget(month, TAG_FIELDS)) == 24
    report = await rpc.UsageServiceStub(channel).GetUsage(
        pb.GetUsageRequest(group_by="tag:k3"), metadata=_headers(key)
    )
    assert {g.value: g.totals.requests for g in report.groups} == {"(other)": 1, "": 7}
    report = await rpc.UsageServiceStub(channel).GetUsage(
        pb.GetUsageRequest(group_by="tag:k4"), metadata=_headers(key)
    )
    assert [(g.value, g.totals.requests) for g in report.groups] == [("", 8)]


async def test_key_rows_leave_a_shared_buckets_tag_rows_their_room(setup):
    # The cap counted every field: in a tenant's (or the mesh's) minute bucket the
    # rows of ~30 active keys left a new tag value no row at all, not even (other).
    client, stream, meter, model, channel = setup
    ms = int(time.time() * 1000)
    tenant = f"t-{uuid.uuid4().hex[:6]}"  # a bucket of its own
    keys = [f"key_{uuid.uuid4().hex[:8]}" for _ in range(40)]
    await _meter(
        client,
        stream,
        meter,
        *(_event(model, k, 1, 1, ms, metadata={"team": "a"}, tenant=tenant) for k in keys),
    )
    last = _event(model, keys[0], 1, 1, ms, metadata={"team": "b"}, tenant=tenant)
    await _meter(client, stream, meter, last)
    minute = dimension_key(f"tenant:{tenant}", "minute", bucket_start(ms / 1000, "minute"))
    fields = await client.hkeys(minute)
    assert any(b'"tag:team": "b"' in f or b'"tag:team":"b"' in f for f in fields), fields[:5]


async def test_a_key_sending_unique_tag_values_is_bounded_per_granularity(setup):
    # One cap of 20,000 fields for every bucket: a key sending unique tag values made
    # ~334 KB of Redis a request (16 tags, 12 hashes), its minute hashes kept 2 days.
    client, stream, meter, model, channel = setup
    key = f"key_{uuid.uuid4().hex[:8]}"
    ms = int(time.time() * 1000)
    events = [
        _event(model, key, 1, 1, ms, metadata={f"t{j}": f"{i}-{j}" + "v" * 200 for j in range(4)})
        for i in range(80)
    ]
    await _meter(client, stream, meter, *events)
    for granularity, cap in DIMENSION_FIELD_CAPS.items():
        dim = dimension_key(f"key:{key}", granularity, bucket_start(ms / 1000, granularity))
        assert await client.hlen(dim) <= 2 * cap, granularity
    # Totals stay exact: what no row of its own counts is "(other)", then "".
    report = await rpc.UsageServiceStub(channel).GetUsage(
        pb.GetUsageRequest(group_by="tag:t0"), metadata=_headers(key)
    )
    assert sum(g.totals.requests for g in report.groups) == report.totals.requests == 80
    assert {"(other)"} <= {g.value for g in report.groups}


async def test_the_mesh_s_own_accounts_are_read_by_admins_only(setup):
    # tokenmesh.shadow holds every tenant's shadow copies and their request tags: a key
    # of it made before the names were reserved read them all with usage:read.
    *_, channel = setup
    stub = rpc.UsageServiceStub(channel)
    shadow_key = [
        ("x-tokenmesh-key-id", "key_old"),
        ("x-tokenmesh-tenant", "tokenmesh.shadow"),
        ("x-tokenmesh-scopes", "usage:read"),
    ]
    request = pb.GetUsageRequest(tenant="tokenmesh.shadow", group_by="tag:user")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUsage(request, metadata=shadow_key)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await stub.GetUsage(request, metadata=_headers("k", "admin"))).group_by == "tag:user"
