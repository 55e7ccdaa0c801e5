"""Load-aware weights and make-before-break through a real router (real Redis, its gRPC
server, heartbeats over RenewLease, resources read over ADS as an edge reads them)."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc.aio
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, struct_pb2

from services.core.server import RunningServer, serving
from services.router.load_weights import NEUTRAL_WEIGHT
from services.router.pin_store import PinStore
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, EdgeFlags
from tests import mtls
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc
from tokenmesh.type.v1.types_pb2 import ModelRef

DEADLINE_S = 20.0
# An edge of its own flavour (no auth): a flavour no poll keeps fresh while its only
# edge is away, so its reconnect builds it (ControlPlane.ensure).
EDGE_FLAGS = EdgeFlags(auth=False)


class Router:
    """A real router server and the in-process service behind it."""

    def __init__(self, service: RouterService, running: RunningServer) -> None:
        self.service = service
        self.running = running

    def channel(self, caller: str) -> grpc.aio.Channel:
        return mtls.aio_channel(self.running.port, peer="router", caller=caller)


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[Router]:
    # Leases outlast the test's heartbeats however slow the machine.
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis, lease_s=30
    )
    service = RouterService(settings)
    async with serving(service, settings) as running:
        yield Router(service, running)


class Edge:
    """One edge's ADS stream: subscribes as Envoy does, ACKs what it reads."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self.first = True

    async def subscribe(self, type_url: str, names: Sequence[str] = ()) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names))
        if self.first:  # the node (and its flavour) comes with the first request
            request.node.id = "edge-test"
            request.node.metadata.CopyFrom(
                struct_pb2.Struct(fields={"tokenmesh_auth": struct_pb2.Value(bool_value=False)})
            )
            self.first = False
        await self.call.write(request)

    async def read(self) -> discovery_pb2.DiscoveryResponse:
        """The next response, ACKed."""
        response = await asyncio.wait_for(self.call.read(), DEADLINE_S)
        assert isinstance(response, discovery_pb2.DiscoveryResponse), response
        ack = discovery_pb2.DiscoveryRequest(
            type_url=response.type_url,
            version_info=response.version_info,
            response_nonce=response.nonce,
        )
        await self.call.write(ack)
        return response

    async def close(self) -> None:
        """Ends the stream as an edge going away does (reads what was still sent)."""
        await self.call.done_writing()
        while await asyncio.wait_for(self.call.read(), DEADLINE_S) is not grpc.aio.EOF:
            pass


def _clusters(response: discovery_pb2.DiscoveryResponse) -> set[str]:
    names = set()
    for resource in response.resources:
        cluster = cluster_pb2.Cluster()
        assert resource.Unpack(cluster)
        names.add(cluster.name)
    return names


def _weights(response: discovery_pb2.DiscoveryResponse) -> dict[str, dict[int, int]]:
    """Per cluster, each endpoint's port -> load-balancing weight."""
    found: dict[str, dict[int, int]] = {}
    for resource in response.resources:
        assignment = endpoint_pb2.ClusterLoadAssignment()
        assert resource.Unpack(assignment)
        found[assignment.cluster_name] = {
            e.endpoint.address.socket_address.port_value: e.load_balancing_weight.value
            for group in assignment.endpoints
            for e in group.lb_endpoints
        }
    return found


def _routes(response: discovery_pb2.DiscoveryResponse) -> dict[str, Any]:
    (resource,) = response.resources
    route = route_pb2.RouteConfiguration()
    assert resource.Unpack(route)
    return json_format.MessageToDict(route)


async def _read_until(
    edge: Edge, type_url: str, done: Callable[[discovery_pb2.DiscoveryResponse], bool]
) -> discovery_pb2.DiscoveryResponse:
    """Reads the stream (other types too) until a response of `type_url` satisfies `done`."""
    while True:
        response = await edge.read()
        if response.type_url == type_url and done(response):
            return response


def _refs(*models: tuple[str, str]) -> list[ModelRef]:
    return [ModelRef(name=name, version=version) for name, version in models]


def _load(ttft_p50_ms: float, heads: Sequence[str] = (), model: str = "") -> router_pb2.WorkerLoad:
    """A heartbeat's load: 50 requests at `ttft_p50_ms`, and `heads` of `model` version 1
    equally hot."""
    load = router_pb2.WorkerLoad(
        max_sequences=8, ttft_samples=50, ttft_p50_ms=ttft_p50_ms, ttft_p99_ms=ttft_p50_ms
    )
    if heads:
        load.versions.append(
            router_pb2.VersionOutcomes(
                model=ModelRef(name=model, version="1"),
                requests=50 * len(heads),
                ttft_bucket_bounds_ms=[1000.0],
                ttft_bucket_counts=[50 * len(heads), 0],
                hot_prefixes=[
                    router_pb2.PrefixHeat(prefix=h, requests=50, idle_seconds=0.1) for h in heads
                ],
            )
        )
    return load


async def test_a_worker_of_two_models_weighs_in_each_cluster_against_that_clusters_workers(
    router: Router,
):
    # b serves m1 and m2: it was weighed against c, a 10x faster worker of m2 only, and
    # that one weight applied in m1's cluster too, where a is as fast as b: a kept 100
    # and b fell to 10 (~91% of m1's traffic on a), and the pins balanced m1's hot
    # heads by those weights onto a.
    a, b, c = 5001, 5002, 5003  # the workers' ports (a worker registers its own host)
    workers = {
        "a": (a, [("m1", "1")], 200.0),
        "b": (b, [("m1", "1"), ("m2", "1")], 200.0),
        "c": (c, [("m2", "1")], 20.0),
    }
    heads = {"a": [f"{i:02x}" * 8 for i in range(4)], "b": [f"{i:02x}" * 8 for i in range(4, 8)]}
    async with router.channel("worker") as channel:
        registry = rpc.WorkerRegistryServiceStub(channel)
        for worker, (port, models, _) in workers.items():
            await registry.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id=worker, address=f"127.0.0.1:{port}", models=_refs(*models)
                )
            )
        for beat in range(8):  # a weight moves a step a heartbeat: settled by the 4th
            for worker, (_, models, ttft_ms) in workers.items():
                # The last heartbeat brings m1's hot heads: pinned by settled weights.
                hot = heads.get(worker, ()) if beat == 7 else ()
                await registry.RenewLease(
                    pb.RenewLeaseRequest(
                        worker_id=worker, models=_refs(*models), load=_load(ttft_ms, hot, "m1")
                    )
                )

    async with router.channel("edge") as channel:
        edge = Edge(channel)
        await edge.subscribe(CLUSTER_TYPE)
        await edge.subscribe(ENDPOINT_TYPE, ["model:m1:1", "model:m2:1"])

        def settled(response: discovery_pb2.DiscoveryResponse) -> bool:
            return _weights(response).get("model:m2:1", {}).get(b, NEUTRAL_WEIGHT) < NEUTRAL_WEIGHT

        weights = _weights(await _read_until(edge, ENDPOINT_TYPE, settled))
        await edge.close()
    assert weights["model:m2:1"][c] == NEUTRAL_WEIGHT
    # In m1's cluster a and b are equally fast: equal weights.
    assert weights["model:m1:1"] == {a: NEUTRAL_WEIGHT, b: NEUTRAL_WEIGHT}

    # The pins of m1's heads (what the router stored from its builds) balance by m1's
    # weights too: 8 equally hot heads, equal weights, 4 each (by 100 to 10: 7 to 1).
    pins = PinStore(router.service.redis)
    deadline = time.monotonic() + DEADLINE_S
    while len(pinned := dict((await pins.load()).get(("m1", "1"), {}))) < 8:
        assert time.monotonic() < deadline, pinned
        await asyncio.sleep(0.05)
    assert collections.Counter(pinned.values()) == {f"127.0.0.1:{a}": 4, f"127.0.0.1:{b}": 4}
    shown = {w.id: (w.weight, w.weight_reason) for w in await _listed(router)}
    assert shown["a"][0] == NEUTRAL_WEIGHT
    # b's own weight is its lowest (m2's), and says which cluster it is from.
    assert shown["b"][0] < NEUTRAL_WEIGHT and "m2:1" in shown["b"][1]


async def _listed(router: Router) -> list[router_pb2.Worker]:
    """ListWorkers, as an operator sees them."""
    async with router.channel("operator") as channel:
        registry = rpc.WorkerRegistryServiceStub(channel)
        return list((await registry.ListWorkers(pb.ListWorkersRequest())).workers)


async def test_a_heartbeat_with_a_ttft_that_is_not_a_number_is_taken_as_no_sample(
    router: Router,
):
    # An infinite median raised ValueError (NaN weight) in every heartbeat of a worker
    # with no timed peer: UNKNOWN, a traceback, its lease lapsed. A NaN one read as
    # 0 ms, the best of its cluster: its peer fell toward the floor weight.
    async with router.channel("worker") as channel:
        registry = rpc.WorkerRegistryServiceStub(channel)
        for worker, port, model in (
            ("lone", 5001, "m3"),
            ("peer", 5002, "m4"),
            ("nan", 5003, "m4"),
        ):
            await registry.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id=worker, address=f"127.0.0.1:{port}", models=_refs((model, "1"))
                )
            )
        infinite = _load(math.inf)
        # Bucket bounds feed rollouts' TTFT quantiles: an infinite one is dropped too.
        infinite.versions.append(
            router_pb2.VersionOutcomes(
                model=ModelRef(name="m3", version="1"),
                requests=1,
                ttft_bucket_bounds_ms=[math.inf],
                ttft_bucket_counts=[1, 0],
            )
        )
        for _ in range(4):
            await registry.RenewLease(
                pb.RenewLeaseRequest(worker_id="lone", models=_refs(("m3", "1")), load=infinite)
            )
            for worker, ttft_ms in (("peer", 200.0), ("nan", math.nan)):
                await registry.RenewLease(
                    pb.RenewLeaseRequest(
                        worker_id=worker, models=_refs(("m4", "1")), load=_load(ttft_ms)
                    )
                )
    listed = {w.id: w for w in await _listed(router)}
    for worker in ("lone", "peer", "nan"):
        assert listed[worker].weight == NEUTRAL_WEIGHT, listed[worker].weight_reason
    for worker in ("lone", "nan"):
        shown = listed[worker].load
        assert (shown.ttft_samples, shown.ttft_p50_ms, shown.ttft_p99_ms) == (0, 0.0, 0.0)
        assert "no recent requests" in listed[worker].weight_reason
    assert list(listed["lone"].load.versions) == []


async def test_a_reconnecting_edge_keeps_a_just_dropped_cluster_until_its_linger_ends(
    router: Router,
):
    # The only edge of its flavour reconnected within the linger of a dropped cluster:
    # its rebuild skipped make-before-break (CDS without the cluster while its routes
    # still named it: 503 "no cluster"), then the next poll put the cluster back for a
    # few seconds, and it was removed again: remove, re-add (re-warm), remove. And the
    # first poll after the stream ended dropped the flavour with its lingering clusters,
    # so an edge back after Envoy's ADS retry backoff (0.5 s and more) lost them anyway.
    plane = router.service.plane
    clock = [1000.0]
    plane._clock = lambda: clock[0]  # the linger's clock, moved by hand
    # The test polls by hand (the catalogue RPCs refresh too), with the clock it moves.
    await plane.ready.wait()
    await plane.stop()
    dropped = "fallback:m:1"
    async with router.channel("operator") as channel:
        catalog = rpc.RouterServiceStub(channel)
        for model in ("m", "f"):
            await catalog.RegisterModelVersion(
                pb.RegisterModelVersionRequest(model=model, version="1")
            )
        await catalog.SetFallbackModel(pb.SetFallbackModelRequest(model="m", fallback_model="f"))
        async with router.channel("edge") as edge_channel:
            edge = Edge(edge_channel)
            await edge.subscribe(CLUSTER_TYPE)
            await edge.subscribe(ROUTE_TYPE, ["edge"])
            await _read_until(edge, CLUSTER_TYPE, lambda r: dropped in _clusters(r))
            await catalog.SetFallbackModel(pb.SetFallbackModelRequest(model="m", fallback_model=""))
            # The routes no longer name it; the cluster lingers (make before break).
            await _read_until(edge, ROUTE_TYPE, lambda r: dropped not in str(_routes(r)))
            assert dropped in plane.resources(EDGE_FLAGS).source.by_type[CLUSTER_TYPE]
            await edge.close()
    deadline = time.monotonic() + DEADLINE_S
    while EDGE_FLAGS in plane._users:  # the router saw the stream end
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    for _ in range(4):  # polls while Envoy backs off before it reconnects
        clock[0] += 0.25
        await plane.refresh()

    async with router.channel("edge") as channel:
        edge = Edge(channel)
        await edge.subscribe(CLUSTER_TYPE)
        first = await edge.read()
        assert dropped in _clusters(first)  # the reconnected edge's routes may name it
        await plane.refresh()
        assert dropped in plane.resources(EDGE_FLAGS).source.by_type[CLUSTER_TYPE]
        clock[0] += 4.0  # CLUSTER_LINGER_S after the cluster was dropped
        await plane.refresh()
        await _read_until(edge, CLUSTER_TYPE, lambda r: dropped not in _clusters(r))
        for _ in range(3):  # and it stays gone
            await plane.refresh()
            assert dropped not in plane.resources(EDGE_FLAGS).source.by_type[CLUSTER_TYPE]
        await edge.close()


def _pending_outbox_reads() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") == "Outbox.get"
    ]


async def test_an_edge_that_goes_away_leaves_no_read_of_its_stream_pending(router: Router):
    # An Envoy that disconnects cancels the stream's handler while it waits for the
    # next response: its read of the stream's outbox stayed pending for good, one task
    # a stream ("Task was destroyed but it is pending!" in the router's log).
    plane = router.service.plane
    await plane.ready.wait()
    async with router.channel("edge") as channel:
        edge = Edge(channel)
        await edge.subscribe(CLUSTER_TYPE)
        await edge.read()
        assert _pending_outbox_reads()  # the handler waits for the next response
        edge.call.cancel()
        deadline = time.monotonic() + DEADLINE_S
        while EDGE_FLAGS in plane._users or _pending_outbox_reads():
            assert time.monotonic() < deadline, _pending_outbox_reads()
            await asyncio.sleep(0.01)
