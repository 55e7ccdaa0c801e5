"""The auth service's answer to the edge's JWT key check (ext_authz Check sent
jwt_authn's verified payload; gateway/edge_auth.py jwt_key_check_filter).

Without it, a JWT's key was never checked at the edge: a token minted before its
key's revocation, or from a secret a rotation ended, worked until its `exp`.
"""

from __future__ import annotations

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from gateway import key_cache
from services.auth.keys import SECRET_ID_CHARS
from tests.integration.test_auth_secret_overlap import _auth
from tokenmesh.auth.v1 import auth_pb2


def _jwt_check(claims: dict[str, str]) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = "198.51.100.7"
    metadata = request.attributes.metadata_context.filter_metadata[key_cache.JWT_NAMESPACE]
    metadata.update({key_cache.JWT_PAYLOAD: claims})
    return request


async def _check(
    channel: grpc.aio.Channel, claims: dict[str, str]
) -> external_auth_pb2.CheckResponse:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return await stub.Check(_jwt_check(claims), timeout=10)


async def test_a_jwts_key_is_allowed_while_it_stands_and_refused_for_good_after(own_redis):
    async with _auth(own_redis) as (service, channel):
        key, secret = await service.keys.create(
            "acme", "jwt", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        sid = service.keys.secret.hash_api_key(secret)[:SECRET_ID_CHARS]
        allowed = await _check(channel, {"sub": key.id, "sid": sid})
        assert allowed.status.code == grpc.StatusCode.OK.value[0], allowed
        assert not allowed.ok_response.headers  # the token's own claims set them
        assert allowed.dynamic_metadata.fields[key_cache.CACHE_MS].number_value == 5000

        _, new_secret, _ = await service.keys.rotate(key.id, 0)
        rotated_out = await _check(channel, {"sub": key.id, "sid": sid})
        new_sid = service.keys.secret.hash_api_key(new_secret)[:SECRET_ID_CHARS]
        assert (await _check(channel, {"sub": key.id, "sid": new_sid})).status.code == 0

        await service.keys.revoke(key.id)
        revoked = await _check(channel, {"sub": key.id, "sid": new_sid})
        nameless = await _check(channel, {"sid": new_sid})
        for refused in (rotated_out, revoked, nameless):
            assert refused.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0], refused
            assert refused.denied_response.status.code == 401
            # Kept by the edge: the key's later JWTs go to the closed API-key check.
            assert refused.dynamic_metadata.fields[key_cache.REFUSED].bool_value


async def test_a_check_without_a_verified_payload_is_an_api_key_check(own_redis):
    # A bearer JWT sent to the API-key check (the edge found its key refused) is not
    # verified a second time there: refused, without the JWT branch's metadata.
    async with _auth(own_redis) as (_, channel):
        request = external_auth_pb2.CheckRequest()
        request.attributes.source.address.socket_address.address = "198.51.100.8"
        request.attributes.request.http.headers["authorization"] = "Bearer eyJhbGciOi.x.y"
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        refused = await stub.Check(request, timeout=10)
        assert refused.denied_response.status.code == 401
        assert key_cache.REFUSED not in refused.dynamic_metadata.fields
