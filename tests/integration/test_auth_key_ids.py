"""Admin RPCs take only key ids shaped as the auth service mints them.

A key id is part of Redis key names (tm:auth:key:<id>): `key_<x>:secrets`
named a key's set of secret hashes, GET met a set (WRONGTYPE) and the RPC
failed with INTERNAL and a traceback. Such an id is INVALID_ARGUMENT now, with
a field violation on `id`, decided by the one rule in services/core/contract.py.
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
from tests.rpc_errors import violated_fields
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc


@contextlib.asynccontextmanager
async def _auth(redis_url: str) -> AsyncIterator[tuple[AuthService, Any, str]]:
    """The auth service with an admin key: (service, stub, admin secret)."""
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
            _, admin = await service.keys.create(
                "admin", "ops", ["admin"], [], auth_pb2.KeyLimits(), None
            )
            yield service, auth_service_pb2_grpc.AuthServiceStub(channel), admin


async def test_a_crafted_key_id_is_invalid_argument_not_internal(own_redis):
    async with _auth(own_redis) as (service, stub, admin):
        key, _ = await service.keys.create(
            "acme", "victim", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        metadata = (("x-api-key", admin),)
        for crafted in (f"{key.id}:secrets", "key_X", "key_0123456789abcdef0", "", "keys"):
            for call, request in (
                (stub.GetApiKey, auth_service_pb2.GetApiKeyRequest(id=crafted)),
                (stub.RevokeApiKey, auth_service_pb2.RevokeApiKeyRequest(id=crafted)),
                (stub.RotateApiKey, auth_service_pb2.RotateApiKeyRequest(id=crafted)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(request, metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (crafted, call)
                assert violated_fields(refused.value) == ["id"]
        # The key was left alone, and a well-formed unknown id is NOT_FOUND.
        got = await stub.GetApiKey(
            auth_service_pb2.GetApiKeyRequest(id=key.id), metadata=metadata, timeout=10
        )
        assert got.api_key.state == auth_pb2.API_KEY_STATE_ACTIVE
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetApiKey(
                auth_service_pb2.GetApiKeyRequest(id="key_0123456789abcdef"),
                metadata=metadata,
                timeout=10,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_every_minted_key_id_passes_the_contract_rule(own_redis):
    async with _auth(own_redis) as (service, _, _):
        created, _ = await service.keys.create(
            "acme", "n", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        adopted = await service.keys.adopt("tm_" + "b" * 43, "ops", ["admin"])
        assert adopted is not None
        for key_id in (created.id, adopted.id):
            assert contract.is_api_key_id(key_id), key_id
