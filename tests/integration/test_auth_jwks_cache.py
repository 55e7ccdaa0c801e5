"""GetJwks (public, not rate limited) is built at most every few seconds per
replica, not decrypted for every fetch; a rotation is served at once where it
was made, within the cache time elsewhere, and waits for that time too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.auth.crypto import ServerSecret
from services.auth.service import AuthService, AuthSettings
from services.auth.signing import (
    JWKS_REFETCH_MARGIN_S,
    JWKS_SERVE_CACHE_S,
    KEYS,
    SigningKeyRing,
)
from services.core.server import serving
from tests import mtls
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

SERVER_SECRET = b"s" * 32
JWKS_CACHE_S = 300.0  # the edge's (the default)


class CountingSecret(ServerSecret):
    """The server secret, counting how often it decrypts a signing key."""

    def __init__(self, secret: bytes) -> None:
        super().__init__(secret)
        self.decrypts = 0

    def decrypt(self, token: str, context: bytes) -> bytes:
        self.decrypts += 1
        return super().decrypt(token, context)


@pytest.fixture
async def client(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(own_redis)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def _auth(redis_url: str) -> AsyncIterator[tuple[AuthService, CountingSecret, Any]]:
    settings = AuthSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        secret=SERVER_SECRET.decode(),
        jwks_cache_s=JWKS_CACHE_S,
        rotation_s=0,
    )
    service = AuthService(settings)
    counting = service.ring.secret = CountingSecret(SERVER_SECRET)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield service, counting, auth_service_pb2_grpc.AuthServiceStub(channel)


async def _served_kids(stub: Any) -> set[str]:
    reply = await stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=10)
    return {k["kid"] for k in json.loads(reply.data)["keys"]}


async def _stored_kids(client: aioredis.Redis) -> dict[str, str]:
    """Returns every stored signing key's state, by kid."""
    records = [json.loads(raw) for raw in (await client.hgetall(KEYS)).values()]
    return {str(r["kid"]): str(r["state"]) for r in records}


async def _age_next(client: aioredis.Redis, published_s: float) -> str:
    """Rewrites the next key as published `published_s` ago; returns its kid."""
    for raw in (await client.hgetall(KEYS)).values():
        record = json.loads(raw)
        if record["state"] == "next":
            record["created"] = time.time() - published_s
            await client.hset(KEYS, record["kid"], json.dumps(record))
            return str(record["kid"])
    raise AssertionError("no next key")


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


async def test_a_flood_of_jwks_fetches_decrypts_each_key_once(own_redis: str) -> None:
    async with _auth(own_redis) as (_, counting, stub):
        fetches = [_served_kids(stub) for _ in range(40)]
        served = await asyncio.gather(*fetches)
        served += [await _served_kids(stub) for _ in range(20)]
        kids = served[0]
        assert len(kids) == 2 and all(s == kids for s in served)  # current and next
        assert counting.decrypts == len(kids), counting.decrypts


async def test_a_rotation_is_served_at_once_here_and_soon_elsewhere(
    own_redis: str, client: aioredis.Redis
) -> None:
    async with _auth(own_redis) as (service, _, stub):
        _, admin = await service.keys.create(
            "admin", "ops", ["admin"], [], auth_pb2.KeyLimits(), None
        )
        metadata = (("x-api-key", admin),)
        before = await _served_kids(stub)  # cached now
        promoted = await _age_next(client, service.ring.publish_s + 1)
        reply = await stub.RotateSigningKey(
            auth_service_pb2.RotateSigningKeyRequest(), metadata=metadata, timeout=10
        )
        assert reply.signing_key.kid == promoted
        stored = await _stored_kids(client)
        assert set(stored) - before, "the rotation made no new next key"
        # This replica serves its rotation at once (the new next key included)...
        assert await _served_kids(stub) == set(stored)
        # ...and accepts a token signed by the promoted key.
        token = await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=admin))
        await stub.ListApiKeys(
            auth_service_pb2.ListApiKeysRequest(),
            metadata=(("authorization", f"Bearer {token.access_token}"),),
            timeout=10,
        )

        # Another replica's rotation is served within the cache time.
        replica = SigningKeyRing(client, ServerSecret(SERVER_SECRET), 900, JWKS_CACHE_S)
        await replica.rotate(force=True)
        stored = await _stored_kids(client)
        deadline = time.monotonic() + JWKS_SERVE_CACHE_S + 5
        while (served := await _served_kids(stub)) != set(stored):
            assert time.monotonic() < deadline, (served, stored)
            await asyncio.sleep(0.1)


async def test_rotation_waits_for_the_replicas_jwks_cache_too(
    own_redis: str, client: aioredis.Redis
) -> None:
    async with _auth(own_redis) as (service, _, stub):
        _, admin = await service.keys.create(
            "admin", "ops", ["admin"], [], auth_pb2.KeyLimits(), None
        )
        metadata = (("x-api-key", admin),)
        # Past the edge's cache and refetch margin, but a replica may have served a
        # JWKS built before the next key existed until JWKS_SERVE_CACHE_S after it.
        await _age_next(client, JWKS_CACHE_S + JWKS_REFETCH_MARGIN_S + 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RotateSigningKey(
                auth_service_pb2.RotateSigningKeyRequest(), metadata=metadata, timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _reason(refused.value) == "SIGNING_KEY_NOT_PUBLISHED"
        upcoming = await _age_next(
            client, JWKS_CACHE_S + JWKS_REFETCH_MARGIN_S + JWKS_SERVE_CACHE_S + 1
        )
        reply = await stub.RotateSigningKey(
            auth_service_pb2.RotateSigningKeyRequest(), metadata=metadata, timeout=10
        )
        assert reply.signing_key.kid == upcoming
