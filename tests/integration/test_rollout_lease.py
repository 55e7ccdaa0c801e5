"""Rollouts in real Redis: one driving replica at a time (fenced lease), and an
operator's change between a driver's read and its write is kept."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.core.errors import Unavailable
from services.inference.load_report import TTFT_BOUNDS_MS
from services.router import catalog as cat
from services.router import rollouts as ro
from services.router.catalog import Catalog
from services.router.registry import VersionCounts, WorkerRegistry
from services.router.servicer import WorkerRegistryServicer
from tests.conftest import private_db_url
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.type.v1.types_pb2 import ModelRef

# A logical database of its own: the session mesh shares this Redis, and its
# router's driver (database 0) takes the same lease every 0.5 s, so it could
# win the lease between these steps (the cause of this test's rare failures).
PRIVATE_DB = 7


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(private_db_url(redis_url, PRIVATE_DB))
    assert client.connection_pool.connection_kwargs["db"] == PRIVATE_DB
    await client.delete(ro.LEASE_KEY)
    yield client
    await client.delete(ro.LEASE_KEY)
    await client.aclose()


async def _noop() -> None:
    return None


def store(client: aioredis.Redis) -> ro.RolloutStore:
    return ro.RolloutStore(client, Catalog(client), WorkerRegistry(client, lease_s=30), _noop)


async def started(client: aioredis.Redis) -> ro.Rollout:
    """A model with versions 1 (stable) and 2, and a running rollout of 2."""
    model = f"m-{uuid.uuid4().hex[:8]}"
    await Catalog(client).change(model, lambda current, _: cat.add_version(current, model, "1", 0))
    await Catalog(client).change(model, lambda current, _: cat.add_version(current, model, "2", 0))
    policy = ro.Policy(steps=(10, 100), step_s=1, min_requests=1)
    return await store(client).start(model, "2", policy, time.time())


async def test_only_one_driver_holds_the_lease_and_a_stale_one_writes_nothing(client):
    rollout = await started(client)
    first = ro.RolloutDriver(store(client), time.time, lease_s=0.3)
    second = ro.RolloutDriver(store(client), time.time, lease_s=0.3)
    await first.tick()
    await second.tick()
    assert first.token and not second.token
    stale_lease = f"{first.holder}:{first.token}"
    # The first stalls past its lease and the second takes over, with a larger
    # token: it ticks until the lease has expired (not a fixed sleep: a 0.4 s
    # sleep against a 0.3 s lease failed once in a full CI run, cause not found).
    deadline = time.monotonic() + 10
    while not second.token and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        await second.tick()
    assert second.token > first.token
    raw = await client.hget(ro.ROLLOUTS_KEY, rollout.model)
    # A write made under the stale lease is refused, whatever it carries.
    assert not await store(client)._swap(
        raw, rollout.decided(ro.Decision(0, "x", 0, "")), stale_lease
    )
    assert (
        ro.Rollout.from_json(await client.hget(ro.ROLLOUTS_KEY, rollout.model)).decisions[-1].action
        == "start"
    )


async def test_an_abort_between_a_drivers_read_and_write_is_kept(client):
    rollout = await started(client)
    driver = ro.RolloutDriver(store(client), time.time)
    await driver.tick()
    raw = await client.hget(ro.ROLLOUTS_KEY, rollout.model)  # the driver read ...
    await store(client).operate(rollout.model, "abort", time.time())  # ... an operator aborts
    await store(client).step(
        ro.Rollout.from_json(raw), raw, f"{driver.holder}:{driver.token}", time.time() + 5
    )  # ... and the driver writes what it computed from its read
    kept = await store(client).get(rollout.model)
    assert kept.state == ro.ABORTED and kept.weight == 0
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 100}


async def test_a_decision_whose_traffic_never_moved_is_applied_by_the_next_tick(client):
    """The decision is written first and the split after: when the split's update
    failed (a Redis error) or a stalled driver's late update of an older decision
    landed after an abort, the canary kept its share while the rollout read as
    ended, for good (an ended rollout is never stepped again)."""
    rollout = await started(client)
    calls = {"n": 0}
    real_update = Catalog.update_if

    async def failing_once(self, model, change, guard):  # the abort's split update fails
        calls["n"] += 1
        if calls["n"] == 1:
            raise RedisConnectionError("lost")
        return await real_update(self, model, change, guard)

    Catalog.update_if = failing_once
    try:
        with pytest.raises(RedisConnectionError):
            await store(client).operate(rollout.model, "abort", time.time())
    finally:
        Catalog.update_if = real_update
    assert (await store(client).get(rollout.model)).state == ro.ABORTED
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 90, "2": 10}  # the canary still has its share
    await ro.RolloutDriver(store(client), time.time).tick()
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 100}


async def test_a_split_the_busy_catalogue_refused_is_moved_by_the_next_tick(client):
    # Catalog.change_if gives up (UNAVAILABLE) when other writers keep changing the
    # catalogue: raised out of the decision, it ended the driver's tick for every
    # model (five in a row: the router NOT_SERVING) and told the operator nothing
    # was written, while the abort was stored.
    rollout = await started(client)
    real_update = Catalog.update_if

    async def busy(self, model, change, guard):
        raise Unavailable("the model catalogue changed 32 times; retry", retry_after_s=1)

    Catalog.update_if = busy
    try:
        aborted = await store(client).operate(rollout.model, "abort", time.time())
    finally:
        Catalog.update_if = real_update
    assert aborted.state == ro.ABORTED
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 90, "2": 10}  # not moved yet
    gauge = ro.STEP_PERCENT.labels(rollout.model, rollout.version)
    assert gauge._value.get() == rollout.weight  # the abort's share is not in effect yet
    await ro.RolloutDriver(store(client), time.time).tick()
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 100}
    assert gauge._value.get() == 0  # the tick that moved it says so (it kept 10%)


async def test_a_stalled_drivers_late_split_never_lands_over_a_later_abort(client):
    """A driver stores "advance to 100%" and stalls before moving the split; an operator
    aborts (0%, applied and marked). The driver's late split update used to land
    anyway: the canary took every request, and when the abort's mark was written
    after it, the mark matched the stored abort and no tick repaired it."""
    rollout = await started(client)
    advanced = replace(rollout, step_index=1)  # 100%
    await client.hset(ro.ROLLOUTS_KEY, rollout.model, advanced.to_json())
    aborted = await store(client).operate(rollout.model, "abort", time.time())
    await store(client).move_traffic(advanced)  # the stalled driver wakes up
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 100}
    assert (await client.hget(ro.APPLIED_KEY, rollout.model)).decode() == ro.traffic_of(aborted)


async def test_a_refused_late_split_leaves_the_step_gauge_to_the_later_decision(client):
    # The stalled driver's "advance to 100%" is refused by the split's guard: the
    # gauge went on showing 100% for a canary the abort had taken to 0%.
    rollout = await started(client)
    advanced = replace(rollout, step_index=1)  # 100%
    await client.hset(ro.ROLLOUTS_KEY, rollout.model, advanced.to_json())
    aborted = await store(client).operate(rollout.model, "abort", time.time())
    gauge = ro.STEP_PERCENT.labels(rollout.model, rollout.version)
    assert gauge._value.get() == aborted.weight == 0
    late = ro.Decision(time.time(), "advance", advanced.weight, "the step's checks passed")
    await store(client)._apply(advanced, late)  # the stalled driver wakes up
    assert gauge._value.get() == 0
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == {"1": 100}


class _OperatorContext:
    """A call's context as the servicer reads it: no worker certificate (an operator)."""

    def peer_identities(self) -> None:
        return None


async def test_a_heartbeats_version_whose_catalogue_registration_failed_joins_at_the_next(
    client,
):
    # The registry stored the heartbeat's new models, then the catalogue refused the
    # write (a busy catalogue's UNAVAILABLE, or Redis): the next heartbeats saw no
    # change and never registered the version, which stayed unrouted.
    model, worker = f"m-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    catalog, registry = Catalog(client), WorkerRegistry(client, lease_s=30)
    refreshes: list[None] = []

    async def refresh() -> None:
        refreshes.append(None)

    servicer = WorkerRegistryServicer(catalog, registry, refresh)
    await registry.register(worker, "127.0.0.1:1", [(model, "1")], time.time())
    await catalog.register([(model, "1")])
    real_register = Catalog.register

    async def busy(self, refs, pool=None):
        raise Unavailable("the model catalogue changed 32 times; retry", retry_after_s=1)

    renewal = router_pb.RenewLeaseRequest(
        worker_id=worker, models=[ModelRef(name=model, version=v) for v in ("1", "2")]
    )
    Catalog.register = busy
    try:
        with pytest.raises(Unavailable):
            await servicer.RenewLease(renewal, _OperatorContext())
    finally:
        Catalog.register = real_register
    await servicer.RenewLease(renewal, _OperatorContext())
    entry = await catalog.get(model)
    assert [v.version for v in entry.versions] == ["1", "2"]
    assert len(refreshes) == 1  # the routes were built again once: a version was added
    # Another replica's first heartbeat from the worker only checks the catalogue.
    other = WorkerRegistryServicer(catalog, registry, refresh)
    await other.RenewLease(renewal, _OperatorContext())
    assert len(refreshes) == 1


async def test_a_worker_version_named_like_an_alias_does_not_fail_its_registration(client):
    # add_version refuses it; raised in the middle of a registration, the worker's
    # other versions went unregistered and every RegisterWorker retry failed.
    catalog = Catalog(client)
    model = f"m-{uuid.uuid4().hex[:8]}"
    await catalog.change(model, lambda current, _: cat.add_version(current, model, "1", 0))
    await catalog.change(model, lambda current, _: cat.set_alias(current, "canary", "1"))
    await catalog.register([(model, "canary"), (model, "3")])
    entry = await catalog.get(model)
    assert [v.version for v in entry.versions] == ["1", "3"]
    assert entry.aliases == {"canary": "1"}


async def test_a_rollout_from_before_the_marks_is_marked_as_it_stands_not_moved(client):
    # Its split may be an operator's, made while it was paused: the first tick of a
    # replica that knows the marks must not move it back to the rollout's step.
    rollout = await started(client)
    await client.hdel(ro.APPLIED_KEY, rollout.model)  # as before the marks existed
    operators = {"1": 70, "2": 30}
    await Catalog(client).update(rollout.model, lambda m, _: cat.set_split(m, operators))
    driver = ro.RolloutDriver(store(client), time.time)
    await driver.tick()
    marked = await client.hget(ro.APPLIED_KEY, rollout.model)
    assert marked is not None and marked.decode() == ro.traffic_of(rollout)
    weights = (await Catalog(client).get(rollout.model)).effective_weights(time.time())
    assert weights == operators


async def test_a_start_whose_split_update_failed_is_moved_by_the_next_tick(client):
    # Its rollout was stored without an applied mark, which reads as a rollout from
    # before the marks: marked as it stood, the canary stayed at 0% for good.
    model = f"m-{uuid.uuid4().hex[:8]}"
    await Catalog(client).change(model, lambda current, _: cat.add_version(current, model, "1", 0))
    await Catalog(client).change(model, lambda current, _: cat.add_version(current, model, "2", 0))
    real_update = Catalog.update_if

    async def failing(self, name, change, guard):
        raise RedisConnectionError("lost")

    Catalog.update_if = failing
    try:
        with pytest.raises(RedisConnectionError):
            await store(client).start(model, "2", ro.Policy(steps=(10, 100)), time.time())
    finally:
        Catalog.update_if = real_update
    assert (await Catalog(client).get(model)).effective_weights(time.time()) == {"1": 100}
    await ro.RolloutDriver(store(client), time.time).tick()
    weights = (await Catalog(client).get(model)).effective_weights(time.time())
    assert weights == {"1": 90, "2": 10}


async def test_an_unreadable_rollout_leaves_every_other_models_rollouts_driven(client):
    # One document this replica could not read (a hand edit; here a step index past
    # the steps) raised out of every tick: no model's rollout was driven, and every
    # replica's task failed until each reported NOT_SERVING.
    healthy = await started(client)
    broken = json.loads(healthy.to_json())
    broken["model"], broken["step_index"] = f"m-{uuid.uuid4().hex[:8]}", 9
    await client.hset(ro.ROLLOUTS_KEY, broken["model"], json.dumps(broken))
    # And one a newer router wrote: a decision field this one lacks reads fine.
    newer = json.loads(healthy.to_json())
    newer["model"] = f"m-{uuid.uuid4().hex[:8]}"
    newer["decisions"][0]["actor"] = "alice"
    await client.hset(ro.ROLLOUTS_KEY, newer["model"], json.dumps(newer))
    driver = ro.RolloutDriver(store(client), time.time)
    try:
        await driver.tick()  # drives, then exports every readable rollout's metrics
        listed = {r.model for r in await store(client).all()}
        assert {healthy.model, newer["model"]} <= listed and broken["model"] not in listed
    finally:
        await client.hdel(ro.ROLLOUTS_KEY, broken["model"], newer["model"])


def _counts(model: str, version: str, requests: int) -> VersionCounts:
    ttft = [0] * (len(TTFT_BOUNDS_MS) + 1)
    ttft[0] = requests
    return VersionCounts(model, version, requests, 0, TTFT_BOUNDS_MS, tuple(ttft))


async def _started_rollout(
    client: aioredis.Redis,
) -> tuple[str, WorkerRegistry, ro.RolloutStore, ro.RolloutDriver, list[float]]:
    """A model of versions 1 and 2, a worker each (`s-<model>`, `c-<model>`), and a
    rollout of 2 in steps of 50 and 100 started; its driver ticks on `clock[0]`."""
    model = f"m-{uuid.uuid4().hex[:8]}"
    for version in ("1", "2"):

        def added(entry: Any, _: Any, v: str = version) -> Any:
            return cat.add_version(entry, model, v, 0)

        await Catalog(client).change(model, added)
    registry = WorkerRegistry(client, lease_s=30)
    clock = [time.time()]
    await registry.register(f"s-{model}", "127.0.0.1:1001", [(model, "1")], clock[0])
    await registry.register(f"c-{model}", "127.0.0.1:1002", [(model, "2")], clock[0])
    rollouts = ro.RolloutStore(client, Catalog(client), registry, _noop)
    policy = ro.Policy(steps=(50, 100), step_s=120, min_requests=50)
    await rollouts.start(model, "2", policy, clock[0])
    return model, registry, rollouts, ro.RolloutDriver(rollouts, lambda: clock[0]), clock


async def test_a_last_step_whose_only_canary_worker_drains_holds_instead_of_succeeding(client):
    # It succeeded to 100% onto a version with no routable worker: every request of
    # the model failed 503, under a rollout that read SUCCEEDED.
    model, registry, rollouts, driver, clock = await _started_rollout(client)
    stable, canary = f"s-{model}", f"c-{model}"
    try:
        clock[0] += 60
        await registry.renew(stable, [(model, "1")], clock[0], outcomes=[_counts(model, "1", 500)])
        await registry.renew(canary, [(model, "2")], clock[0], outcomes=[_counts(model, "2", 500)])
        await registry.drain(canary)  # its only worker leaves, heartbeating as it drains
        clock[0] += 61
        await registry.renew(stable, [(model, "1")], clock[0], outcomes=[_counts(model, "1", 600)])
        await registry.renew(canary, [(model, "2")], clock[0], outcomes=[_counts(model, "2", 500)])
        await driver.tick()
        held = await rollouts.get(model)
        assert (held.state, held.weight) == (ro.RUNNING, 50), held.reason
        assert "routable worker of 2" in held.reason
        assert (await Catalog(client).get(model)).effective_weights(clock[0]) == {"1": 50, "2": 50}
    finally:
        await client.hdel(ro.ROLLOUTS_KEY, model)


async def test_a_rollout_whose_stable_version_passes_its_sunset_ends_aborted(client):
    # The catalogue then gave the new version all of the traffic (the newest serving
    # takes over) while the rollout read its step's 25%, and a rollback later took
    # none of it back: the rollout's state said nothing of where the traffic went.
    model = f"m-{uuid.uuid4().hex[:8]}"
    for version in ("1", "2"):
        await Catalog(client).change(model, lambda m, _, v=version: cat.add_version(m, model, v, 0))
    clock = [time.time()]
    await Catalog(client).change(
        model, lambda m, _: cat.deprecate(m, "1", clock[0] + 600, clock[0])
    )
    rollouts = store(client)
    policy = ro.Policy(steps=(25, 50, 100), step_s=3600, min_requests=50)
    await rollouts.start(model, "2", policy, clock[0])
    try:
        clock[0] += 700  # past version 1's sunset
        await ro.RolloutDriver(rollouts, lambda: clock[0]).tick()
        ended = await rollouts.get(model)
        assert ended.state == ro.ABORTED
        assert "stable version 1 passed its sunset" in ended.reason
    finally:
        await client.hdel(ro.ROLLOUTS_KEY, model)


async def test_a_decision_stamped_far_ahead_does_not_erase_the_audit_log(client):
    """The rollouts' audit log (tenant tokenmesh.system) was trimmed from each new
    decision's stamp: a driver whose clock ran 100 days ahead erased it."""
    rollout = await started(client)
    key = f"tm:usage:audit:{ro.AUDIT_TENANT}"
    before = await client.zcard(key)
    assert before >= 1  # the start's decision
    ahead = ro.Decision(time.time() + 100 * 86400, "advance", 100, "a clock far ahead")
    await store(client)._record(rollout, ahead)
    assert await client.zcard(key) == before + 1
    newest = await client.zrange(key, -1, -1, withscores=True)
    assert newest[0][1] <= time.time() * 1000 + 6 * 60_000  # kept at most ~5 min ahead
    assert 0 < await client.pttl(key) <= ro.AUDIT_RETENTION_MS + 5 * 60_000


async def test_a_placed_models_rollout_counts_only_its_pools_workers(client):
    # A worker of another pool claims the new version (registered before the model
    # was placed, or by a heartbeat): the edge never routes it, and its counters
    # (500 clean requests) advanced the canary while the placed worker had none.
    model = f"m-{uuid.uuid4().hex[:8]}"
    for version in ("1", "2"):
        await Catalog(client).change(model, lambda m, _, v=version: cat.add_version(m, model, v, 0))
    await Catalog(client).change(model, lambda m, c: cat.set_worker_pools(m, ["gpu"], c))
    registry = WorkerRegistry(client, lease_s=600)
    clock = [time.time()]
    workers = {"s": ("1", "gpu"), "c": ("2", "gpu"), "other": ("2", "")}
    for name, (version, pool) in workers.items():
        address = f"127.0.0.1:{1000 + len(name)}"
        await registry.register(f"{name}-{model}", address, [(model, version)], clock[0], pool=pool)
    rollouts = ro.RolloutStore(client, Catalog(client), registry, _noop)
    await rollouts.start(
        model, "2", ro.Policy(steps=(50, 100), step_s=60, min_requests=50), clock[0]
    )
    driver = ro.RolloutDriver(rollouts, lambda: clock[0])
    try:
        clock[0] += 61
        served = {"s": 500, "c": 0, "other": 500}
        for name, (version, _pool) in workers.items():
            counts = [_counts(model, version, served[name])]
            await registry.renew(f"{name}-{model}", [(model, version)], clock[0], outcomes=counts)
        await driver.tick()
        held = await rollouts.get(model)
        assert (held.state, held.weight) == (ro.RUNNING, 50), held.reason
        assert "waiting for traffic: 0/50" in held.reason
    finally:
        await client.hdel(ro.ROLLOUTS_KEY, model)


async def test_a_crashed_canary_workers_counts_and_its_cut_request_stay_in_the_step(client):
    # A restarted worker reports counters from 0: the step lost what its old run had
    # counted, and a canary crashing every 29 requests waited for traffic for good.
    model, registry, rollouts, driver, clock = await _started_rollout(client)
    canary = f"c-{model}"

    def counts(requests: int, run: str) -> VersionCounts:
        return replace(_counts(model, "2", requests), counters_id=run)

    try:
        clock[0] += 10
        await registry.renew(canary, [(model, "2")], clock[0], outcomes=[counts(29, "a")])
        await driver.tick()
        clock[0] += 1  # it died; its replacement registers under its id, from 0
        await registry.register(canary, "127.0.0.1:1002", [(model, "2")], clock[0])
        await registry.renew(canary, [(model, "2")], clock[0], outcomes=[counts(3, "b")])
        await driver.tick()
        stored = await rollouts.get(model)
        assert (stored.carried["2"].requests, stored.carried["2"].errors) == (30, 1)
        workers = await registry.all(clock[0])
        step = ro.window(stored, workers, "2")
        assert (step.requests, step.errors) == (33, 1)
    finally:
        await client.hdel(ro.ROLLOUTS_KEY, model)
