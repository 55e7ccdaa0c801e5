"""Sunsets and pins through the real router: gRPC over a socket, its own Redis, and the
control plane's snapshot build after each change."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.core.server import serving
from services.router.catalog import CATALOG_KEY, Catalog
from services.router.registry import WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import EdgeFlags
from tests import mtls
from tests.rpc_errors import failed_call_fields
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
MAX_TIME_S = 253_402_300_799  # 9999-12-31T23:59:59Z
NEVER_HEADER = "Fri, 31 Dec 9999 23:59:59 GMT"


class Admin:
    """RouterService as the edge calls it for a caller with the admin scope."""

    def __init__(self, stub: rpc.RouterServiceStub) -> None:
        self._stub = stub

    def __getattr__(self, rpc_name: str) -> Any:
        method = getattr(self._stub, rpc_name)
        return lambda request: method(request, metadata=list(mtls.EDGE_FOR_ADMIN), timeout=10)


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[tuple[RouterService, Admin, aioredis.Redis]]:
    """A running router on its own Redis serving model m (versions 1 and 2, on worker w1)."""
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis
    )
    service = RouterService(settings)
    client = aioredis.from_url(own_redis)
    await WorkerRegistry(client, lease_s=30).register(
        "w1", "10.0.0.1:1001", [("m", "1"), ("m", "2")], time.time()
    )
    await Catalog(client).register([("m", "1"), ("m", "2")])
    try:
        async with serving(service, settings) as running:
            async with mtls.aio_channel(running.port, peer="router") as channel:
                yield service, Admin(rpc.RouterServiceStub(channel)), client
    finally:
        await client.aclose()


def _sunset_header_sent(service: RouterService) -> bool:
    """Whether the edges' routes add the Sunset header of "never"."""
    routes = service.plane.resources(EdgeFlags()).source.by_type[RDS]["edge"]
    return NEVER_HEADER in json.dumps(routes)


def _endpoints(service: RouterService, cluster: str) -> int:
    groups = service.plane.resources(EdgeFlags()).source.by_type[EDS][cluster]["endpoints"]
    return sum(len(group["lb_endpoints"]) for group in groups)


async def test_the_largest_timestamp_as_a_sunset_is_kept_and_builds_go_on(router):
    # 9999-12-31T23:59:59.999999999Z (a common "never") read as a float is the year
    # 10000: it was stored, the RPC answered INTERNAL, and every snapshot build and
    # catalogue read raised from then on, on every replica: edges froze on their last
    # configuration (a drained worker stayed routed).
    service, admin, client = router
    never = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    answer = await admin.DeprecateModelVersion(
        pb.DeprecateModelVersionRequest(model="m", version="1", sunset_time=never)
    )
    (v1,) = [v for v in answer.model.versions if v.version == "1"]
    assert v1.sunset_time.seconds == MAX_TIME_S and v1.sunset_time.nanos == 0
    assert v1.state == router_pb2.CATALOG_VERSION_STATE_DEPRECATED
    await service.plane.refresh()
    assert _sunset_header_sent(service)
    listed = await admin.ListCatalogModels(pb.ListCatalogModelsRequest())
    assert [m.name for m in listed.models] == ["m"]
    # Builds go on: a drained worker leaves the edges' endpoints.
    assert _endpoints(service, "model:m:1") == 1
    await WorkerRegistry(client, lease_s=30).drain("w1")
    await service.plane.refresh()
    assert _endpoints(service, "model:m:1") == 0


async def test_a_stored_sunset_past_9999_reads_as_9999_instead_of_failing(router):
    # What an older router stored: builds and catalogue reads must not fail on it.
    service, admin, client = router
    stored = json.loads(await client.hget(CATALOG_KEY, "m"))
    stored["versions"][0].update(deprecated_at=time.time(), sunset_at=253_402_300_800.0)
    await client.hset(CATALOG_KEY, "m", json.dumps(stored))
    await service.plane.refresh()
    assert _sunset_header_sent(service)
    got = await admin.GetCatalogModel(pb.GetCatalogModelRequest(model="m"))
    assert got.model.versions[0].sunset_time.seconds == MAX_TIME_S


async def test_a_sunset_version_cannot_be_pinned(router):
    # The pin did nothing (a sunset version takes no traffic), yet it was reported and
    # StartRollout refused with MODEL_PINNED because of it.
    service, admin, client = router
    stored = json.loads(await client.hget(CATALOG_KEY, "m"))
    stored["versions"][0].update(deprecated_at=time.time() - 60, sunset_at=time.time() - 10)
    await client.hset(CATALOG_KEY, "m", json.dumps(stored))
    request = pb.PinModelVersionRequest(model="m", version="1")
    code, fields = await failed_call_fields(admin.PinModelVersion(request))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["version"])
    got = await admin.GetCatalogModel(pb.GetCatalogModelRequest(model="m"))
    assert got.model.pinned_version == ""
    pinned = await admin.PinModelVersion(pb.PinModelVersionRequest(model="m", version="2"))
    assert pinned.model.pinned_version == "2"


async def test_a_key_restricted_to_a_model_does_not_learn_its_fallbacks_name(router):
    # "A restricted key learns nothing of other models": its catalogue reads named
    # the fallback model of a model it may use.
    service, admin, client = router
    await Catalog(client).register([("private-b", "1")])
    await admin.SetFallbackModel(pb.SetFallbackModelRequest(model="m", fallback_model="private-b"))
    stub = admin._stub  # noqa: SLF001 - the same channel, as a restricted key's call
    restricted = [("x-tokenmesh-scopes", "models:read"), ("x-tokenmesh-models", "m")]
    got = await stub.GetCatalogModel(
        pb.GetCatalogModelRequest(model="m"), metadata=restricted, timeout=10
    )
    listed = await stub.ListCatalogModels(
        pb.ListCatalogModelsRequest(), metadata=restricted, timeout=10
    )
    assert got.model.fallback_model == "" and [m.fallback_model for m in listed.models] == [""]
    # A key that may use both (or any model) sees it.
    both = [("x-tokenmesh-scopes", "models:read"), ("x-tokenmesh-models", "m,private-b")]
    got = await stub.GetCatalogModel(
        pb.GetCatalogModelRequest(model="m"), metadata=both, timeout=10
    )
    assert got.model.fallback_model == "private-b"
