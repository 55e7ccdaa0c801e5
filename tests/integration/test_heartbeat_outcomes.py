"""A heartbeat's reports feed rollouts and weights (real Redis): a worker reports only the
versions it serves, and counts that cannot be true are dropped."""

from __future__ import annotations

import time

from services.router.catalog import Catalog
from services.router.load_weights import MIN_WEIGHT, NEUTRAL_WEIGHT, LoadReport
from services.router.registry import WorkerRegistry
from services.router.servicer import WorkerRegistryServicer
from tests.integration.conftest import RegistryOperator, no_refresh
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.type.v1.types_pb2 import ModelRef


def outcomes(model: str, version: str, requests: int, errors: int) -> router_pb2.VersionOutcomes:
    return router_pb2.VersionOutcomes(
        model=ModelRef(name=model, version=version),
        requests=requests,
        errors=errors,
        ttft_bucket_bounds_ms=[100.0],
        ttft_bucket_counts=[requests, 0],
    )


async def test_a_worker_reports_outcomes_only_of_versions_it_serves_and_true_ones(registry_client):
    # A worker serving only model a reported a million clean requests of b's canary
    # (its rollout advanced to 100%), or negative errors that hid another's.
    registry = WorkerRegistry(registry_client, lease_s=30)
    servicer = WorkerRegistryServicer(Catalog(registry_client), registry, no_refresh)
    await registry.register("w", "127.0.0.1:1", [("a", "1")], time.time())
    load = router_pb2.WorkerLoad(
        versions=[
            outcomes("a", "1", 10, 1),
            outcomes("b", "2", 1_000_000, 0),  # not served here
            outcomes("a", "1", 10, -10),  # negative errors
            outcomes("a", "1", 10, 11),  # more errors than requests
        ]
    )
    request = router_pb.RenewLeaseRequest(
        worker_id="w", models=[ModelRef(name="a", version="1")], load=load
    )
    await servicer.RenewLease(request, RegistryOperator())
    stored = (await registry.get("w")).outcomes
    assert [(o.model, o.version, o.requests, o.errors) for o in stored] == [("a", "1", 10, 1)]


async def test_a_worker_is_weighed_against_the_workers_of_its_own_models(registry_client):
    # A fast worker of a small model was the reference of every worker: both workers
    # of a large model fell to the floor weight, an even split of 500 and 1500 ms.
    registry = WorkerRegistry(registry_client, lease_s=30)
    costs = {"small": ("s", 10.0), "fast": ("b", 500.0), "slow": ("b", 1500.0)}
    for port, (worker, (model, _)) in enumerate(costs.items(), 1):
        await registry.register(worker, f"127.0.0.1:{port}", [(model, "1")], time.time())
    for _ in range(6):  # a weight moves a step a heartbeat
        for worker, (model, ttft_ms) in costs.items():
            report = LoadReport(slots=4, ttft_samples=50, ttft_p50_ms=ttft_ms)
            await registry.renew(worker, [(model, "1")], time.time(), report)
    weights = {w.worker_id: w.weight.weight for w in await registry.all(time.time())}
    assert weights["fast"] == NEUTRAL_WEIGHT  # the best of its own model's workers
    assert MIN_WEIGHT < weights["slow"] < weights["fast"]
