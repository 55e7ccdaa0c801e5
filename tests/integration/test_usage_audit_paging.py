"""The audit log listing against a real Redis and the real usage service: pages stay
put while requests are metered between them (keyset page tokens, a pinned range)."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.core.server import serving
from services.usage.meter import Meter, Retention, audit_entry_of
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tests.rpc_errors import violated_fields
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as rpc

ADMIN = (
    ("x-tokenmesh-key-id", "key_admin"),
    ("x-tokenmesh-tenant", "admin"),
    ("x-tokenmesh-scopes", "admin"),
)


@dataclass
class Audit:
    """A tenant of its own, a meter that applies what the test publishes, and the service."""

    tenant: str
    stream: str
    client: aioredis.Redis
    meter: Meter
    stub: rpc.UsageServiceStub

    async def meter_events(self, *events: tuple[str, int] | tuple[str, int, str]) -> None:
        """Meters events (request id, finish ms[, event id]) of the tenant; returns once all
        are applied."""
        for request_id, finish_ms, *event_id in events:
            event = inference_pb2.UsageEvent(
                request_id=request_id,
                # Metered-once markers are global: an id of this test's own.
                event_id=f"{self.tenant}:{event_id[0] if event_id else request_id}",
                key_id="key_x",
                tenant=self.tenant,
                finish_reason="stop",
                model=types_pb2.ModelRef(name="demo-lm", version="1"),
                usage=types_pb2.TokenUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
                finish_unix_ms=finish_ms,
            )
            await self.client.xadd(
                self.stream, {"request_id": request_id, "event": event.SerializeToString()}
            )
        # The service meters the same stream; whichever meter applies an event first,
        # it is in the audit log once this meter has read past it.
        while await self.meter.run_once(block_ms=50):
            pass

    async def page(
        self, token: str = "", end_time: timestamp_pb2.Timestamp | None = None
    ) -> pb.ListAuditEntriesResponse:
        request = pb.ListAuditEntriesRequest(
            tenant=self.tenant, page_size=2, page_token=token, end_time=end_time
        )
        return await self.stub.ListAuditEntries(request, metadata=ADMIN)  # type: ignore[misc,no-any-return]


@asynccontextmanager
async def _audit(redis_url: str) -> AsyncIterator[Audit]:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    stream = f"usage-test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    meter = Meter(client, stream, "meter", "c", Retention())
    await meter.ensure_group()
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=stream,
    )
    try:
        async with serving(UsageService(settings), settings) as running:
            async with mtls.aio_channel(running.port, peer="usage") as channel:
                yield Audit(tenant, stream, client, meter, rpc.UsageServiceStub(channel))
    finally:
        await client.aclose()


async def test_pages_list_every_entry_once_while_requests_are_metered(redis_url):
    async with _audit(redis_url) as audit:
        base = int(time.time() * 1000) - 60_000
        # Newest first: a8 a7 a6, then a3 a4 a5 (one millisecond: a page ends inside
        # them), a2 a1 a0.
        times = [0, 1000, 2000, 3000, 3000, 3000, 4000, 5000, 6000]
        before = [(f"a{i}", base + t) for i, t in enumerate(times)]
        await audit.meter_events(*before)

        listed: list[tuple[str, int]] = []
        page = await audit.page()
        # Nine entries, two a page: five pages. A listing that takes in what is
        # metered meanwhile (three entries a page here) would never end.
        for _ in range(10):
            listed += [(e.request_id, e.time.ToMilliseconds()) for e in page.entries]
            if not page.next_page_token:
                break
            n = len(listed)
            await audit.meter_events(
                # a request that finished after the listing started: past its end,
                (f"new{n}", int(time.time() * 1000) + 1),
                # one shipped late from a spool into the pages already read,
                (f"late-read{n}", listed[-1][1] + 1),
                # and one shipped late into what is still to be read.
                (f"late-ahead{n}", base + 500 - n),
            )
            page = await audit.page(page.next_page_token)
        else:
            pytest.fail(f"the listing did not end; listed so far: {listed}")

        ids = [request_id for request_id, _ in listed]
        assert len(ids) == len(set(ids)), f"listed twice: {ids}"
        ahead = {i for i in ids if i.startswith("late-ahead")}
        assert set(ids) - ahead == {request_id for request_id, _ in before}
        # Late into the range still ahead: listed, once, in its place. Newer than the
        # listing's end, or late into pages already read: on no page of this listing.
        assert ahead, "entries metered into the range still ahead are listed"
        assert [t for _, t in listed] == sorted((t for _, t in listed), reverse=True)


async def test_a_page_token_resumes_only_its_own_listing(redis_url):
    async with _audit(redis_url) as audit:
        base = int(time.time() * 1000) - 60_000
        await audit.meter_events(*((f"b{i}", base + i) for i in range(5)))
        end = timestamp_pb2.Timestamp()
        end.FromMilliseconds(base + 4)  # b4 is past the end
        first = await audit.page(end_time=end)
        assert [e.request_id for e in first.entries] == ["b3", "b2"]
        # The first page's range, sent again with its token, is the same listing.
        second = await audit.page(first.next_page_token, end_time=end)
        assert [e.request_id for e in second.entries] == ["b1", "b0"]
        assert not second.next_page_token

        other_end = timestamp_pb2.Timestamp()
        other_end.FromMilliseconds(base + 5)
        refused = {
            # an offset token of the earlier version: it cannot resume a listing exactly
            "2": "page_token",
            "not-a-token": "page_token",
            first.next_page_token.rsplit(".", 1)[0]: "page_token",
            first.next_page_token.replace("3.", "4.", 1): "page_token",
        }
        for token, field in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await audit.page(token)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
            assert violated_fields(info.value) == [field], token
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit.page(first.next_page_token, end_time=other_end)
        assert violated_fields(info.value) == ["end_time"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit.stub.ListAuditEntries(
                pb.ListAuditEntriesRequest(tenant="another", page_token=first.next_page_token),
                metadata=ADMIN,
            )
        assert violated_fields(info.value) == ["page_token"]


DAY_MS = 86_400_000


async def test_an_event_stamped_far_ahead_does_not_erase_the_tenants_log(redis_url):
    """The log was trimmed from each new entry's stamp, a worker's clock: one event
    stamped 100 days ahead deleted every entry of its tenant. It is trimmed by Redis's
    clock now, and a stamp far ahead is kept at most 5 minutes ahead."""
    async with _audit(redis_url) as audit:
        now_ms = int(time.time() * 1000)
        await audit.meter_events(*((f"r{i}", now_ms - 60_000 + i) for i in range(3)))
        await audit.meter_events(("ahead", now_ms + 100 * DAY_MS))  # applied alone
        await audit.meter_events(("ahead-1", now_ms + 100 * DAY_MS), ("ahead-2", now_ms))
        key = f"tm:usage:audit:{audit.tenant}"
        scores = dict(await audit.client.zrange(key, 0, -1, withscores=True))
        assert len(scores) == 6
        assert max(scores.values()) <= now_ms + 5 * 60_000 + 10_000


async def test_the_log_keeps_its_retention_without_new_entries(redis_url):
    """An entry older than the retention was stored for good, and the log never
    expired: a tenant that went quiet kept its entries for good. An event stamped
    behind the dedupe window (a worker's clock far off) is listed where it counts,
    7 days back, with the worker's stamp, and goes with the retention from there."""
    async with _audit(redis_url) as audit:
        now_ms = int(time.time() * 1000)
        retention_ms = Retention().audit * 1000
        old_ms = now_ms - retention_ms - DAY_MS
        await audit.meter_events(("old", old_ms), ("new", now_ms))
        key = f"tm:usage:audit:{audit.tenant}"
        scores = sorted(
            score for _, score in await audit.client.zrange(key, 0, -1, withscores=True)
        )
        assert len(scores) == 2
        assert abs(scores[0] - (now_ms - Retention().dedupe * 1000)) < 60_000
        ttl_ms = await audit.client.pttl(key)
        assert retention_ms - 60_000 < ttl_ms <= retention_ms + 5 * 60_000
        listed = await audit.page()
        assert [e.time.ToMilliseconds() for e in listed.entries] == [now_ms, old_ms]


async def test_a_swapped_range_is_refused_not_answered_empty(redis_url):
    async with _audit(redis_url) as audit:
        start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
        now_ms = int(time.time() * 1000)
        start.FromMilliseconds(now_ms + 3_600_000)
        end.FromMilliseconds(now_ms - 3_600_000)
        request = pb.ListAuditEntriesRequest(tenant=audit.tenant, start_time=start, end_time=end)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit.stub.ListAuditEntries(request, metadata=ADMIN)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(info.value) == ["start_time"]


async def test_an_operator_reads_the_log_with_its_certificate(redis_url):
    """The caller rules let the operator identity list audit entries; the service then
    refused it for want of the edge's identity headers (which only the edge may send)."""
    async with _audit(redis_url) as audit:
        await audit.meter_events(("op", int(time.time() * 1000)))
        settings = UsageSettings(
            pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=redis_url
        )
        async with serving(UsageService(settings), settings) as running:
            async with mtls.aio_channel(running.port, peer="usage", caller="operator") as channel:
                reply = await rpc.UsageServiceStub(channel).ListAuditEntries(
                    pb.ListAuditEntriesRequest(tenant=audit.tenant)
                )
        assert [e.request_id for e in reply.entries] == ["op"]


async def test_two_requests_under_one_request_id_are_two_entries(redis_url):
    # A legacy completion's prompts share the edge's request id (a caller may reuse its
    # own): two entries of the same bytes were one member of the log's sorted set, and
    # the log listed one request where the bill counted two.
    async with _audit(redis_url) as audit:
        finish_ms = int(time.time() * 1000) - 1000
        await audit.meter_events(
            ("edge-request", finish_ms, "prompt-0"), ("edge-request", finish_ms, "prompt-1")
        )
        entries = (await audit.page()).entries
        assert sorted(e.event_id for e in entries) == [
            f"{audit.tenant}:prompt-0",
            f"{audit.tenant}:prompt-1",
        ]


async def test_entries_are_stored_as_bytes_and_hex_ones_still_list(redis_url):
    """Entries were stored as hex, twice their bytes (~0.47 KB a request for the 90-day
    retention: ~380 GB at 100 requests/s). Those written before still list, in one
    listing with the new ones, and a page token of the earlier version resumes."""
    async with _audit(redis_url) as audit:
        base = int(time.time() * 1000) - 60_000
        key = f"tm:usage:audit:{audit.tenant}"
        for i in range(3):  # as the meter wrote them before
            entry = usage_pb2.AuditEntry(request_id=f"hex{i}", tenant=audit.tenant)
            entry.time.FromMilliseconds(base + i)
            await audit.client.zadd(key, {entry.SerializeToString().hex(): base + i})
        await audit.meter_events(*((f"raw{i}", base + 10 + i) for i in range(2)))
        members = await audit.client.zrangebyscore(key, base + 10, "+inf")
        for member in members:
            assert member.startswith(b"\x00")
            assert audit_entry_of(member).SerializeToString() == member[1:]

        listed: list[str] = []
        token = ""
        for _ in range(5):
            page = await audit.page(token)
            listed += [e.request_id for e in page.entries]
            token = page.next_page_token
            if not token:
                break
        assert listed == ["raw1", "raw0", "hex2", "hex1", "hex0"]
        # A token of the earlier version carried a hex member's entry bytes.
        first = await audit.page()
        second = await audit.page(first.next_page_token)
        assert [e.request_id for e in second.entries] == ["hex2", "hex1"]
        version, *fields, _ = second.next_page_token.split(".")
        assert version == "3"
        old_token = ".".join(["2", *fields, _packed("hex1", audit.tenant, base + 1)])
        assert [e.request_id for e in (await audit.page(old_token)).entries] == ["hex0"]


def _packed(request_id: str, tenant: str, finish_ms: int) -> str:
    """A version-2 token's last field: the entry's bytes (its hex member decoded)."""
    entry = usage_pb2.AuditEntry(request_id=request_id, tenant=tenant)
    entry.time.FromMilliseconds(finish_ms)
    return base64.urlsafe_b64encode(entry.SerializeToString()).decode().rstrip("=")
