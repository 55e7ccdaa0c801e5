"""A rotation ends every old secret of a key, those earlier rotations left too.

A rotation dropped the secret it rotated out from the key's set of secrets, so a
second rotation never reached it: after `rotate(overlap=1h)` and, once that secret
leaked, `rotate(overlap=0s)`, the leaked secret worked (and minted JWTs) for the
rest of its first hour, and a revoke left it in Redis. Each rotation now cuts
every secret in the set to min(what is left of it, the new overlap).
"""

from __future__ import annotations

import time

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import duration_pb2

from services.auth.crypto import ServerSecret
from services.auth.keys import PREFIX, ApiKeyStore
from services.core.redis_service import text
from tests.integration.test_auth_secret_overlap import _auth
from tests.integration.test_state_races import _interleaved
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

HOUR_S = 3600.0


async def _key(
    keys: ApiKeyStore, scopes: tuple[str, ...] = ("inference:generate",)
) -> tuple[str, str]:
    key, secret = await keys.create("acme", "rotated", list(scopes), [], auth_pb2.KeyLimits(), None)
    return key.id, secret


async def _ms_left(keys: ApiKeyStore, secret: str) -> int:
    """The PTTL of a secret's digest in Redis (-2: gone, -1: no end)."""
    return int(await keys.redis.pttl(f"{PREFIX}secret:{keys.secret.hash_api_key(secret)}"))


async def test_a_rotation_with_no_overlap_ends_the_secret_an_earlier_one_rotated_out(
    own_redis: str,
) -> None:
    async with _auth(own_redis) as (service, _):
        keys = service.keys
        key_id, s0 = await _key(keys)
        _, s1, _ = await keys.rotate(key_id, HOUR_S)
        assert await keys.lookup(s0) is not None, "in its overlap"
        _, s2, _ = await keys.rotate(key_id, 0)  # s0 leaked: end every old secret now
        assert await keys.lookup(s0) is None, "the leaked secret still works"
        assert await keys.lookup(s1) is None
        assert await keys.lookup(s2) is not None
        assert await _ms_left(keys, s0) == -2
        # Nothing ended is kept: the set holds the current secret only.
        members = await keys.redis.smembers(f"{PREFIX}key:{key_id}:secrets")
        assert {text(m) for m in members} == {keys.secret.hash_api_key(s2)}


async def test_a_shorter_overlap_cuts_the_older_secrets_and_never_lengthens_one(
    own_redis: str,
) -> None:
    async with _auth(own_redis) as (service, _):
        keys = service.keys
        key_id, s0 = await _key(keys)
        _, s1, _ = await keys.rotate(key_id, HOUR_S)
        _, s2, ends = await keys.rotate(key_id, 5)
        for old in (s0, s1):
            found = await keys.lookup(old)
            assert found is not None
            assert 0 < found[1] <= ends, f"ends {found[1] - ends:.0f}s past the new overlap"
            assert 0 < await _ms_left(keys, old) <= 5000
        # A longer overlap later keeps each old secret's earlier end.
        _, s3, _ = await keys.rotate(key_id, HOUR_S)
        for old in (s0, s1):
            assert 0 < await _ms_left(keys, old) <= 5000
        assert 5000 < await _ms_left(keys, s2) <= HOUR_S * 1000  # the one now rotated out
        assert await _ms_left(keys, s3) == -1


async def test_revoking_a_key_deletes_the_secrets_its_rotations_left(own_redis: str) -> None:
    async with _auth(own_redis) as (service, _):
        keys = service.keys
        key_id, s0 = await _key(keys)
        _, s1, _ = await keys.rotate(key_id, HOUR_S)
        _, s2, _ = await keys.rotate(key_id, HOUR_S)
        await keys.revoke(key_id)
        for secret in (s0, s1, s2):  # "deletes every secret hash that maps to it"
            assert await _ms_left(keys, secret) == -2


async def _check(channel: grpc.aio.Channel, api_key: str) -> int:
    """ext_authz Check for `api_key` (the edge's question): the gRPC status code it answers."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = "198.51.100.7"
    request.attributes.request.http.headers["x-api-key"] = api_key
    reply = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    return int(reply.status.code)


async def test_rotate_twice_through_the_service_refuses_the_first_secret(own_redis: str) -> None:
    # What an operator does through the API: a routine rotation, then an urgent
    # one with no overlap. The first secret is refused by ext_authz and IssueToken.
    async with _auth(own_redis) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        _, admin = await _key(service.keys, ("admin",))
        key_id, s0 = await _key(service.keys)
        metadata = (("x-api-key", admin),)
        for overlap_s in (3600, 0):
            rotated = await stub.RotateApiKey(
                auth_service_pb2.RotateApiKeyRequest(
                    id=key_id, overlap=duration_pb2.Duration(seconds=overlap_s)
                ),
                metadata=metadata,
                timeout=10,
            )
        assert rotated.old_secret_expire_time.ToNanoseconds() <= time.time_ns()
        assert await _check(channel, s0) == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert await _check(channel, rotated.secret) == grpc.StatusCode.OK.value[0]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=s0), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_rotation_between_anothers_read_and_write_is_cut_by_it(own_redis: str) -> None:
    # Two admins rotate at once: a routine rotation (1 h) lands between the urgent
    # one's read of the key's secrets and its write. The urgent one, committed last,
    # ends both secrets rotated out (it retries on the WATCHed set).
    client = aioredis.from_url(own_redis)
    try:
        keys = ApiKeyStore(client, ServerSecret(b"r" * 32))
        key_id, s0 = await _key(keys)
        routine: list[str] = []

        async def rotate_routinely() -> None:
            routine.append((await keys.rotate(key_id, HOUR_S))[1])

        racing = _interleaved(own_redis, "SMEMBERS", rotate_routinely)
        try:
            _, s2, _ = await ApiKeyStore(racing, keys.secret).rotate(key_id, 0)
        finally:
            await racing.aclose()
        assert racing.hook.fired and routine, "the race was not run"
        assert await keys.lookup(s0) is None
        assert await keys.lookup(routine[0]) is None
        assert await keys.lookup(s2) is not None
    finally:
        await client.aclose()


async def test_get_api_key_shows_when_each_rotated_out_secret_stops_working(
    own_redis: str,
) -> None:
    # An operator who suspects a leak reads the key: its old secrets still accepted,
    # and until when, were nowhere to be seen (only the current secret's prefix).
    async with _auth(own_redis) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        _, admin = await _key(service.keys, ("admin",))
        metadata = (("x-api-key", admin),)
        key_id, _ = await _key(service.keys)

        async def expire_times() -> list[float]:
            got = await stub.GetApiKey(
                auth_service_pb2.GetApiKeyRequest(id=key_id), metadata=metadata, timeout=10
            )
            return [t.ToNanoseconds() / 1e9 for t in got.api_key.rotated_secret_expire_times]

        assert await expire_times() == []
        before = time.time()
        await service.keys.rotate(key_id, HOUR_S)
        await service.keys.rotate(key_id, 60)
        first, second = await expire_times()  # soonest first; both cut to the 60 s
        assert before + 59 <= first <= second <= time.time() + 60
        await service.keys.rotate(key_id, 0)  # ends every old one now
        assert await expire_times() == []


async def test_rotated_secret_ends_are_capped_by_the_keys_own_expiry_and_none_once_revoked(
    own_redis: str,
) -> None:
    async with _auth(own_redis) as (service, _):
        keys = service.keys
        key, _ = await keys.create(
            "acme", "short", ["inference:generate"], [], auth_pb2.KeyLimits(), 120
        )
        await keys.rotate(key.id, HOUR_S)  # its overlap outlasts the key
        (end,) = await keys.rotated_secret_ends(await keys.get(key.id))
        assert end == key.expire_time.ToNanoseconds() / 1e9
        await keys.revoke(key.id)
        assert await keys.rotated_secret_ends(await keys.get(key.id)) == []


async def test_a_token_from_a_secret_a_rotation_ended_makes_no_admin_call(
    own_redis: str,
) -> None:
    # `rotate --overlap 0` after a leak ended the secret, but a JWT the leaker minted
    # from it before kept calling the auth service's admin RPCs until its exp: it
    # created an admin key of its own, which outlived every clean-up of the first.
    async with _auth(own_redis) as (service, channel):
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        key_id, leaked = await _key(service.keys, ("admin",))

        async def token(secret: str) -> tuple[tuple[str, str], ...]:
            reply = await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=secret))
            return (("authorization", f"Bearer {reply.access_token}"),)

        async def creates(bearer: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
            request = auth_service_pb2.CreateApiKeyRequest(tenant="acme", scopes=["admin"])
            try:
                await stub.CreateApiKey(request, metadata=bearer, timeout=10)
            except grpc.aio.AioRpcError as refused:
                return refused.code()
            return grpc.StatusCode.OK

        before = await token(leaked)
        assert await creates(before) == grpc.StatusCode.OK
        _, rotated, _ = await service.keys.rotate(key_id, HOUR_S)
        during = await token(leaked)  # its overlap: the secret and its tokens work on
        assert await creates(during) == grpc.StatusCode.OK
        from_rotated = await token(rotated)
        _, current, _ = await service.keys.rotate(key_id, 0)  # every old secret ends
        for ended in (before, during, from_rotated):
            assert await creates(ended) == grpc.StatusCode.UNAUTHENTICATED
        assert await creates(await token(current)) == grpc.StatusCode.OK
