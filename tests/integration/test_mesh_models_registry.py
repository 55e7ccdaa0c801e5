"""The router answers each worker's heartbeat with what the other workers serve (real
Redis): any worker can then answer ListModels and GetModel for the whole mesh."""

from __future__ import annotations

import time

from services.router.catalog import Catalog
from services.router.registry import WorkerRegistry
from services.router.served_models import MAX_BYTES
from services.router.servicer import WorkerRegistryServicer
from tests.integration.conftest import RegistryOperator, no_refresh
from tokenmesh.inference.v2 import inference_pb2 as v2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.type.v1.types_pb2 import ModelRef

READY = v2.ModelVersionState.MODEL_VERSION_STATE_READY
FAILED = v2.ModelVersionState.MODEL_VERSION_STATE_FAILED


def model(name: str, *versions: tuple[str, v2.ModelVersionState.ValueType]) -> v2.Model:
    return v2.Model(name=name, versions=[v2.ModelVersion(version=v, state=s) for v, s in versions])


def heartbeat(worker: str, served: list[v2.Model]) -> router_pb.RenewLeaseRequest:
    refs = [
        ModelRef(name=m.name, version=v.version)
        for m in served
        for v in m.versions
        if v.state == READY
    ]
    return router_pb.RenewLeaseRequest(worker_id=worker, models=refs, served_models=served)


def described(response: router_pb.RenewLeaseResponse) -> dict[str, dict[str, int]]:
    return {m.name: {v.version: v.state for v in m.versions} for m in response.mesh_models}


async def test_a_heartbeat_s_answer_holds_every_other_serving_worker_s_models(registry_client):
    registry = WorkerRegistry(registry_client, lease_s=30)
    servicer = WorkerRegistryServicer(Catalog(registry_client), registry, no_refresh)
    workers = {
        "canary": [model("lm", ("2", READY))],
        "stable": [model("lm", ("1", READY)), model("embedder", ("1", READY))],
        "leaving": [model("retired", ("1", READY))],
        "broken": [model("lm", ("1", READY), ("3", FAILED))],
    }
    for port, (worker, served) in enumerate(workers.items(), 1):
        await registry.register(worker, f"127.0.0.1:{port}", [("lm", "1")], time.time())
        await servicer.RenewLease(heartbeat(worker, served), RegistryOperator())
    await registry.drain("leaving")

    answer = await servicer.RenewLease(heartbeat("canary", workers["canary"]), RegistryOperator())
    # Its own models come from itself; a draining worker's are gone from the mesh.
    assert described(answer) == {"embedder": {"1": READY}, "lm": {"1": READY, "3": FAILED}}
    answer = await servicer.RenewLease(heartbeat("stable", workers["stable"]), RegistryOperator())
    assert described(answer)["lm"] == {"1": READY, "2": READY, "3": FAILED}


async def test_a_worker_from_before_descriptions_counts_with_its_ready_versions(registry_client):
    registry = WorkerRegistry(registry_client, lease_s=30)
    servicer = WorkerRegistryServicer(Catalog(registry_client), registry, no_refresh)
    await registry.register("old", "127.0.0.1:1", [("lm", "1"), ("lm", "2")], time.time())
    await registry.register("new", "127.0.0.1:2", [("lm", "3")], time.time())
    answer = await servicer.RenewLease(
        heartbeat("new", [model("lm", ("3", READY))]), RegistryOperator()
    )
    assert described(answer) == {"lm": {"1": READY, "2": READY}}
    assert answer.mesh_models[0].default_version == "2"


async def test_a_heartbeat_without_descriptions_keeps_the_last_ones(registry_client):
    registry = WorkerRegistry(registry_client, lease_s=30)
    servicer = WorkerRegistryServicer(Catalog(registry_client), registry, no_refresh)
    for port, worker in enumerate(("a", "b"), 1):
        await registry.register(worker, f"127.0.0.1:{port}", [("lm", "1")], time.time())
    await servicer.RenewLease(
        heartbeat("a", [model("lm", ("1", READY), ("2", FAILED))]), RegistryOperator()
    )
    await servicer.RenewLease(
        router_pb.RenewLeaseRequest(worker_id="a", models=[ModelRef(name="lm", version="1")]),
        RegistryOperator(),
    )
    answer = await servicer.RenewLease(
        heartbeat("b", [model("lm", ("1", READY))]), RegistryOperator()
    )
    assert described(answer) == {"lm": {"1": READY, "2": FAILED}}


async def test_malformed_or_oversized_descriptions_are_left_out_not_refused(registry_client):
    # A refused heartbeat stops a worker heartbeating: it would leave the mesh over
    # descriptions that only serve other workers' lookups.
    registry = WorkerRegistry(registry_client, lease_s=30)
    servicer = WorkerRegistryServicer(Catalog(registry_client), registry, no_refresh)
    for port, worker in enumerate(("w", "peer"), 1):
        await registry.register(worker, f"127.0.0.1:{port}", [("lm", "1")], time.time())
    bad_name = heartbeat("w", [model("lm", ("1", READY)), model("../evil", ("1", FAILED))])
    huge = heartbeat("w", [model("lm", ("1", READY))])
    huge.served_models[0].description = "x" * (MAX_BYTES + 1)
    for request in (bad_name, huge):
        renewed = await servicer.RenewLease(request, RegistryOperator())
        assert renewed.lease_expire_time.seconds > time.time()
    answer = await servicer.RenewLease(
        heartbeat("peer", [model("lm", ("1", READY))]), RegistryOperator()
    )
    # Counted with its READY versions, as a worker that describes none.
    assert described(answer) == {"lm": {"1": READY}}
    assert answer.mesh_models[0].description == ""
