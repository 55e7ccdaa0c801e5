"""`make run`'s Redis: each service logs in as its own ACL user, `default` is off.

A mesh of its own (the launcher starts the bundled Redis with the ACL file of
services/core/redis_acl.py). Before, every child got one credential-less
REDIS_URL: a worker could rewrite any key, e.g. add `admin` to an API key.
"""

from __future__ import annotations

import stat
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError

from services.auth.keys import key_record_name
from services.core import redis_acl
from services.launcher.mesh import REDIS_ACL_FILE, REDIS_PASSWORDS_FILE, Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc


@pytest.fixture(scope="module")
def users_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("redis-users")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=TEST_SERVICE_ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


def _child_env(mesh: Mesh, name: str) -> dict[str, str]:
    """Returns a running child's environment, as the process itself holds it."""
    raw = Path(f"/proc/{mesh.pid(name)}/environ").read_bytes()
    pairs = (entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)
    return dict(pairs)


def _user_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).username or "")


def test_every_service_logs_in_as_its_own_user(users_mesh: Mesh) -> None:
    for name, module in [
        *((s, s) for s in ("auth", "router", "usage", "jobs")),
        ("inference-0", "inference"),
    ]:
        env = _child_env(users_mesh, name)
        assert _user_of(env["REDIS_URL"]) == module, name
        assert _user_of(env["TOKENMESH_RATELIMIT_REDIS_URL"]) == module, name
    with redis.Redis.from_url(users_mesh.redis_url) as admin:
        clients = admin.client_list()
        assert {c["user"] for c in clients} >= {*redis_acl.SERVICE_USERS, redis_acl.ADMIN}
        assert "default" not in {c["user"] for c in clients}


def test_anonymous_clients_are_refused(users_mesh: Mesh) -> None:
    for url in (users_mesh.redis_url, users_mesh.limits_redis_url):
        port = urllib.parse.urlsplit(url).port or 6379
        with redis.Redis(port=port) as anonymous, pytest.raises(AuthenticationError):
            anonymous.ping()


def test_the_passwords_and_the_acl_file_are_private(users_mesh: Mesh) -> None:
    for path in (
        users_mesh.state_dir / REDIS_PASSWORDS_FILE,
        users_mesh.state_dir / REDIS_ACL_FILE,
        users_mesh.run_dir / "mesh.json",  # it names the admin URL
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_worker_cannot_make_a_key_admin_with_its_redis_url(users_mesh: Mesh) -> None:
    """The review's escalation, from what the worker process holds: its REDIS_URL."""
    admin = [("x-api-key", users_mesh.dev_api_key())]
    with authed_channel(users_mesh.edge_address, admin) as channel:
        created = auth_service_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
            auth_service_pb2.CreateApiKeyRequest(tenant="t-acl", scopes=["models:read"]),
            timeout=10,
        )
    record = key_record_name(created.api_key.id)
    forged = auth_pb2.ApiKey()
    forged.CopyFrom(created.api_key)
    forged.scopes.append("admin")
    with redis.Redis.from_url(_child_env(users_mesh, "inference-0")["REDIS_URL"]) as worker:
        with pytest.raises(NoPermissionError):
            worker.set(record, forged.SerializeToString())
        with pytest.raises(NoPermissionError):
            worker.hset("tokenmesh:router:workers", "inference-9", "{}")
    with redis.Redis.from_url(users_mesh.redis_url) as admin_client:
        stored = auth_pb2.ApiKey.FromString(admin_client.get(record))
    assert list(stored.scopes) == ["models:read"]


def test_services_log_in_again_after_redis_restarts(users_mesh: Mesh) -> None:
    users_mesh.restart_redis()
    deadline = time.monotonic() + 30
    admin = [("x-api-key", users_mesh.dev_api_key())]
    while True:
        try:
            with authed_channel(users_mesh.edge_address, admin) as channel:
                auth_service_pb2_grpc.AuthServiceStub(channel).ListApiKeys(
                    auth_service_pb2.ListApiKeysRequest(), timeout=5
                )
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, users_mesh.log_tails()
            time.sleep(0.2)
