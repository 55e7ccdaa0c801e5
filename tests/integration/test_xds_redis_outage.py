"""An edge that (re)starts while Redis is away gets the router's last configuration.

The poll kept serving the last snapshot to connected edges during an outage, but
a new stream (a restarted edge, a new pod, `make run`'s only edge) made the router
build its flavour from Redis: the build failed, the stream ended, again and again,
and the edge served no route until Redis was back, although the router held it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from services.core.server import RunningServer, serving
from services.router import xds
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import CLUSTER_TYPE
from tests import mtls
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc
from tokenmesh.type.v1.types_pb2 import ModelRef


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[tuple[RunningServer, str]]:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis, lease_s=30
    )
    async with serving(RouterService(settings), settings) as running:
        yield running, own_redis


def _first_request() -> discovery_pb2.DiscoveryRequest:
    """An edge's first request, as production bootstraps it (its SDS directory named)."""
    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE)
    request.node.id = "edge-1"
    sds = struct_pb2.Value(string_value="/var/run/tokenmesh/pki")
    request.node.metadata.CopyFrom(struct_pb2.Struct(fields={"tokenmesh_sds_dir": sds}))
    return request


async def _clusters_a_new_edge_gets(port: int) -> int | None:
    """Opens an ADS stream as a starting Envoy does; the clusters it gets (None: none)."""
    async with mtls.aio_channel(port, peer="router", caller="edge") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(_first_request())
        try:
            response = await asyncio.wait_for(call.read(), 15)
        except grpc.aio.AioRpcError:
            return None
        finally:
            call.cancel()
        return None if response is grpc.aio.EOF else len(response.resources)


async def test_a_new_edge_gets_the_last_configuration_while_redis_is_down(
    router: tuple[RunningServer, str],
) -> None:
    running, url = router
    async with mtls.aio_channel(running.port, peer="router", caller="worker") as channel:
        request = pb.RegisterWorkerRequest(
            worker_id="w1",
            address="127.0.0.1:40001",
            models=[ModelRef(name="m", version="1")],
            lease_token="t" * 40,
        )
        await rpc.WorkerRegistryServiceStub(channel).RegisterWorker(request, timeout=30)
    served = await _clusters_a_new_edge_gets(running.port)
    assert served is not None and served >= 2
    redis = aioredis.from_url(url)
    with contextlib.suppress(Exception):  # the connection drops as Redis exits
        await redis.shutdown(nosave=True)
    await redis.aclose()
    for _ in range(2):  # a restarting edge, then another
        assert await _clusters_a_new_edge_gets(running.port) == served


def _rejected(type_name: str = "Cluster") -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("tokenmesh_xds_rejected_configs", {"type": type_name})
    return value or 0.0


async def test_a_rejected_configuration_shows_until_the_envoy_accepts_one(
    router: tuple[RunningServer, str],
) -> None:
    # A NACK was a log line: the edge kept its previous config, every routing change
    # since (rollbacks included) not applied, while the catalogue said it was.
    running, _ = router
    before = _rejected()
    async with mtls.aio_channel(running.port, peer="router", caller="edge") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(_first_request())
        sent = await asyncio.wait_for(call.read(), 15)
        assert sent is not grpc.aio.EOF
        nack = discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER_TYPE, response_nonce=sent.nonce, version_info=""
        )
        nack.error_detail.message = "rejected for the test"
        await call.write(nack)
        async with asyncio.timeout(10):
            while _rejected() != before + 1:
                await asyncio.sleep(0.02)
        ack = discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER_TYPE, response_nonce=sent.nonce, version_info=sent.version_info
        )
        await call.write(ack)
        async with asyncio.timeout(10):
            while _rejected() != before:
                await asyncio.sleep(0.02)
        await call.write(nack)  # rejected again, then the stream goes: no longer counted
        async with asyncio.timeout(10):
            while _rejected() != before + 1:
                await asyncio.sleep(0.02)
        call.cancel()
    async with asyncio.timeout(10):
        while _rejected() != before:
            await asyncio.sleep(0.02)


async def test_a_failure_queueing_a_change_ends_the_stream_instead_of_freezing_it(
    router: tuple[RunningServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream waited only on its reader and the router's stop: a bug in the task
    # that queues changes ended that task alone, the stream stayed open and its Envoy
    # kept a config no change reached again. Now the stream ends with the failure
    # and the Envoy opens a new one (which gets the whole current config).
    running, _ = router
    async with mtls.aio_channel(running.port, peer="router", caller="edge") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(_first_request())
        sent = await asyncio.wait_for(call.read(), 15)
        assert sent is not grpc.aio.EOF

        def a_bug(self: object) -> None:
            raise RuntimeError("a bug queueing changes, injected by the test")

        monkeypatch.setattr(xds._Stream, "send_all", a_bug)
        async with mtls.aio_channel(running.port, peer="router", caller="worker") as worker:
            request = pb.RegisterWorkerRequest(
                worker_id="w-change",
                address="127.0.0.1:40002",
                models=[ModelRef(name="m", version="1")],
                lease_token="c" * 40,
            )
            await rpc.WorkerRegistryServiceStub(worker).RegisterWorker(request, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 15)  # old code: open, silent, timed out
        assert ended.value.code() == grpc.StatusCode.INTERNAL  # the boundary logs it
        assert "injected" not in (ended.value.details() or "")  # no internals to the peer
