"""The auth service's admin RPCs take a JWT only while its API key is still active.

A JWT's signature and claims stay valid until it expires, after its key was
revoked too: the edge refuses it within 5 s (its JWT key check,
tests/e2e/test_key_cache.py), and the auth service reads the key anyway and
refuses it for its own admin RPCs at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from services.auth.service import AuthService, AuthSettings
from services.core import contract
from services.core.server import serving
from tests import mtls
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


@contextlib.asynccontextmanager
async def _auth(redis_url: str) -> AsyncIterator[tuple[AuthService, Any]]:
    """The auth service on `redis_url`, and a grpc.aio AuthService stub (as the edge)."""
    settings = AuthSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        secret="s" * 32,
    )
    service = AuthService(settings)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield service, auth_service_pb2_grpc.AuthServiceStub(channel)


async def _admin_key(service: AuthService, name: str) -> tuple[str, str]:
    """Creates an admin API key; returns its id and secret."""
    key, secret = await service.keys.create(
        "admin", name, ["admin"], [], auth_pb2.KeyLimits(), None
    )
    return key.id, secret


async def _bearer(stub: Any, secret: str) -> Metadata:
    reply = await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=secret), timeout=10)
    return (("authorization", f"Bearer {reply.access_token}"),)


async def _list_keys(stub: Any, metadata: Metadata) -> int:
    reply = await stub.ListApiKeys(
        auth_service_pb2.ListApiKeysRequest(), metadata=metadata, timeout=10
    )
    return len(reply.api_keys)


async def test_a_revoked_keys_jwt_is_refused_by_the_admin_rpcs_at_once(own_redis: str) -> None:
    async with _auth(own_redis) as (service, stub):
        _, other_admin = await _admin_key(service, "ops")
        doomed_id, doomed = await _admin_key(service, "doomed")
        token = await _bearer(stub, doomed)
        assert await _list_keys(stub, token) >= 2  # the JWT works while its key does

        await stub.RevokeApiKey(
            auth_service_pb2.RevokeApiKeyRequest(id=doomed_id),
            metadata=(("x-api-key", other_admin),),
            timeout=10,
        )
        # The very next call: the key is read from Redis, not the 2 s cache.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list_keys(stub, token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateApiKey(
                auth_service_pb2.CreateApiKeyRequest(tenant="acme", scopes=["admin"]),
                metadata=token,
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Another active key's JWT, and the API key path, work as before.
        assert await _list_keys(stub, await _bearer(stub, other_admin)) >= 2
        assert await _list_keys(stub, (("x-api-key", other_admin),)) >= 2


@pytest.mark.parametrize("tenant", [contract.SHADOW_TENANT, "tokenmesh.system", "Tokenmesh.Shadow"])
async def test_no_key_can_be_created_for_an_account_of_the_mesh(own_redis: str, tenant) -> None:
    # Shadow copies are metered to tokenmesh.shadow, with every tenant's request tags:
    # a key of it read them all with usage:read, and its own requests mixed into the
    # account. Rollout decisions are audited as tokenmesh.system: a key of it mixed
    # its requests into that log.
    async with _auth(own_redis) as (service, stub):
        _, admin = await _admin_key(service, "ops")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateApiKey(
                auth_service_pb2.CreateApiKeyRequest(tenant=tenant, scopes=["usage:read"]),
                metadata=(("x-api-key", admin),),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert contract.RESERVED_TENANT_PREFIX in (refused.value.details() or "")


@pytest.mark.parametrize("tier", ["pre mium", "premium\n", "-x", "t" * 65])
async def test_a_keys_tier_is_a_name(own_redis: str, tier: str) -> None:
    # It becomes the x-tokenmesh-tier header and the `tier` claim, and names a tier
    # in the scheduler's and the rate limits' settings: it was taken as any string.
    async with _auth(own_redis) as (service, stub):
        _, admin = await _admin_key(service, "ops")
        limits = auth_pb2.KeyLimits(priority_tier=tier)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateApiKey(
                auth_service_pb2.CreateApiKeyRequest(
                    tenant="acme", scopes=["usage:read"], limits=limits
                ),
                metadata=(("x-api-key", admin),),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limits.priority_tier" in (refused.value.details() or "")


async def test_an_admin_call_runs_as_the_key_the_edge_authorized(own_redis: str) -> None:
    # The edge authorizes a verified JWT first, this service an x-api-key first: a call
    # carrying A's JWT and B's key passed the edge as A and ran as B (B revoked A,
    # where "a key cannot revoke itself" was to be judged on A).
    async with _auth(own_redis) as (service, stub):
        a_id, a_secret = await _admin_key(service, "a")
        b_id, b_secret = await _admin_key(service, "b")
        as_the_edge_saw_a = (
            *await _bearer(stub, a_secret),
            ("x-api-key", b_secret),
            (contract.KEY_ID_HEADER, a_id),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RevokeApiKey(
                auth_service_pb2.RevokeApiKeyRequest(id=a_id), metadata=as_the_edge_saw_a
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await service.keys.get(a_id)).state == auth_pb2.API_KEY_STATE_ACTIVE
        # One credential, the one the edge saw: as before.
        as_the_edge_saw_b = (("x-api-key", b_secret), (contract.KEY_ID_HEADER, b_id))
        await stub.RevokeApiKey(
            auth_service_pb2.RevokeApiKeyRequest(id=a_id), metadata=as_the_edge_saw_b
        )
