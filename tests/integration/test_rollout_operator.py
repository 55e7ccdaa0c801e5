"""Operators' traffic changes while a rollout runs, and the rollout metrics every router
replica exports: the real router over gRPC on its own Redis, its rollouts driven by
drivers the test ticks (the router's own driver is stopped: another replica's)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.core.server import serving
from services.inference.load_report import TTFT_BOUNDS_MS
from services.router import catalog as cat
from services.router import rollouts as ro
from services.router.catalog import Catalog
from services.router.registry import VersionCounts, WorkerRegistry
from services.router.service import RouterService, RouterSettings
from tests import mtls
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ("1", "2", "3")


class Admin:
    """RouterService as the edge calls it for a caller with the admin scope."""

    def __init__(self, stub: rpc.RouterServiceStub) -> None:
        self._stub = stub

    def __getattr__(self, rpc_name: str) -> Any:
        method = getattr(self._stub, rpc_name)
        return lambda request: method(request, metadata=list(mtls.EDGE_FOR_ADMIN), timeout=10)


@dataclass
class Router:
    service: RouterService
    admin: Admin
    client: aioredis.Redis
    url: str
    model: str

    @property
    def store(self) -> ro.RolloutStore:
        return self.service.rollout_store

    def driver(self, ahead_s: float = 0.0) -> ro.RolloutDriver:
        """A driver of this router's rollouts whose clock is `ahead_s` ahead (past a step)."""
        return ro.RolloutDriver(self.store, lambda: time.time() + ahead_s)

    async def weights(self) -> dict[str, int]:
        return (await Catalog(self.client).get(self.model)).effective_weights(time.time())

    async def serve(self, stable: int, canary: int, stable_version: str = "1") -> None:
        """Worker w1's heartbeat: `stable` requests of `stable_version` and `canary` of 2
        so far, all fine."""
        models = [(self.model, v) for v in VERSIONS]
        outcomes = [_counts(self.model, stable_version, stable), _counts(self.model, "2", canary)]
        await WorkerRegistry(self.client, lease_s=LEASE_S).renew(
            "w1", models, time.time(), outcomes=outcomes
        )

    async def start(self, version: str = "2") -> router_pb2.Rollout:
        request = pb.StartRolloutRequest(
            model=self.model,
            version=version,
            steps=[5, 25, 50, 100],
            step_duration=duration_pb2.Duration(seconds=1),
            min_requests=10,
        )
        answer: pb.StartRolloutResponse = await self.admin.StartRollout(request)
        return answer.rollout

    async def split(self, **weights: int) -> None:
        entries = [router_pb2.TrafficWeight(version=v[1:], weight=w) for v, w in weights.items()]
        await self.admin.SetTrafficSplit(
            pb.SetTrafficSplitRequest(model=self.model, weights=entries)
        )


# Worker w1's lease: past the drivers' clocks, which run up to 60 s ahead (a step's
# time up) while w1 stays alive: a step moves traffic only to a routable worker.
LEASE_S = 120


def _counts(model: str, version: str, requests: int) -> VersionCounts:
    ttft = [0] * (len(TTFT_BOUNDS_MS) + 1)
    ttft[next(i for i, bound in enumerate(TTFT_BOUNDS_MS) if bound >= 10.0)] = requests
    return VersionCounts(model, version, requests, 0, TTFT_BOUNDS_MS, tuple(ttft))


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[Router]:
    """A running router on its own Redis serving a model with versions 1 (all its
    traffic), 2 and 3 on worker w1; its own rollout driver stopped."""
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis
    )
    service = RouterService(settings)
    client = aioredis.from_url(own_redis)
    model = f"m-{uuid.uuid4().hex[:8]}"  # the metrics' registry is the process's
    refs = [(model, v) for v in VERSIONS]
    await WorkerRegistry(client, lease_s=LEASE_S).register("w1", "10.0.0.1:1001", refs, time.time())
    await Catalog(client).register(refs)
    try:
        async with serving(service, settings) as running:
            await service.rollouts.stop()
            await client.delete(ro.LEASE_KEY)
            async with mtls.aio_channel(running.port, peer="router") as channel:
                admin = Admin(rpc.RouterServiceStub(channel))
                yield Router(service, admin, client, own_redis, model)
    finally:
        await client.aclose()


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def test_a_split_by_hand_during_a_rollout_aborts_it_and_the_split_stands(router):
    # The runbook's emergency lever: `models split M 1=100` while a rollout ran. The
    # rollout stayed running and its next step put the canary back to 25%.
    await router.start()
    assert await router.weights() == {"1": 95, "2": 5}
    await router.serve(stable=400, canary=20)  # enough for the step to pass
    await router.split(v1=100)
    rollout = (await router.admin.GetRollout(pb.GetRolloutRequest(model=router.model))).rollout
    assert rollout.state == router_pb2.ROLLOUT_STATE_ABORTED
    assert rollout.decisions[-1].action == "abort"
    assert "set by hand (split 1=100)" in rollout.reason and "at 5%" in rollout.reason
    driver = router.driver(ahead_s=60)  # the step's time is up
    for _ in range(2):
        await driver.tick()
    assert await router.weights() == {"1": 100}
    assert (await router.store.get(router.model)).state == ro.ABORTED


async def test_a_drivers_advance_stored_before_a_split_by_hand_never_lands_after_it(router):
    # The two writers interleaved: the driver stores "advance to 25%", the operator's
    # split lands, then the driver moves the traffic for its decision.
    await router.start()
    stored = await router.store.get(router.model)
    advanced = replace(stored, step_index=1)  # 25%
    await router.client.hset(ro.ROLLOUTS_KEY, router.model, advanced.to_json())
    await router.split(v1=100)
    assert not await router.store.move_traffic(advanced)  # the driver wakes up
    assert await router.weights() == {"1": 100}
    assert (await router.store.get(router.model)).state == ro.ABORTED


async def test_a_success_whose_full_move_an_outside_split_refused_is_not_stored_as_succeeded(
    router,
):
    # The driver stores its success (100%), a split written outside the rollout store
    # lands (an older replica's, a hand edit), then the driver moves the traffic:
    # refused, the split is left as it is. The rollout stayed SUCCEEDED while the new
    # version took none of the traffic.
    await router.start()
    stored = await router.store.get(router.model)
    succeeded = replace(stored, state=ro.SUCCEEDED, step_index=len(stored.policy.steps) - 1)
    await router.client.hset(ro.ROLLOUTS_KEY, router.model, succeeded.to_json())
    await Catalog(router.client).update(router.model, lambda m, _: cat.set_split(m, {"1": 100}))
    assert not await router.store.move_traffic(succeeded)  # the driver wakes up
    assert await router.weights() == {"1": 100}
    ended = await router.store.get(router.model)
    assert ended.state == ro.ABORTED
    assert "changed outside the rollout (now 1=100)" in ended.reason


async def test_a_split_by_hand_over_a_success_whose_move_is_pending_aborts_it(router):
    # The driver stored its success; before its 100% move landed the operator's split
    # did (it marks every pending decision applied, so that move never lands).
    await router.start()
    stored = await router.store.get(router.model)
    succeeded = replace(stored, state=ro.SUCCEEDED, step_index=len(stored.policy.steps) - 1)
    await router.client.hset(ro.ROLLOUTS_KEY, router.model, succeeded.to_json())
    await router.split(v1=100)
    assert not await router.store.move_traffic(succeeded)  # the driver wakes up
    assert await router.weights() == {"1": 100}
    ended = await router.store.get(router.model)
    assert ended.state == ro.ABORTED and "set by hand" in ended.reason


async def test_a_split_by_hand_after_a_success_that_landed_keeps_it_succeeded(router):
    await router.start()
    stored = await router.store.get(router.model)
    succeeded = replace(stored, state=ro.SUCCEEDED, step_index=len(stored.policy.steps) - 1)
    await router.client.hset(ro.ROLLOUTS_KEY, router.model, succeeded.to_json())
    assert await router.store.move_traffic(succeeded)  # its 100% landed
    await router.split(v1=100)  # a later change of mind
    assert (await router.store.get(router.model)).state == ro.SUCCEEDED


async def test_a_pin_during_a_rollout_aborts_it(router):
    await router.start()
    await router.serve(stable=400, canary=20)
    await router.admin.PinModelVersion(pb.PinModelVersionRequest(model=router.model, version="1"))
    rollout = await router.store.get(router.model)
    assert rollout.state == ro.ABORTED and "pinned to 1" in rollout.reason
    await router.driver(ahead_s=60).tick()
    stored = await Catalog(router.client).get(router.model)
    assert stored.pinned == "1"
    assert {v.version: v.weight for v in stored.versions if v.weight} == {"1": 95, "2": 5}


async def test_a_split_changed_outside_the_rollout_is_left_as_it_is_and_ends_it(router):
    # A split written without the rollout store (an older replica's SetTrafficSplit
    # mid-upgrade, a hand edit): the next move checks the live split against the
    # one the rollout last set, in its transaction, and leaves it.
    await router.start()
    await router.serve(stable=400, canary=20)
    await Catalog(router.client).update(router.model, lambda m, _: cat.set_split(m, {"1": 100}))
    driver = router.driver(ahead_s=60)
    await driver.tick()  # the step passed: the driver decides to advance
    assert await router.weights() == {"1": 100}
    rollout = await router.store.get(router.model)
    assert rollout.state == ro.ABORTED
    assert "changed outside the rollout (now 1=100)" in rollout.reason
    assert [d.action for d in rollout.decisions] == ["start", "advance", "abort"]
    mark = await router.client.hget(ro.APPLIED_KEY, router.model)
    assert mark.decode() == ro.traffic_of(rollout)
    await driver.tick()
    assert await router.weights() == {"1": 100}


async def test_a_rollout_does_not_start_while_a_third_version_has_traffic(router):
    # It set the split to its two versions: version 3's 20% went to 1 and 2 without a
    # word, and an abort left 1=100.
    await router.split(v1=80, v3=20)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await router.start()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(refused.value) == "ROLLOUT_OTHER_VERSIONS"
    assert "version 3 has 20%" in (refused.value.details() or "")
    assert await router.weights() == {"1": 80, "3": 20}
    assert await router.client.hget(ro.ROLLOUTS_KEY, router.model) is None


# Another router replica: its own process, its own metrics.
_OTHER_REPLICA = """
import asyncio, sys, time
import redis.asyncio as aioredis
from services.router import rollouts as ro
from services.router.catalog import Catalog
from services.router.registry import WorkerRegistry

async def refresh():
    return None

async def main(url, model, action):
    client = aioredis.from_url(url)
    store = ro.RolloutStore(client, Catalog(client), WorkerRegistry(client, lease_s=30), refresh)
    if action == "start":
        await store.start(model, "2", ro.Policy(steps=(5, 25, 50, 100), step_s=1), time.time())
    else:
        await store.operate(model, action, time.time())
    await client.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


async def _on_another_replica(router: Router, action: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OTHER_REPLICA, router.url, router.model, action, cwd=ROOT
    )
    assert await asyncio.wait_for(child.wait(), 60) == 0


def _exported(name: str, model: str, version: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": model, "version": version})


async def test_every_replica_exports_the_step_from_redis_after_another_served_an_abort(router):
    # The driver's gauge kept 25 after an abort served by another replica (and so did
    # every replica's that ever drove it): dashboards (max by) showed the canary at 25%.
    await router.start()
    await router.serve(stable=400, canary=20)
    leader = router.driver(ahead_s=60)
    await leader.tick()
    assert await router.weights() == {"1": 75, "2": 25}
    step = "tokenmesh_rollout_step_percent"
    assert _exported(step, router.model, "2") == 25
    await _on_another_replica(router, "abort")
    assert await router.weights() == {"1": 100}
    follower = router.driver()  # this replica, not holding the lease: it drives nothing
    await follower.tick()
    assert not follower.token
    assert _exported(step, router.model, "2") == 0


async def test_every_replica_exports_a_started_rollouts_rolled_back_series_at_0(router):
    # Created by the first rollback's inc(), the series was first scraped at 1, which
    # increase() reads as no increase: TokenmeshRolloutRolledBack never fired.
    rolled_back = "tokenmesh_rollouts_rolled_back_total"
    await _on_another_replica(router, "start")
    assert _exported(rolled_back, router.model, "2") is None
    await router.driver().tick()
    assert _exported(rolled_back, router.model, "2") == 0


async def test_a_replaced_rollouts_step_series_is_removed(router):
    step = "tokenmesh_rollout_step_percent"
    await router.start("2")
    await router.admin.AbortRollout(pb.AbortRolloutRequest(model=router.model))
    await router.driver().tick()
    assert _exported(step, router.model, "2") == 0
    await router.start("3")
    await router.driver().tick()
    assert _exported(step, router.model, "2") is None
    assert _exported(step, router.model, "3") == 5


async def test_a_step_that_waits_for_traffic_is_exported_as_held(router):
    # A canary whose share got fewer than min_requests held its step for good ("waiting
    # for traffic"), at its share, and nothing but `rollouts status` said so.
    held = "tokenmesh_rollout_step_held_ratio"
    await router.start()  # 1 s steps, 10 requests each
    await router.serve(stable=400, canary=3)
    await router.driver(ahead_s=30).tick()
    rollout = await router.store.get(router.model)
    assert rollout.state == ro.RUNNING and rollout.step_index == 0, rollout.reason
    assert "waiting for traffic" in rollout.reason
    assert _exported(held, router.model, "2") >= 29  # 30 of its 1 s steps
    await router.admin.PauseRollout(pb.PauseRolloutRequest(model=router.model))
    await router.driver(ahead_s=30).tick()
    assert _exported(held, router.model, "2") == 0  # an operator holds it


def _sunset(model: cat.ModelEntry, version: str, now: float) -> cat.ModelEntry:
    """The model once `version`'s sunset has passed (its stored weight kept, as
    deprecate leaves it)."""
    versions = tuple(
        replace(v, deprecated_at=now - 100, sunset_at=now - 10) if v.version == version else v
        for v in model.versions
    )
    return replace(model, versions=versions)


@pytest.mark.parametrize(
    ("stored", "sunset", "stable", "started"),
    [
        ({"1": 80, "3": 20}, "3", "1", {"1": 95, "2": 5}),
        # Every weighted version sunset: the newest serving version takes the traffic.
        ({"1": 100}, "1", "3", {"3": 95, "2": 5}),
    ],
)
async def test_a_rollout_starts_while_a_sunset_version_keeps_its_stored_weight(
    router, stored, sunset, stable, started
):
    # The start's check read the effective split (a sunset version serves nothing), the
    # first move's guard the stored one: StartRollout answered OK and the rollout was
    # aborted at once, "the traffic split was changed outside the rollout (now 1=80 3=20)".
    now = time.time()
    catalog = Catalog(router.client)
    await catalog.update(router.model, lambda m, _: _sunset(cat.set_split(m, stored), sunset, now))
    assert await router.weights() == {stable: 100}
    answer = await router.start()
    assert answer.stable_version == stable
    rollout = await router.store.get(router.model)
    assert rollout.state == ro.RUNNING, rollout.reason
    assert await router.weights() == started
    await router.serve(stable=400, canary=20, stable_version=stable)
    await router.driver(ahead_s=60).tick()  # the step passed: it advances from its own split
    assert (await router.store.get(router.model)).state == ro.RUNNING
    assert await router.weights() == {stable: 75, "2": 25}


def _failing(model: str, version: str, requests: int, errors: int) -> VersionCounts:
    counts = _counts(model, version, requests - errors)
    return replace(counts, requests=requests, errors=errors)


async def test_a_rollback_after_a_split_changed_outside_takes_the_canary_to_0(router):
    # An older replica's split (or a hand edit) put the canary at 50%; the error gate
    # then rolled it back: the move was refused like a step's, the bad canary kept 50%,
    # yet the rollback was counted (TokenmeshRolloutRolledBack fired) and logged "aborted".
    rolled_back = "tokenmesh_rollouts_rolled_back_total"
    await router.start()
    catalog = Catalog(router.client)
    await catalog.update(router.model, lambda m, _: cat.set_split(m, {"1": 50, "2": 50}))
    outcomes = [
        _failing(router.model, "1", 400, 0),
        _failing(router.model, "2", 200, 150),
    ]
    models = [(router.model, v) for v in VERSIONS]
    await WorkerRegistry(router.client, lease_s=LEASE_S).renew(
        "w1", models, time.time(), outcomes=outcomes
    )
    before = _exported(rolled_back, router.model, "2") or 0
    await router.driver().tick()
    rollout = await router.store.get(router.model)
    assert rollout.state == ro.ROLLED_BACK
    assert [d.action for d in rollout.decisions] == ["start", "rollback"]
    assert _exported(rolled_back, router.model, "2") == before + 1
    assert await router.weights() == {"1": 100}
    assert _exported("tokenmesh_rollout_step_percent", router.model, "2") == 0
    mark = await router.client.hget(ro.APPLIED_KEY, router.model)
    assert mark.decode() == ro.traffic_of(rollout)


@pytest.mark.parametrize(
    ("outside", "after"),
    [
        # The rest of the outside split stays: only the canary's share moves (to 1).
        (lambda m: cat.set_split(m, {"1": 40, "2": 30, "3": 30}), {"1": 70, "3": 30}),
        # A pin to the canary gives it every request: it is lifted.
        (lambda m: cat.pin(cat.set_split(m, {"1": 90, "2": 10}), "2"), {"1": 100}),
    ],
)
async def test_an_abort_after_a_split_changed_outside_takes_only_the_canarys_share(
    router, outside, after
):
    # The runbook's `rollout abort` "sends the traffic back to the stable version": after
    # an outside split it was refused like a step's and the canary kept its share.
    await router.start()
    await Catalog(router.client).update(router.model, lambda m, _: outside(m))
    await router.admin.AbortRollout(pb.AbortRolloutRequest(model=router.model))
    assert (await router.store.get(router.model)).state == ro.ABORTED
    assert await router.weights() == after
    stored = await Catalog(router.client).get(router.model)
    assert stored.pinned == "" and stored.version("2").weight == 0


async def test_a_split_by_hand_after_a_rollback_was_decided_stands(router):
    # The two writers interleaved: the driver stores its rollback, an operator's split by
    # hand lands (it marks the rollback applied), then the driver moves the rollback's
    # traffic. The operator's split came last: it stands.
    await router.start()
    stored = await router.store.get(router.model)
    rolled_back = replace(stored, state=ro.ROLLED_BACK)
    await router.client.hset(ro.ROLLOUTS_KEY, router.model, rolled_back.to_json())
    await router.split(v1=50, v2=50)
    assert not await router.store.move_traffic(rolled_back)  # the driver wakes up
    assert await router.weights() == {"1": 50, "2": 50}
