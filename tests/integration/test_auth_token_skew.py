"""A JWT minted from a credential that ends stops at the edge by that end.

The edge (Envoy's jwt_authn) accepts a token until `exp` plus JWT_CLOCK_SKEW_S.
IssueToken set `exp` to the credential's end (a rotated-out secret's overlap, a
key's expiry), so the token worked at the edge 10 s after the secret or key had
stopped. It now ends the skew earlier, and refuses, as for an ended credential,
when that leaves the token no lifetime.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from google.protobuf import duration_pb2

from gateway.edge_auth import JWT_CLOCK_SKEW_S
from services.auth.crypto import new_api_key
from services.auth.keys import Principal
from tests.integration.test_auth_secret_overlap import _auth
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc


def _edge_refuses_from(exp: int) -> int:
    """When the edge starts refusing a token: Envoy takes it while `now <= exp + skew`,
    `now` in whole seconds, so through the end of that second."""
    return exp + JWT_CLOCK_SKEW_S + 1


async def _exp(stub: Any, secret: str) -> int:
    """IssueToken for `secret`: the token's `exp`, checked against `expires_in`."""
    reply = await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=secret), timeout=10)
    claims = jwt.decode(reply.access_token, options={"verify_signature": False})
    assert reply.expires_in == int(claims["exp"]) - int(claims["iat"]) > 0
    return int(claims["exp"])


async def _refusal(stub: Any, secret: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=secret), timeout=10)
    return refused.value.code(), refused.value.details() or ""


async def test_a_token_ends_the_edges_skew_before_its_key_expires(own_redis: str) -> None:
    async with _auth(own_redis) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        key, secret = await service.keys.create(
            "acme", "expiring", ["inference:generate"], [], auth_pb2.KeyLimits(), 60
        )
        exp = await _exp(stub, secret)
        assert _edge_refuses_from(exp) <= key.expire_time.ToNanoseconds() / 1e9


async def test_a_token_ends_the_edges_skew_before_its_old_secrets_overlap(own_redis: str) -> None:
    async with _auth(own_redis) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
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
        exp = await _exp(stub, old)
        ends = rotated.old_secret_expire_time.ToNanoseconds() / 1e9
        assert _edge_refuses_from(exp) <= ends


async def test_a_credential_within_the_skew_of_its_end_mints_no_token(own_redis: str) -> None:
    async with _auth(own_redis) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        # The answer every bad credential gets (here: one never issued).
        unknown = await _refusal(stub, new_api_key())
        assert unknown[0] == grpc.StatusCode.UNAUTHENTICATED
        _, expiring = await service.keys.create(
            "acme", "expiring", ["inference:generate"], [], auth_pb2.KeyLimits(), 5
        )
        assert await _refusal(stub, expiring) == unknown
        key, old = await service.keys.create(
            "acme", "rotated", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        _, new, _ = await service.keys.rotate(key.id, JWT_CLOCK_SKEW_S / 2)
        assert await service.keys.lookup(old) is not None, "still in its overlap"
        assert await _refusal(stub, old) == unknown
        assert await _exp(stub, new) > 0  # the current secret has no end


async def test_a_token_a_replica_ahead_minted_is_taken_within_the_edges_skew(
    own_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The auth service took none (the edge takes JWT_CLOCK_SKEW_S): with two replicas,
    # a token minted on one whose clock ran a second ahead was refused by the other's
    # admin RPCs (nbf, iat in the future) for that second.
    import time as clock

    async with _auth(own_redis) as (service, _):
        real = clock.time
        monkeypatch.setattr(clock, "time", lambda: real() + 5)  # the other replica's clock
        token, _ = await service.tokens.issue(
            Principal("key_0123456789abcdef", "acme", ("admin",), (), "")
        )
        monkeypatch.setattr(clock, "time", real)
        assert (await service.tokens.verify(token)) is not None
        monkeypatch.setattr(clock, "time", lambda: real() + JWT_CLOCK_SKEW_S + 5)
        ahead, _ = await service.tokens.issue(
            Principal("key_0123456789abcdef", "acme", ("admin",), (), "")
        )
        monkeypatch.setattr(clock, "time", real)
        assert (await service.tokens.verify(ahead)) is None  # past the skew: still refused
