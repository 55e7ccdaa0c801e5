"""A model placed on worker pools is registered and routed only by those pools' workers.

Every worker used to hold the one shared `worker` certificate, so any holder of it
could register any model version and join its cluster at the edge. A pool's workers
now hold `worker-<pool>`, and an operator places a model on pools (`tokenmesh models
pools`). A real router over real mTLS handshakes, each call made with the
certificate of the identity it names, and the control plane's snapshot after each
change.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from services.core import contract, pki
from services.core.server import serving
from services.router.registry import WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import EdgeFlags, model_cluster
from tests import mtls
from tests.rpc_errors import failed_call_reason
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc
from tokenmesh.type.v1 import types_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TOKEN = "t" * 43
EDGE = EdgeFlags(sds_dir="/sds")  # an edge over mTLS: its clusters verify certificates
READY = inference_pb2.ModelVersionState.MODEL_VERSION_STATE_READY


class Mesh:
    """The router, and stubs that call it with one identity's certificate each."""

    def __init__(self, service: RouterService, port: int) -> None:
        self.service = service
        self.port = port

    def registry(self, caller: str) -> rpc.WorkerRegistryServiceAsyncStub:
        return rpc.WorkerRegistryServiceStub(mtls.aio_channel(self.port, "router", caller))

    def catalogue(self, caller: str = "operator") -> rpc.RouterServiceAsyncStub:
        return rpc.RouterServiceStub(mtls.aio_channel(self.port, "router", caller))

    def resources(self) -> Any:
        return self.service.plane.resources(EDGE).source.by_type


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[Mesh]:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis
    )
    service = RouterService(settings)
    async with serving(service, settings) as running:
        await service.plane.ensure(EDGE)  # as an edge's stream does: built on each change
        yield Mesh(service, running.port)


def _register(model: str, address: str) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(
        worker_id=f"w-{uuid.uuid4().hex[:8]}",
        address=address,
        models=[types_pb2.ModelRef(name=model, version="1")],
        lease_token=TOKEN,
    )


async def _place(mesh: Mesh, model: str, *pools: str) -> pb.SetModelWorkerPoolsResponse:
    catalogue = mesh.catalogue()
    await catalogue.RegisterModelVersion(
        pb.RegisterModelVersionRequest(model=model, version="1", weight=100)
    )
    return await catalogue.SetModelWorkerPools(
        pb.SetModelWorkerPoolsRequest(model=model, worker_pools=list(pools))
    )


async def _healthy(mesh: Mesh, model: str) -> int:
    reply = await mesh.catalogue().GetCatalogModel(pb.GetCatalogModelRequest(model=model))
    return reply.model.versions[0].healthy_workers


def _endpoint_ports(mesh: Mesh, model: str) -> list[int]:
    groups = mesh.resources()[EDS][model_cluster(model, "1")]["endpoints"]
    return sorted(
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for group in groups
        for e in group["lb_endpoints"]
    )


async def test_only_the_placed_pools_workers_register_a_placed_model(router):
    placed = await _place(router, "m", "gpu")
    assert list(placed.model.worker_pools) == ["gpu"]
    for outsider in ("worker", "worker-cpu"):
        call = router.registry(outsider).RegisterWorker(_register("m", "127.0.0.1:7001"))
        refused = await failed_call_reason(call)
        assert refused == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ON_WORKER_POOL")
    await router.registry("worker-gpu").RegisterWorker(_register("m", "127.0.0.1:7002"))
    workers = (await router.registry("operator").ListWorkers(pb.ListWorkersRequest())).workers
    assert [(w.address, w.pool) for w in workers] == [("127.0.0.1:7002", "gpu")]
    assert await _healthy(router, "m") == 1
    assert _endpoint_ports(router, "m") == [7002]


async def test_a_model_placed_later_leaves_the_other_pools_workers_unrouted(router):
    await _place(router, "m")  # not placed: any worker identity serves it
    await router.registry("worker").RegisterWorker(_register("m", "127.0.0.1:7001"))
    await router.registry("worker-cpu").RegisterWorker(_register("m", "127.0.0.1:7002"))
    await router.registry("worker-gpu").RegisterWorker(_register("m", "127.0.0.1:7003"))
    assert await _healthy(router, "m") == 3
    assert _endpoint_ports(router, "m") == [7001, 7002, 7003]
    await _place(router, "m", "gpu", "cpu")
    assert await _healthy(router, "m") == 2
    assert _endpoint_ports(router, "m") == [7002, 7003]
    await _place(router, "m")  # placement cleared: every worker again
    assert _endpoint_ports(router, "m") == [7001, 7002, 7003]


async def test_the_edge_verifies_the_placed_pools_certificates(router):
    await _place(router, "m", "gpu", "cpu")
    await _place(router, "free")
    by_type = router.resources()

    def accepted(model: str) -> list[dict[str, str]]:
        tls = by_type[CDS][model_cluster(model, "1")]["transport_socket"]["typed_config"]
        validation = tls["common_tls_context"]["combined_validation_context"]
        return [
            m["matcher"]
            for m in validation["default_validation_context"]["match_typed_subject_alt_names"]
        ]

    assert accepted("m") == [
        {"exact": pki.spiffe_id("worker-cpu")},
        {"exact": pki.spiffe_id("worker-gpu")},
    ]
    assert accepted("free") == [
        {"exact": pki.spiffe_id("worker")},
        {"prefix": pki.spiffe_id("worker-")},
    ]
    # A version the catalogue does not know went to `inference`, which holds every
    # worker: for a placed model the edge answers NOT_FOUND itself.
    routes = by_type[RDS]["edge"]["virtual_hosts"][0]["routes"]
    unknown = [r for r in routes if _names_unknown_version(r, "m")]
    assert unknown and all("direct_response" in r for r in unknown)
    assert any("route" in r for r in routes if _names_unknown_version(r, "free"))


def _names_unknown_version(route: dict[str, Any], model: str) -> bool:
    headers = route["match"].get("headers", [])
    names_model = any(h.get("string_match", {}).get("exact") == model for h in headers)
    return names_model and any(h.get("present_match") for h in headers)


async def test_a_worker_acts_only_for_a_registration_of_its_own_pool(router, own_redis):
    request = _register("m", "127.0.0.1:7001")
    await router.registry("worker").RegisterWorker(request)
    renew = pb.RenewLeaseRequest(worker_id=request.worker_id, lease_token=TOKEN)
    call = router.registry("worker-gpu").RenewLease(renew)
    refused = await failed_call_reason(call)
    assert refused == (grpc.StatusCode.PERMISSION_DENIED, "NOT_LEASE_HOLDER")
    await router.registry("worker").RenewLease(renew)  # its own certificate


async def test_only_admins_see_a_models_pools(router):
    await _place(router, "m", "gpu")
    request = pb.GetCatalogModelRequest(model="m")
    as_admin = await router.catalogue("edge").GetCatalogModel(
        request, metadata=list(mtls.EDGE_FOR_ADMIN)
    )
    assert list(as_admin.model.worker_pools) == ["gpu"]
    plain = await router.catalogue("edge").GetCatalogModel(request)
    assert list(plain.model.worker_pools) == []
    listed = await router.catalogue("edge").ListCatalogModels(pb.ListCatalogModelsRequest())
    assert [list(m.worker_pools) for m in listed.models] == [[]]


async def test_pools_are_validated(router):
    await _place(router, "m")
    for pools in (["GPU"], ["-gpu"], ["a" * 33], [f"p{i}" for i in range(17)]):
        call = router.catalogue().SetModelWorkerPools(
            pb.SetModelWorkerPoolsRequest(model="m", worker_pools=pools)
        )
        code, _reason = await failed_call_reason(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, pools
    assert contract.worker_pool_of("worker-gpu") == "gpu"


async def test_a_registry_entry_written_before_pools_is_the_shared_identitys(own_redis):
    client = aioredis.from_url(own_redis)
    try:
        registry = WorkerRegistry(client, lease_s=30)
        entry = await registry.register("w1", "127.0.0.1:7001", [("m", "1")], time.time())
        raw = entry.to_json().replace(', "pool": ""', "")
        assert '"pool"' not in raw
        assert type(entry).from_json("w1", raw).pool == ""
    finally:
        await client.aclose()


async def test_another_pools_heartbeat_adds_no_version_to_a_placed_model(router):
    # A version made up by a worker of another pool became what `latest` names, and
    # the placed model's requests went to a cluster none of its workers serves.
    await _place(router, "m", "gpu")
    for caller, version in (("worker", "9"), ("worker-gpu", "3")):
        request = _register("free", f"127.0.0.1:{7000 + int(version)}")
        await router.registry(caller).RegisterWorker(request)
        renew = pb.RenewLeaseRequest(
            worker_id=request.worker_id,
            lease_token=TOKEN,
            models=[types_pb2.ModelRef(name="m", version=version)],
        )
        await router.registry(caller).RenewLease(renew)
    reply = await router.catalogue().GetCatalogModel(pb.GetCatalogModelRequest(model="m"))
    assert [v.version for v in reply.model.versions] == ["1", "3"]


def _ref(model: str, version: str) -> types_pb2.ModelRef:
    return types_pb2.ModelRef(name=model, version=version)


async def _worker(router: Mesh, caller: str, worker_id: str, port: int, model: str) -> None:
    request = pb.RegisterWorkerRequest(
        worker_id=worker_id,
        address=f"127.0.0.1:{port}",
        models=[_ref(model, "1")],
        lease_token=TOKEN,
    )
    await router.registry(caller).RegisterWorker(request)


async def _heartbeat(
    router: Mesh, caller: str, worker_id: str, *refs: tuple[str, str], **fields: Any
) -> pb.RenewLeaseResponse:
    request = pb.RenewLeaseRequest(
        worker_id=worker_id, lease_token=TOKEN, models=[_ref(*ref) for ref in refs], **fields
    )
    return await router.registry(caller).RenewLease(request)


async def test_a_registration_leaves_out_only_the_placed_models(router):
    await _place(router, "m", "gpu")
    request = _register("m", "127.0.0.1:7001")
    request.models.append(_ref("free", "1"))
    reply = await router.registry("worker").RegisterWorker(request)
    assert [(m.name, m.version) for m in reply.unplaced_models] == [("m", "1")]
    (worker,) = (await router.registry("operator").ListWorkers(pb.ListWorkersRequest())).workers
    assert [(m.name, m.version) for m in worker.models] == [("free", "1")]


async def test_another_pools_heartbeat_describes_nothing_of_a_placed_model(router):
    # Any worker answers ListModels and GetModel from what the heartbeats describe:
    # a phantom READY version and a made-up description reached every client.
    await _place(router, "m", "gpu")
    await _worker(router, "worker-gpu", "gpu-0", 7001, "m")
    await _worker(router, "worker", "any-0", 7002, "free")
    made_up = inference_pb2.Model(
        name="m",
        description="made up",
        default_version="666",
        versions=[inference_pb2.ModelVersion(version="666", state=READY)],
    )
    await _heartbeat(
        router, "worker", "any-0", ("free", "1"), ("m", "666"), served_models=[made_up]
    )
    workers = (await router.registry("operator").ListWorkers(pb.ListWorkersRequest())).workers
    stored = {w.id: [(m.name, m.version) for m in w.models] for w in workers}
    assert stored["any-0"] == [("free", "1")]
    await _worker(router, "worker-cpu", "cpu-0", 7003, "other")
    answer = await _heartbeat(router, "worker-cpu", "cpu-0", ("other", "1"))
    (seen,) = [m for m in answer.mesh_models if m.name == "m"]
    assert [v.version for v in seen.versions] == ["1"] and seen.description != "made up"


def _ttft(p50_ms: float) -> router_pb2.WorkerLoad:
    return router_pb2.WorkerLoad(
        running_sequences=1, max_sequences=8, ttft_samples=50, ttft_p50_ms=p50_ms
    )


async def test_another_pools_worker_leaves_the_placed_workers_weights_alone(router):
    # Claiming the placed version with a 1 ms TTFT set the placed workers' weights
    # against it: 100 and 25 (200 and 800 ms) both fell to 5.
    await _place(router, "m", "gpu")
    await _worker(router, "worker-gpu", "fast", 7001, "m")
    await _worker(router, "worker-gpu", "slow", 7002, "m")
    await _worker(router, "worker", "other", 7003, "free")
    for _ in range(12):
        await _heartbeat(router, "worker", "other", ("free", "1"), ("m", "1"), load=_ttft(1))
        await _heartbeat(router, "worker-gpu", "fast", ("m", "1"), load=_ttft(200))
        await _heartbeat(router, "worker-gpu", "slow", ("m", "1"), load=_ttft(800))
    workers = (await router.registry("operator").ListWorkers(pb.ListWorkersRequest())).workers
    assert {w.id: w.weight for w in workers if w.pool} == {"fast": 100, "slow": 25}


async def test_a_placed_models_rollout_shows_its_pools_counters_only(router):
    await _place(router, "m", "gpu")
    await router.catalogue().RegisterModelVersion(
        pb.RegisterModelVersionRequest(model="m", version="2", weight=0)
    )
    request = _register("m", "127.0.0.1:7001")
    request.models.append(_ref("m", "2"))
    await router.registry("worker-gpu").RegisterWorker(request)
    await router.catalogue().StartRollout(pb.StartRolloutRequest(model="m", version="2"))
    await _worker(router, "worker", "other", 7002, "free")
    counts = router_pb2.VersionOutcomes(
        model=_ref("m", "2"),
        requests=1000,
        errors=900,
        ttft_bucket_bounds_ms=[100.0],
        ttft_bucket_counts=[1000, 0],
    )
    load = router_pb2.WorkerLoad(versions=[counts])
    await _heartbeat(router, "worker", "other", ("free", "1"), ("m", "2"), load=load)
    shown = (await router.catalogue().GetRollout(pb.GetRolloutRequest(model="m"))).rollout
    assert (shown.canary.requests, shown.canary.errors) == (0, 0)


async def test_a_placed_models_fallback_is_placed_within_its_pools(router):
    await _place(router, "m", "gpu", "cpu")
    await _place(router, "free")
    catalogue = router.catalogue()
    fallback = pb.SetFallbackModelRequest(model="m", fallback_model="free")
    code, _reason = await failed_call_reason(catalogue.SetFallbackModel(fallback))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # its prompts reached any worker
    await _place(router, "free", "gpu")
    await catalogue.SetFallbackModel(fallback)
    # Either end moved later is checked as well.
    for model, pools in (("free", ["tpu"]), ("free", []), ("m", ["cpu"])):
        placing = pb.SetModelWorkerPoolsRequest(model=model, worker_pools=pools)
        code, _reason = await failed_call_reason(catalogue.SetModelWorkerPools(placing))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (model, pools)
    await _place(router, "m")  # unplaced: any fallback


async def test_a_worker_registered_before_the_placement_drops_the_placed_model(router):
    # Heartbeats without descriptions keep the entry's versions when they name
    # none of their own: filtered on arrival only, the placed version stayed stored
    # (and weighed in the placed workers' weights).
    await _place(router, "m")
    await _worker(router, "worker", "before", 7009, "m")
    await _place(router, "m", "gpu")
    await _worker(router, "worker-gpu", "fast", 7001, "m")
    await _worker(router, "worker-gpu", "slow", 7002, "m")
    for _ in range(12):
        await _heartbeat(router, "worker", "before", ("m", "1"), load=_ttft(1))
        await _heartbeat(router, "worker-gpu", "fast", ("m", "1"), load=_ttft(200))
        await _heartbeat(router, "worker-gpu", "slow", ("m", "1"), load=_ttft(800))
    workers = (await router.registry("operator").ListWorkers(pb.ListWorkersRequest())).workers
    assert {w.id: [(m.name, m.version) for m in w.models] for w in workers}["before"] == []
    assert {w.id: w.weight for w in workers if w.pool} == {"fast": 100, "slow": 25}


# The keys of a model's document that the release before pools wrote (its
# ModelEntry.to_json): it rewrote a document with these only.
_EARLIER_RELEASES_KEYS = ("versions", "aliases", "fallback", "pinned", "shadow")


async def test_a_placement_outlives_an_earlier_releases_rewrite_of_the_model(router, own_redis):
    # A router replica of the release before pools, mid-upgrade, rewrote the model's
    # document on any change (a heartbeat naming a new version, a split) with the
    # fields it knew: the placement was erased for good, and the next registration
    # of the shared `worker` identity was taken (its endpoint in the model's cluster).
    from services.router.catalog import CATALOG_KEY

    await _place(router, "m", "gpu")
    client = aioredis.from_url(own_redis)
    try:
        document = json.loads(await client.hget(CATALOG_KEY, "m"))
        document["versions"].append({"version": "2", "weight": 0})
        kept = {key: document[key] for key in _EARLIER_RELEASES_KEYS if key in document}
        await client.hset(CATALOG_KEY, "m", json.dumps(kept))
    finally:
        await client.aclose()
    reply = await router.catalogue().GetCatalogModel(pb.GetCatalogModelRequest(model="m"))
    assert [v.version for v in reply.model.versions] == ["1", "2"]
    assert list(reply.model.worker_pools) == ["gpu"]
    refused = await failed_call_reason(
        router.registry("worker").RegisterWorker(_register("m", "127.0.0.1:7001"))
    )
    assert refused == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ON_WORKER_POOL")


async def test_a_placement_in_the_models_document_is_kept_and_moved_to_its_hash(router, own_redis):
    # The build before placements had a hash of their own kept them in the model's
    # document: read from the hash only, a placed model read as unplaced (open to every
    # worker), and its next change erased the placement for good.
    from services.router.catalog import CATALOG_KEY, PLACEMENTS_KEY

    await _place(router, "m")  # not placed
    client = aioredis.from_url(own_redis)
    try:
        document = json.loads(await client.hget(CATALOG_KEY, "m"))
        await client.hset(CATALOG_KEY, "m", json.dumps({**document, "worker_pools": ["gpu"]}))
        reply = await router.catalogue().GetCatalogModel(pb.GetCatalogModelRequest(model="m"))
        assert list(reply.model.worker_pools) == ["gpu"]
        refused = await failed_call_reason(
            router.registry("worker").RegisterWorker(_register("m", "127.0.0.1:7001"))
        )
        assert refused == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ON_WORKER_POOL")
        # Its next change moves it into the hash, as the document loses the field.
        await router.catalogue().RegisterModelVersion(
            pb.RegisterModelVersionRequest(model="m", version="2", weight=0)
        )
        assert await client.hget(PLACEMENTS_KEY, "m") == b"gpu"
        assert "worker_pools" not in json.loads(await client.hget(CATALOG_KEY, "m"))
        reply = await router.catalogue().GetCatalogModel(pb.GetCatalogModelRequest(model="m"))
        assert list(reply.model.worker_pools) == ["gpu"]
    finally:
        await client.aclose()
