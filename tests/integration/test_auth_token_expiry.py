"""A JWT issued for an API key expires no later than the key, or than the old
secret it was issued for when that secret is in a rotation's overlap."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import jwt
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2

from services.auth.service import AuthService, AuthSettings
from services.core.server import serving
from tests import mtls
from tests.conftest import private_db_url
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

# A logical database of its own: the session mesh's auth service (database 0)
# keeps its keys under the same global `tm:auth:` names.
PRIVATE_DB = 5
TOKEN_TTL_S = 900  # the default: far longer than the keys below live


@pytest.fixture
async def db_url(redis_url: str) -> AsyncIterator[str]:
    url = private_db_url(redis_url, PRIVATE_DB)
    client = aioredis.from_url(url)
    assert client.connection_pool.connection_kwargs["db"] == PRIVATE_DB
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


@contextlib.asynccontextmanager
async def _auth(db_url: str) -> AsyncIterator[tuple[AuthService, Any]]:
    settings = AuthSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=db_url,
        secret="s" * 32,
        token_ttl_s=TOKEN_TTL_S,
    )
    service = AuthService(settings)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield service, auth_service_pb2_grpc.AuthServiceStub(channel)


async def _token(stub: Any, secret: str) -> tuple[int, int]:
    """IssueToken for `secret`: returns the token's exp claim and expires_in."""
    reply = await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=secret), timeout=10)
    claims = jwt.decode(reply.access_token, options={"verify_signature": False})
    return int(claims["exp"]), int(reply.expires_in)


async def test_a_token_expires_no_later_than_its_api_key(db_url: str) -> None:
    async with _auth(db_url) as (service, stub):
        key, secret = await service.keys.create(
            "acme", "short", ["inference:generate"], [], auth_pb2.KeyLimits(), 60
        )
        exp, expires_in = await _token(stub, secret)
        assert exp <= key.expire_time.seconds, "the token outlives its key"
        assert 0 < expires_in <= 60
        # A key without an expiry gets the full lifetime.
        _, forever = await service.keys.create(
            "acme", "long", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        _, expires_in = await _token(stub, forever)
        assert expires_in == TOKEN_TTL_S


async def test_a_token_for_an_old_secret_expires_with_its_overlap(db_url: str) -> None:
    async with _auth(db_url) as (service, stub):
        key, old = await service.keys.create(
            "admin", "ops", ["admin"], [], auth_pb2.KeyLimits(), None
        )
        rotated = await stub.RotateApiKey(
            auth_service_pb2.RotateApiKeyRequest(
                id=key.id, overlap=duration_pb2.Duration(seconds=30)
            ),
            metadata=(("x-api-key", old),),
            timeout=10,
        )
        exp, expires_in = await _token(stub, old)
        assert exp <= rotated.old_secret_expire_time.seconds, "the token outlives the secret"
        assert 0 < expires_in <= 30
        _, expires_in = await _token(stub, rotated.secret)
        assert expires_in == TOKEN_TTL_S


async def test_a_key_revoked_a_moment_ago_mints_no_token(db_url: str) -> None:
    async with _auth(db_url) as (service, stub):
        key, secret = await service.keys.create(
            "acme", "leaked", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        await _token(stub, secret)  # its verdict is cached for the edge's next checks
        await service.keys.revoke(key.id)
        # The cached verdict may let the key through the edge for a few more seconds
        # (the revocation bound), but a token minted from it would live on for minutes.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _token(stub, secret)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
