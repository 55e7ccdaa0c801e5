"""Read-modify-writes of shared Redis state lose no update when two writers meet.

Each race is reproduced against a real Redis in one of two ways: an
`InterleavedRedis` client lets the other writer act right after this
client's read and before its write (deterministic), or many writers run at
once for many rounds. Each race test here fails on the read-then-write code
it guards against (the catalogue's on a GET-then-SET `Catalog.change`: its
WATCH/MULTI was already right).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from services.auth.crypto import ServerSecret
from services.auth.keys import ApiKeyStore
from services.auth.signing import LOCK, SigningKeyRing
from services.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.inference.budget import Limits, TokenBudgets
from services.launcher.mesh import spawn_redis
from services.router import catalog as cat
from services.router.catalog import Catalog
from services.router.registry import (
    DRAINING,
    HEAT_KEY,
    SERVING,
    WORKERS_KEY,
    HotPrefix,
    VersionCounts,
    WorkerCaller,
    WorkerRegistry,
)
from tokenmesh.auth.v1 import auth_pb2


class _Hook:
    """Runs `between()` once, after the first reply to `command`."""

    def __init__(self, command: str, between: Callable[[], Awaitable[object]]) -> None:
        self.command = command.upper()
        self.between: Callable[[], Awaitable[object]] | None = between

    async def after(self, command: object) -> None:
        if self.between is not None and str(command).upper() == self.command:
            between, self.between = self.between, None
            await between()

    @property
    def fired(self) -> bool:
        return self.between is None


class InterleavedRedis(aioredis.Redis):
    """A real Redis client that lets another writer act between its read and its write.

    Once the first `hook.command` it sends (directly, or while a pipeline
    WATCHes) has been answered, it awaits `hook.between()`, then goes on.
    """

    hook: _Hook

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await super().execute_command(*args, **options)
        await self.hook.after(args[0])
        return reply

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _InterleavedPipeline(
            self.hook, self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


class _InterleavedPipeline(Pipeline):
    def __init__(self, hook: _Hook, *args: Any) -> None:
        super().__init__(*args)
        self.hook = hook

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await super().immediate_execute_command(*args, **options)
        await self.hook.after(args[0])
        return reply


def _interleaved(
    url: str, command: str, between: Callable[[], Awaitable[object]]
) -> InterleavedRedis:
    client = cast(InterleavedRedis, InterleavedRedis.from_url(url))
    client.hook = _Hook(command, between)
    return client


Interleave = Callable[[str, Callable[[], Awaitable[object]]], aioredis.Redis]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def interleaved(redis_url: str) -> AsyncIterator[Interleave]:
    """Returns clients whose first `command` is followed by `between()`."""
    clients: list[InterleavedRedis] = []

    def make(command: str, between: Callable[[], Awaitable[object]]) -> aioredis.Redis:
        client = _interleaved(redis_url, command, between)
        clients.append(client)
        return client

    yield make
    for client in clients:
        assert client.hook.fired, f"no {client.hook.command} was sent: the race was not run"
        await client.aclose()


LOOPBACK = frozenset({"127.0.0.1"})  # the hosts a worker caller on this machine presents


def _worker_id() -> str:
    return f"w-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------
# Worker registry: heartbeat and registration vs drain
# ---------------------------------------------------------------------------


async def test_a_drain_between_a_heartbeats_read_and_write_is_kept(client, interleaved):
    worker, now = _worker_id(), time.time()
    operator = WorkerRegistry(client, lease_s=30)
    await operator.register(worker, "127.0.0.1:1001", [("m", "1")], now)
    heartbeat = WorkerRegistry(interleaved("HGETALL", lambda: operator.drain(worker)), lease_s=30)
    renewed, _, _ = await heartbeat.renew(worker, [("m", "1")], now + 1)
    assert renewed.state == DRAINING  # the worker is told to drain by this very heartbeat
    assert renewed.lease_expires_at == now + 31
    assert (await operator.get(worker)).state == DRAINING


async def test_a_heartbeat_is_checked_against_the_registration_it_writes(client, interleaved):
    # Worker A's lease lapsed; between its late heartbeat's read and write,
    # worker B registers the id with its own token. A's heartbeat must not
    # then rewrite B's registration (the token is checked on every retry).
    worker, now = _worker_id(), time.time()
    token_a, token_b = "a" * 43, "b" * 43
    operator = WorkerRegistry(client, lease_s=30)
    await operator.register(worker, "127.0.0.1:1001", [("m", "1")], now - 100, token_a)

    async def takeover() -> None:
        await operator.register(worker, "127.0.0.1:1002", [("m", "2")], now, token_b)

    late = WorkerRegistry(interleaved("HGETALL", takeover), lease_s=30)
    with pytest.raises(PermissionDenied) as refused:
        await late.renew(worker, [("m", "1")], now + 1, caller=WorkerCaller(token_a, LOOPBACK))
    assert refused.value.reason == "NOT_LEASE_HOLDER"
    kept = await operator.get(worker)
    assert (kept.address, kept.models, kept.holds(token_b)) == (
        "127.0.0.1:1002",
        (("m", "2"),),
        True,
    )


async def _taken_from_elsewhere_after(
    client: aioredis.Redis, interleaved: Interleave, command: str, now: float
) -> tuple[str, WorkerRegistry, WorkerRegistry]:
    """Registers a worker on this host without a lease token (as workers of before
    lease tokens did), its lease lapsed; returns its id, an operator's registry, and
    a registry whose first `command` (a change's read) is followed by a worker on
    another host registering the id."""
    worker = _worker_id()
    operator = WorkerRegistry(client, lease_s=30)
    await operator.register(worker, "127.0.0.1:1001", [("m", "1")], now - 100)

    async def elsewhere() -> None:
        await operator.register(worker, "10.9.8.7:1002", [("m", "2")], now)

    return worker, operator, WorkerRegistry(interleaved(command, elsewhere), lease_s=30)


async def test_a_tokenless_heartbeat_is_checked_for_its_host_on_the_entry_it_writes(
    client, interleaved
):
    # The late heartbeat must not rewrite the other host's registration: the
    # host is checked on every retry, as the token is (the router used to
    # check it once, on a read before the compare-and-set).
    now = time.time()
    worker, operator, late = await _taken_from_elsewhere_after(client, interleaved, "HGETALL", now)
    with pytest.raises(PermissionDenied) as refused:
        await late.renew(worker, [("m", "1")], now + 1, caller=WorkerCaller("", LOOPBACK))
    assert refused.value.reason == "NOT_OWN_ADDRESS"
    kept = await operator.get(worker)
    assert (kept.address, kept.models) == ("10.9.8.7:1002", (("m", "2"),))


async def test_a_drain_is_checked_for_its_host_on_the_entry_it_writes(client, interleaved):
    now = time.time()
    worker, operator, late = await _taken_from_elsewhere_after(client, interleaved, "HGET", now)
    with pytest.raises(PermissionDenied) as refused:
        await late.drain(worker, WorkerCaller("", LOOPBACK))
    assert refused.value.reason == "NOT_OWN_ADDRESS"
    assert (await operator.get(worker)).state == SERVING


class _Recording(aioredis.Redis):
    """A client that records the name of every command it sends."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return await super().execute_command(*args, **options)


async def test_a_heartbeat_reads_the_registry_once(client, redis_url):
    worker, now = _worker_id(), time.time()
    await WorkerRegistry(client, lease_s=30).register(worker, "127.0.0.1:1001", [("m", "1")], now)
    recording = cast(_Recording, _Recording.from_url(redis_url))
    recording.sent = []
    try:
        await WorkerRegistry(recording, lease_s=30).renew(worker, [("m", "1")], now + 1)
    finally:
        await recording.aclose()
    # One read for its own entry and the others' costs, then the compare-and-set.
    assert [c for c in recording.sent if c.startswith("HGET")] == ["HGETALL"], recording.sent


async def test_draining_while_heartbeating_leaves_the_worker_draining(client):
    """Many workers, each drained while heartbeats and re-reads race it."""
    registry, now = WorkerRegistry(client, lease_s=30), time.time()
    workers = [_worker_id() for _ in range(40)]
    for n, worker in enumerate(workers):
        await registry.register(worker, f"127.0.0.1:{2000 + n}", [("m", "1")], now)

    async def heartbeats(worker: str) -> None:
        for beat in range(5):
            await registry.renew(worker, [("m", "1")], now + beat)

    await asyncio.gather(*(heartbeats(w) for w in workers), *(registry.drain(w) for w in workers))
    states = {w: (await registry.get(w)).state for w in workers}
    assert set(states.values()) == {DRAINING}, states


async def test_two_workers_registering_one_id_at_once_do_not_both_win(client, interleaved):
    worker, now = _worker_id(), time.time()
    second = WorkerRegistry(client, lease_s=30)
    first = WorkerRegistry(
        interleaved("HGET", lambda: second.register(worker, "127.0.0.1:1002", [("m", "1")], now)),
        lease_s=30,
    )
    with pytest.raises(AlreadyExists, match="127.0.0.1:1002"):
        await first.register(worker, "127.0.0.1:1001", [("m", "1")], now)
    assert (await second.get(worker)).address == "127.0.0.1:1002"


async def test_forgetting_a_long_gone_worker_spares_it_once_it_registered_again(
    client, interleaved
):
    worker, then = _worker_id(), time.time() - 3600
    fresh = WorkerRegistry(client, lease_s=30)
    await fresh.register(worker, "127.0.0.1:1003", [("m", "1")], then)
    back = lambda: fresh.register(worker, "127.0.0.1:1003", [("m", "1")], time.time())  # noqa: E731
    lister = WorkerRegistry(interleaved("HGETALL", back), lease_s=30)
    await lister.all(time.time(), forget=True)  # read the old lease, then it came back
    assert (await fresh.get(worker)).state == SERVING


# ---------------------------------------------------------------------------
# API keys: last use vs revoke, revoke vs rotate
# ---------------------------------------------------------------------------


@pytest.fixture
def keys(client) -> ApiKeyStore:
    return ApiKeyStore(client, ServerSecret(b"s" * 32))


async def _new_key(keys: ApiKeyStore) -> tuple[str, str]:
    key, secret = await keys.create(
        "race", "k", ["inference:generate"], [], auth_pb2.KeyLimits(), None
    )
    return key.id, secret


async def _assert_revoked_for_good(keys: ApiKeyStore, key_id: str, secret: str) -> None:
    assert (await keys.get(key_id)).state == auth_pb2.API_KEY_STATE_REVOKED
    assert await keys.authenticate(secret) is None
    with pytest.raises(FailedPrecondition, match="not active"):
        await keys.rotate(key_id, 0)  # never back to ACTIVE with a working secret


async def test_a_use_recorded_from_a_copy_read_before_a_revoke_keeps_it_revoked(keys):
    key_id, secret = await _new_key(keys)
    in_use = await keys.authenticate(secret)
    assert in_use is not None
    await keys.revoke(key_id)
    await keys.touch(in_use)
    await _assert_revoked_for_good(keys, key_id, secret)
    assert (await keys.get(key_id)).last_used_time == in_use.last_used_time


async def _revoke_while_in_use(keys: ApiKeyStore, users: int, uses_after: int) -> None:
    """Users authenticate and record each use as fast as they can while it is revoked."""
    key_id, secret = await _new_key(keys)
    revoked = asyncio.Event()
    uses_after_revoke = [0] * users

    async def use(n: int) -> None:
        key = await keys.authenticate(secret)
        assert key is not None
        while uses_after_revoke[n] < uses_after:
            key = await keys.authenticate(secret) or key  # keeps the last copy it had
            await keys.touch(key)
            uses_after_revoke[n] += revoked.is_set()

    async def revoke() -> None:
        await keys.revoke(key_id)
        revoked.set()

    await asyncio.gather(*(use(n) for n in range(users)), revoke())
    await _assert_revoked_for_good(keys, key_id, secret)


async def test_a_key_revoked_while_used_in_a_tight_loop_stays_revoked(keys):
    for _ in range(10):
        await _revoke_while_in_use(keys, users=4, uses_after=20)


async def test_a_revoke_between_a_rotations_read_and_write_wins(keys, interleaved):
    key_id, secret = await _new_key(keys)
    rotating = ApiKeyStore(interleaved("GET", lambda: keys.revoke(key_id)), keys.secret)
    with pytest.raises(FailedPrecondition, match="not active"):
        await rotating.rotate(key_id, 0)
    await _assert_revoked_for_good(keys, key_id, secret)


async def test_a_rotation_between_a_revokes_read_and_write_is_revoked_too(
    keys, client, interleaved
):
    key_id, secret = await _new_key(keys)
    rotated: list[str] = []

    async def rotate() -> None:
        rotated.append((await keys.rotate(key_id, 3600))[1])

    revoking = ApiKeyStore(interleaved("SMEMBERS", rotate), keys.secret)
    await revoking.revoke(key_id)
    digest = keys.secret.hash_api_key(rotated[0])
    assert not await client.exists(f"tm:auth:secret:{digest}")  # no secret maps to it
    await _assert_revoked_for_good(keys, key_id, secret)


# ---------------------------------------------------------------------------
# Catalogue edits
# ---------------------------------------------------------------------------


async def test_a_catalogue_edit_between_anothers_read_and_write_is_kept(client, interleaved):
    model = f"m-{uuid.uuid4().hex[:8]}"
    other = Catalog(client)
    for version in ("1", "2"):
        await other.change(model, lambda m, _, v=version: cat.add_version(m, model, v, 0))
    editor = Catalog(
        interleaved("HGETALL", lambda: other.update(model, lambda m, _: cat.pin(m, "2")))
    )
    await editor.update(model, lambda m, _: cat.set_alias(m, "stable", "1"))
    stored = await other.get(model)
    assert (stored.pinned, dict(stored.aliases)) == ("2", {"stable": "1"})


async def test_concurrent_catalogue_edits_are_all_kept(client):
    model = f"m-{uuid.uuid4().hex[:8]}"
    catalogs = [Catalog(client) for _ in range(3)]
    await catalogs[0].change(model, lambda m, _: cat.add_version(m, model, "1", 0))
    versions = [str(n) for n in range(2, 12)]
    aliases = [f"a{n}" for n in range(20)]
    await asyncio.gather(
        *(
            catalogs[n % 3].change(model, lambda m, _, v=v: cat.add_version(m, model, v, 0))
            for n, v in enumerate(versions)
        ),
        *(
            catalogs[n % 3].update(model, lambda m, _, a=a: cat.set_alias(m, a, "1"))
            for n, a in enumerate(aliases)
        ),
        catalogs[0].update(model, lambda m, _: cat.pin(m, "1")),
    )
    stored = await catalogs[0].get(model)
    assert {v.version for v in stored.versions} == {"1", *versions}
    assert set(stored.aliases) == set(aliases)
    assert stored.pinned == "1"


# ---------------------------------------------------------------------------
# Signing-key rotation across auth replicas
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of its own: the key ring is global, and other tests' services use theirs."""
    state: Path = tmp_path_factory.mktemp("ring-redis")
    child, url = spawn_redis(state / "data", state / "redis.log", durable=False)
    try:
        yield url
    finally:
        child.terminate()
        child.wait(10)


@pytest.fixture
async def ring_client(ring_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(ring_redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def _ring(client: aioredis.Redis, **options: Any) -> SigningKeyRing:
    return SigningKeyRing(client, ServerSecret(b"s" * 32), 900, 300, **options)


async def _states(ring: SigningKeyRing) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for record in await ring.records():
        states.setdefault(record.state, []).append(record.kid)
    return states


async def test_two_replicas_rotating_at_once_leave_one_consistent_ring(ring_client, ring_redis_url):
    replicas = [_ring(aioredis.from_url(ring_redis_url)) for _ in range(2)]
    await replicas[0].ensure()
    try:
        for _ in range(20):
            before = await _states(replicas[0])
            results = await asyncio.gather(
                *(r.rotate(force=True) for r in replicas), return_exceptions=True
            )
            rotated = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(e, FailedPrecondition) for e in refused), refused
            assert rotated, refused
            after = await _states(replicas[0])
            assert len(after["current"]) == len(after["next"]) == 1, after
            assert after["current"] == [rotated[-1].kid]
            if len(rotated) == 1:  # one rotation: the next key became current
                assert after["current"] == before["next"]
                assert before["current"][0] in after["previous"]
    finally:
        for replica in replicas:
            await replica.redis.aclose()


async def test_a_replica_that_lost_its_lock_while_rotating_writes_nothing(
    ring_client, ring_redis_url
):
    """Replica A stalls past its lock's lifetime; B rotates; A's late write is refused."""
    b = _ring(ring_client)
    await b.ensure()
    rotated_by_b = []

    async def lock_expires_then_b_rotates() -> None:
        while await ring_client.exists(LOCK):  # A's lock runs out while A is stalled
            await asyncio.sleep(0.005)
        rotated_by_b.append(await b.rotate(force=True))

    stalled = _interleaved(ring_redis_url, "HGETALL", lock_expires_then_b_rotates)
    a = _ring(stalled, lock_ms=50)
    try:
        with pytest.raises(FailedPrecondition) as refused:
            await a.rotate(force=True)
        assert refused.value.reason == "SIGNING_KEYS_LOCK_LOST"
    finally:
        await stalled.aclose()
    after = await _states(b)
    assert after["current"] == [rotated_by_b[0].kid]
    assert len(after["next"]) == 1, after


# ---------------------------------------------------------------------------
# Token budgets with many reservations
# ---------------------------------------------------------------------------


async def _fill_window(client: aioredis.Redis, key_id: str, at_ms: int, count: int) -> None:
    """Stores `count` 1-token reservations made at `at_ms`, as `reserve` leaves them."""
    window = f"tm:budget:{key_id}:tpm"
    async with client.pipeline(transaction=False) as pipe:
        pipe.zadd(window, {f"r{n}": at_ms for n in range(count)})
        pipe.hset(f"{window}:amounts", mapping={f"r{n}": 1 for n in range(count)})
        await pipe.execute()


async def test_a_budget_window_of_10000_expired_reservations_is_cleared(client):
    budgets, key_id = TokenBudgets(client), f"key_{uuid.uuid4().hex[:8]}"
    await _fill_window(client, key_id, int((time.time() - 120) * 1000), 10_000)
    assert (await budgets.reserve(key_id, Limits(tokens_per_minute=100), "now", 10)).warning == ""
    window = f"tm:budget:{key_id}:tpm"
    assert await client.zcard(window) == await client.hlen(f"{window}:amounts") == 1


async def test_a_budget_window_of_10000_live_reservations_still_limits(client):
    budgets, key_id = TokenBudgets(client), f"key_{uuid.uuid4().hex[:8]}"
    await _fill_window(client, key_id, int(time.time() * 1000), 10_000)
    limits = Limits(tokens_per_minute=10_000)
    with pytest.raises(ResourceExhausted, match="tokens_per_minute=10000") as info:
        await budgets.reserve(key_id, limits, "one-more", 1)
    assert info.value.reason == "TOKEN_BUDGET_EXCEEDED"


async def test_hot_heads_are_kept_apart_from_the_entry_and_replaced_by_each_heartbeat(client):
    worker, now = _worker_id(), time.time()
    registry = WorkerRegistry(client, lease_s=30)
    await registry.register(worker, "127.0.0.1:1001", [("m", "1")], now)
    hot = VersionCounts(
        "m", "1", 3, 0, (1.0,), (1, 2, 0), hot_prefixes=(HotPrefix("aabb", 4.0, now, 440),)
    )
    await registry.renew(worker, [("m", "1")], now + 1, outcomes=[hot])
    (listed,) = [w for w in await registry.all(now + 1) if w.worker_id == worker]
    assert listed.outcomes[0].hot_prefixes == (HotPrefix("aabb", 4.0, now, 440),)
    # The entry every heartbeat reads does not carry them.
    assert b"aabb" not in await client.hget(WORKERS_KEY, worker)
    # Four fields a head, under a key of their own: routers of an earlier version
    # unpack three from "tokenmesh:router:worker-heat", and would fail every build.
    assert HEAT_KEY.endswith(":2")
    assert json.loads(await client.hget(HEAT_KEY, worker)) == {"m@1": [["aabb", 4.0, now, 440]]}
    assert not await client.hexists("tokenmesh:router:worker-heat", worker)
    await registry.renew(worker, [("m", "1")], now + 2, outcomes=[replace(hot, hot_prefixes=())])
    (listed,) = [w for w in await registry.all(now + 2) if w.worker_id == worker]
    assert listed.outcomes[0].hot_prefixes == ()


class _EveryTime(_Hook):
    """Runs `between()` after every reply to `command`."""

    def __init__(self, command: str, between: Callable[[], Awaitable[object]]) -> None:
        super().__init__(command, between)
        self.always = between

    async def after(self, command: object) -> None:
        if str(command).upper() == self.command:
            await self.always()


async def test_a_catalogue_change_that_always_collides_gives_up_retryable(client, redis_url):
    # Another writer changes the catalogue between every read and write of this
    # change: it used to retry for ever (a router RPC that never answered).
    model = f"m-{uuid.uuid4().hex[:8]}"
    other = Catalog(client)
    await other.change(model, lambda m, _: cat.add_version(m, model, "1", 0))
    collisions = 0

    async def collide() -> None:
        nonlocal collisions
        collisions += 1
        entry = cat.add_version(None, f"{model}-other", str(collisions), 0)
        await client.hset(cat.CATALOG_KEY, entry.name, entry.to_json())

    colliding = cast(InterleavedRedis, InterleavedRedis.from_url(redis_url))
    colliding.hook = _EveryTime("HGETALL", collide)
    try:
        with pytest.raises(Unavailable, match=f"changed {cat.CHANGE_ATTEMPTS} times"):
            await asyncio.wait_for(
                Catalog(colliding).update(model, lambda m, _: cat.pin(m, "1")), timeout=30
            )
    finally:
        await colliding.aclose()
        await client.hdel(cat.CATALOG_KEY, f"{model}-other")
    # Each attempt reads the documents and the placements (two HGETALLs, each collided).
    assert collisions == 2 * cat.CHANGE_ATTEMPTS
    assert (await other.get(model)).pinned == ""  # nothing half-written
