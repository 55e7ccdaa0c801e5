"""Each component logs in to Redis as its own ACL user (services/core/redis_acl.py).

A real redis-server loads the ACL file the table renders. A worker (or a jobs
pod) used to hold a REDIS_URL with every right: it could add `admin` to an API
key's record, which the auth service then vouched at the edge, or rewrite the
router's registry, bypassing every mTLS rule. Now those writes are refused with
NOPERM, and each component's real store classes still work under its user.

Read-only key patterns (`%R~`) need Redis 7: the bundled redis-server is 6.2,
where the jobs user's reads (key records, registry, catalogue) are read-write;
those checks run on a Redis 7 (Debian's redis-server) where one is installed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import secrets
import shutil
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from services.auth.crypto import ServerSecret
from services.auth.keys import ApiKeyStore, key_record_name
from services.auth.signing import SigningKeyRing
from services.core import redis_acl
from services.core.tasks import Supervisor
from services.inference.budget import Limits, TokenBudgets
from services.inference.usage_log import UsageLog
from services.jobs import store as jobstore
from services.jobs.key_status import KeyStatus
from services.jobs.workers import WorkerDirectory
from services.launcher.mesh import redis_server_binary, spawn_redis
from services.router.catalog import CATALOG_KEY, Catalog
from services.router.prompts import PromptCatalog
from services.router.registry import WORKERS_KEY, WorkerRegistry
from services.router.rollouts import ROLLOUTS_KEY
from services.router.shadow_pairs import PairStore, Record
from services.usage.meter import Meter, Retention, bucket_key, bucket_start
from tokenmesh.auth.v1 import auth_pb2
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.type.v1 import types_pb2


def _servers() -> list[object]:
    """The bundled redis-server (6.2), and a Redis 7 when one is installed."""
    found = shutil.which("redis-server")
    system = Path(found) if found else None
    seven = system is not None and redis_acl.binary_major(system) >= 7
    return [
        pytest.param(redis_server_binary(), id="bundled"),
        pytest.param(
            system,
            id="redis7",
            marks=pytest.mark.skipif(not seven, reason="no Redis >= 7 (apt install redis-server)"),
        ),
    ]


@dataclass
class AclRedis:
    """AclRedis is a redis-server with the table's users loaded and `default` off."""

    admin_url: str
    passwords: dict[str, str]
    major: int

    def url(self, user: str) -> str:
        """Returns the URL that logs in as `user`."""
        return redis_acl.url_for(self.admin_url, user, self.passwords[user])

    def client(self, user: str) -> aioredis.Redis:
        """Returns a client logged in as `user`."""
        return aioredis.from_url(self.url(user))


@pytest.fixture(params=_servers())
def acl_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AclRedis]:
    binary: Path = request.param
    passwords = {name: secrets.token_hex(16) for name in redis_acl.USERS}
    child, url = spawn_redis(
        tmp_path / "redis",
        tmp_path / "redis.log",
        durable=False,
        passwords=passwords,
        binary=binary,
    )
    try:
        yield AclRedis(url, passwords, redis_acl.binary_major(binary))
    finally:
        child.terminate()
        child.wait(10)


@pytest.fixture
async def clients(acl_redis: AclRedis) -> AsyncIterator[dict[str, aioredis.Redis]]:
    """A client per user of the table."""
    opened = {name: acl_redis.client(name) for name in redis_acl.USERS}
    yield opened
    for client in opened.values():
        await client.aclose()


def _needs_read_only_patterns(acl_redis: AclRedis, user: str, key: str) -> None:
    """Skips a write check Redis 6 cannot make: the key is one `user` may read."""
    readable = any(fnmatch.fnmatchcase(key, g.pattern) for g in redis_acl.USERS[user].grants)
    if readable and acl_redis.major < redis_acl.READ_ONLY_PATTERNS_SINCE:
        pytest.skip(f"Redis {acl_redis.major} has no read-only key patterns ({user} reads {key})")


async def test_anonymous_connections_are_refused(acl_redis: AclRedis) -> None:
    port = urllib.parse.urlsplit(acl_redis.admin_url).port
    anonymous = aioredis.from_url(f"redis://127.0.0.1:{port}/0")  # the `default` user
    try:
        with pytest.raises(Exception, match="(?i)auth"):
            await anonymous.set("tm:auth:key:key_0000000000000000", b"x")
    finally:
        await anonymous.aclose()


@pytest.mark.parametrize("user", ["inference", "jobs"])
async def test_a_worker_or_jobs_pod_cannot_make_its_key_admin(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis], user: str
) -> None:
    """The review's escalation: the record of a models:read key, rewritten with `admin`
    by a client holding only the component's REDIS_URL, was vouched as admin."""
    _needs_read_only_patterns(acl_redis, user, "tm:auth:key:key_0000000000000000")
    keys = ApiKeyStore(clients["auth"], ServerSecret(os.urandom(32)))
    key, secret = await keys.create(
        "tenant-a", "low", ["models:read"], [], auth_pb2.KeyLimits(), None
    )
    forged = auth_pb2.ApiKey()
    forged.CopyFrom(key)
    forged.scopes.append("admin")
    with pytest.raises(NoPermissionError):
        await clients[user].set(key_record_name(key.id), forged.SerializeToString())
    with pytest.raises(NoPermissionError):
        await clients[user].delete(key_record_name(key.id))
    found = await keys.authenticate(secret)
    assert found is not None and list(found.scopes) == ["models:read"]


# What neither may write: the auth service's keys and the router's registry and catalogue.
PROTECTED = [
    ("SET", "tm:auth:key:key_0000000000000000", "x"),
    ("SET", "tm:auth:secret:digest", "key_0000000000000000"),
    ("HSET", "tm:auth:signing:keys", "kid", "x"),
    ("SADD", "tm:auth:tenant:t", "key_0000000000000000"),
    ("HSET", WORKERS_KEY, "w1", "{}"),
    ("HDEL", WORKERS_KEY, "w1"),
    ("HSET", CATALOG_KEY, "demo-lm", "{}"),
    ("HSET", ROLLOUTS_KEY, "demo-lm", "{}"),
    ("DEL", "tokenmesh:router:{policies}:attachments"),
]


@pytest.mark.parametrize("user", ["inference", "jobs"])
@pytest.mark.parametrize("command", PROTECTED, ids=lambda c: f"{c[0]}-{c[1]}")
async def test_workers_and_jobs_cannot_write_auth_or_router_keys(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis], user: str, command: tuple[str, ...]
) -> None:
    _needs_read_only_patterns(acl_redis, user, command[1])
    with pytest.raises(NoPermissionError):
        await clients[user].execute_command(*command)
    # Not in a script either: Redis checks a script's keys against its caller.
    script = "return redis.call('DEL', KEYS[1])"
    with pytest.raises(NoPermissionError):
        await clients[user].eval(script, 1, command[1])


@pytest.mark.parametrize("user", redis_acl.SERVICE_USERS)
@pytest.mark.parametrize(
    "command", [("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("SCRIPT", "FLUSH")]
)
async def test_no_service_may_run_admin_commands(
    clients: dict[str, aioredis.Redis], user: str, command: tuple[str, ...]
) -> None:
    with pytest.raises(NoPermissionError):
        await clients[user].execute_command(*command)


async def test_each_component_works_as_its_own_user(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis], tmp_path: Path
) -> None:
    """The real store classes of every component, each logged in as its own user."""
    now = time.time()
    secret = ServerSecret(os.urandom(32))
    # auth: keys and signing keys.
    keys = ApiKeyStore(clients["auth"], secret)
    key, api_key = await keys.create("t1", "k", ["jobs"], [], auth_pb2.KeyLimits(), None)
    assert await keys.authenticate(api_key) is not None
    _, api_key, _ = await keys.rotate(key.id, 0)
    listed, _ = await keys.list("t1", 10, "")
    assert [k.id for k in listed] == [key.id]
    ring = SigningKeyRing(clients["auth"], secret, 3600, 60)
    await ring.ensure()
    await ring.rotate(force=True)
    assert len((await ring.jwks())["keys"]) >= 1
    # router: catalogue, registry, prompts.
    await Catalog(clients["router"]).register([("demo-lm", "1")])
    registry = WorkerRegistry(clients["router"], 30)
    await registry.register("w1", "127.0.0.1:50051", [("demo-lm", "1")], now)
    assert [w.worker_id for w in await registry.all(now, forget=True)] == ["w1"]
    await PromptCatalog(clients["router"]).create("greet", "Hello {{ name }}", "", [], now)
    await clients["router"].time()
    # inference: budgets, the usage spool shipped to the stream, prompts read, shadow pairs.
    budgets = TokenBudgets(clients["inference"])
    await budgets.reserve(key.id, Limits(tokens_per_minute=100), "r1", 10)
    await budgets.reconcile(key.id, "r1", 10, 4)
    assert (await PromptCatalog(clients["inference"]).head("greet")).latest == 1
    record = Record("1", "stop", 1.0, 1.0, 2.0, 3, None, None, True, "h")
    await PairStore(clients["inference"]).write("demo-lm", "r1", "live", record, int(now * 1000))
    log = UsageLog(tmp_path / "spool", clients["inference"], redis_acl.USAGE_STREAM, 1 << 20)
    log.start(Supervisor("inference-acl"))
    try:
        log.append(_usage_event(key.id))
        await _until(lambda: log.backlog_bytes() == 0)
    finally:
        await log.stop()
    # usage: meters what the worker shipped.
    meter = Meter(clients["usage"], redis_acl.USAGE_STREAM, "usage-meter", "c1", Retention())
    await meter.ensure_group()
    assert await meter.run_once(block_ms=100)
    day = bucket_key(f"key:{key.id}", "day", bucket_start(time.time(), "day"))
    assert await clients["usage"].hgetall(day)
    await meter.trim()
    # jobs: a job, its key's state, and the workers that serve its model.
    jobs = jobstore.JobStore(clients["jobs"], 3600)
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="demo-lm", prompt="a"))
    owner = jobstore.Owner(key.id, "", {})
    job_id, _ = await jobs.create(
        jobstore.NewJob(owner, [item], "", {}, "", jobstore.now_ms() + 600_000)
    )
    assert (await jobs.get(job_id)) is not None
    assert await KeyStatus(clients["jobs"]).stop_reason(key.id) == ""
    # The key's record only, not the set of its secrets' digests beside it (the jobs
    # user read tm:auth:key:*, those sets too).
    for read in (
        ("SMEMBERS", f"{key_record_name(key.id)}:secrets"),
        ("SCARD", f"{key_record_name(key.id)}:secrets"),
    ):
        assert await clients["auth"].execute_command(*read)
        with pytest.raises(NoPermissionError):
            await clients["jobs"].execute_command(*read)
    await keys.revoke(key.id)
    assert await KeyStatus(clients["jobs"], ttl_s=0).stop_reason(key.id) == jobstore.KEY_REVOKED
    assert [w.worker_id for w in await WorkerDirectory(clients["jobs"]).workers()] == ["w1"]
    # An id the auth service never mints is no record: not looked up (NOPERM if it were).
    assert await KeyStatus(clients["jobs"], ttl_s=0).stop_reason("k:secrets") == ""


def _usage_event(key_id: str) -> inference_pb2.UsageEvent:
    request_id = uuid.uuid4().hex
    return inference_pb2.UsageEvent(
        request_id=request_id,
        event_id=request_id,
        key_id=key_id,
        tenant="t1",
        finish_reason="stop",
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=5, completion_tokens=7, total_tokens=12),
        finish_unix_ms=int(time.time() * 1000),
    )


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
