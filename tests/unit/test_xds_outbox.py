"""A slow Envoy cannot make the control plane's memory grow: one pending response per type."""

from __future__ import annotations

import asyncio

from envoy.service.discovery.v3 import discovery_pb2

from services.router import catalog as cat
from services.router.snapshot import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE
from services.router.xds import TYPE_ORDER, Outbox, _Stream
from tests.unit.test_router import _plane, _request, two_versions

CHANGES = 200


def _drain(stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
    out = []
    while not stream.outbox.empty():
        out.append(stream.outbox.get_nowait())
    return out


def test_a_stream_that_is_not_read_keeps_only_the_latest_response_per_type():
    async def scenario():
        plane, state = _plane()
        await plane.refresh()
        stream = _Stream(plane, "slow-envoy")
        await stream.on_request(_request(CLUSTER_TYPE, node=True))
        await stream.on_request(_request(ROUTE_TYPE))
        for i in range(CHANGES):  # the Envoy reads nothing meanwhile
            split = {"1": i % 101, "2": 100 - i % 101}
            state["models"] = {"m": cat.set_split(two_versions(), split)}
            await plane.refresh()
            stream.send_all()  # what the stream's watcher does on every change
        pending = _drain(stream)
        assert len(pending) <= len(TYPE_ORDER), f"{len(pending)} responses queued"
        routes = [r for r in pending if r.type_url == ROUTE_TYPE]
        assert len(routes) == 1
        latest = plane.resources(stream.flags).versions[ROUTE_TYPE]
        assert routes[0].version_info == latest
        # The one delivered is the one the stream waits to hear about: its ACK counts.
        await stream.on_request(_request(ROUTE_TYPE, routes[0].nonce, latest))
        assert stream.subscriptions[ROUTE_TYPE].acked_version == latest
        assert stream.outbox.empty()

    asyncio.run(scenario())


def _response(type_url: str, version: str) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version)


def test_the_outbox_replaces_per_type_and_sends_clusters_first():
    outbox = Outbox()
    for version in ("1", "2", "3"):
        for type_url in reversed(TYPE_ORDER):
            outbox.put(_response(type_url, version))
    assert len(outbox) == len(TYPE_ORDER)
    sent = [outbox.get_nowait() for _ in TYPE_ORDER]
    assert [r.type_url for r in sent] == [CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE]
    assert {r.version_info for r in sent} == {"3"}
    assert outbox.empty()


def test_a_reader_waits_for_the_next_response():
    async def scenario():
        outbox = Outbox()
        reader = asyncio.create_task(outbox.get())
        await asyncio.sleep(0)
        assert not reader.done()
        outbox.put(_response(ROUTE_TYPE, "7"))
        assert (await asyncio.wait_for(reader, 5)).version_info == "7"
        assert outbox.empty()
        # A reader cancelled while waiting takes nothing with it.
        waiting = asyncio.create_task(outbox.get())
        await asyncio.sleep(0)
        waiting.cancel()
        outbox.put(_response(CLUSTER_TYPE, "8"))
        assert outbox.get_nowait().version_info == "8"

    asyncio.run(scenario())
