"""The production bootstrap admin key (TOKENMESH_AUTH_BOOTSTRAP_KEY) is
registered on every start: once revoked or rotated out, it stays refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.auth.crypto import ServerSecret, new_api_key
from services.auth.keys import ApiKeyStore
from services.auth.service import AuthService, AuthSettings
from services.core.server import serving
from tests import mtls
from tests.conftest import private_db_url
from tokenmesh.auth.v1 import auth_pb2

# A logical database of its own: the session mesh's auth service (database 0)
# keeps its keys under the same global `tm:auth:` names.
PRIVATE_DB = 5
SERVER_SECRET = "s" * 32


@pytest.fixture
def db_url(redis_url: str) -> str:
    return private_db_url(redis_url, PRIVATE_DB)


@pytest.fixture
async def keys(db_url: str) -> AsyncIterator[ApiKeyStore]:
    client = aioredis.from_url(db_url)
    assert client.connection_pool.connection_kwargs["db"] == PRIVATE_DB
    await client.flushdb()
    yield ApiKeyStore(client, ServerSecret(SERVER_SECRET.encode()))
    await client.flushdb()
    await client.aclose()


def _settings(db_url: str, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = dict(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=db_url,
        secret=SERVER_SECRET,
    )
    values.update(overrides)
    return AuthSettings(**values)


async def _bootstrap_keys(keys: ApiKeyStore) -> list[auth_pb2.ApiKey]:
    listed, _ = await keys.list("admin", 1000, "")
    return [key for key in listed if key.name == "bootstrap"]


async def test_a_revoked_bootstrap_key_stays_revoked_when_auth_restarts(
    keys: ApiKeyStore, db_url: str
) -> None:
    secret = new_api_key()
    settings = _settings(db_url, bootstrap_key=secret)
    async with serving(AuthService(settings), settings):
        adopted = await keys.authenticate(secret)
        assert adopted is not None and adopted.scopes == ["admin"]
    await keys.revoke(adopted.id)  # it leaked; the secret store still holds it
    async with serving(AuthService(settings), settings):
        assert await keys.authenticate(secret) is None
    assert [(k.id, k.state) for k in await _bootstrap_keys(keys)] == [
        (adopted.id, auth_pb2.API_KEY_STATE_REVOKED)
    ]


async def test_a_bootstrap_secret_rotated_out_is_not_adopted_again(keys: ApiKeyStore) -> None:
    secret = new_api_key()
    adopted = await keys.adopt(secret, "admin", ["admin"])
    assert adopted is not None
    _, new_secret, _ = await keys.rotate(adopted.id, 0)  # the overlap is over at once
    assert await keys.adopt(secret, "admin", ["admin"]) is None
    assert await keys.authenticate(secret) is None
    still = await keys.authenticate(new_secret)
    assert still is not None and still.id == adopted.id
    assert [k.id for k in await _bootstrap_keys(keys)] == [adopted.id]


async def test_an_active_bootstrap_key_is_adopted_as_itself(keys: ApiKeyStore) -> None:
    secret = new_api_key()
    first = await keys.adopt(secret, "admin", ["admin"])
    again = await keys.adopt(secret, "admin", ["admin"])  # the next start
    assert first is not None and again is not None and again.id == first.id
    # Replicas starting at once register it once.
    secret = new_api_key()
    adopted = await asyncio.gather(*(keys.adopt(secret, "admin", ["admin"]) for _ in range(4)))
    assert len({key.id for key in adopted if key is not None}) == 1, adopted
    assert len(await _bootstrap_keys(keys)) == 2
