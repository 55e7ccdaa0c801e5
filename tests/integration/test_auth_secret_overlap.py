"""A rotated-out secret's overlap is read in one instant, and nothing outlives it.

The lookup read a secret (GET) and its remaining overlap (PTTL) as two commands:
when the overlap ended between them, GET saw the secret alive and PTTL said -2
("no such key"), which was taken for "never ends", and IssueToken minted a JWT
for the full token lifetime (900 s) from a secret whose overlap was over.

The race is staged deterministically: the store's Redis client runs the commands
of a non-transactional pipeline one at a time and, after each, waits until the
old secret's overlap has ended in Redis (what other clients' commands and the
clock may do between two pipelined commands). A single script leaves no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from redis.asyncio.client import Pipeline

from gateway import key_cache
from services.auth.crypto import ServerSecret
from services.auth.keys import PREFIX, ApiKeyStore
from services.auth.service import AuthService, AuthSettings
from services.core.errors import Unauthenticated
from services.core.server import serving
from tests import mtls
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

TOKEN_TTL_S = 900
OVERLAP_S = 1.0  # long enough for the first read to find the old secret alive


class _GapClient(aioredis.Redis):
    """A Redis client whose non-transactional pipelines send one command at a time and,
    after each, wait until `doomed` (a Redis key) has expired."""

    doomed = ""

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        if transaction:
            return super().pipeline(transaction, shard_hint)
        return _SteppedPipeline(self)

    async def gap(self) -> None:
        """Waits (on Redis's own state, with a deadline) until `doomed` is gone."""
        deadline = time.monotonic() + 10
        while self.doomed and await self.exists(self.doomed):
            assert time.monotonic() < deadline, f"{self.doomed} never expired"
            await asyncio.sleep(0.01)


class _SteppedPipeline(Pipeline):
    def __init__(self, client: _GapClient) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, False, None)
        self._client = client

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = list(self.command_stack)
        await self.reset()
        results = []
        for args, options in stack:
            results.append(await self._client.execute_command(*args, **options))
            await self._client.gap()
        return results


@contextlib.asynccontextmanager
async def _auth(redis_url: str) -> AsyncIterator[tuple[AuthService, grpc.aio.Channel]]:
    settings = AuthSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        secret="s" * 32,
        token_ttl_s=TOKEN_TTL_S,
    )
    service = AuthService(settings)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield service, channel


async def _rotated(service: AuthService) -> tuple[str, float, _GapClient]:
    """Creates a key and rotates it with an OVERLAP_S overlap; returns the old secret,
    the overlap's end and a gap client whose pipelines wait for that end."""
    key, old = await service.keys.create(
        "acme", "leaked", ["inference:generate"], [], auth_pb2.KeyLimits(), None
    )
    _, _, overlap_ends = await service.keys.rotate(key.id, OVERLAP_S)
    gapped = _GapClient(connection_pool=service.keys.redis.connection_pool)
    gapped.doomed = f"{PREFIX}secret:{service.keys.secret.hash_api_key(old)}"
    return old, overlap_ends, gapped


async def test_a_secret_whose_overlap_ends_mid_lookup_never_reads_as_endless(own_redis):
    async with _auth(own_redis) as (service, _):
        old, overlap_ends, gapped = await _rotated(service)
        service.keys.redis = gapped  # the store's reads now leave gaps between commands
        found = await service.keys.lookup(old)
        assert found is not None, "the overlap had not ended when the lookup began"
        _, ends_at = found
        assert 0 < ends_at <= overlap_ends, f"the secret ends at {ends_at}, not by {overlap_ends}"
        await gapped.gap()
        assert await service.keys.lookup(old) is None, "a secret past its overlap still works"


async def test_issue_token_never_outlives_the_overlap_when_it_ends_mid_read(own_redis):
    async with _auth(own_redis) as (service, channel):
        old, overlap_ends, gapped = await _rotated(service)
        service.keys.redis = gapped
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        try:
            reply = await stub.IssueToken(
                auth_service_pb2.IssueTokenRequest(api_key=old), timeout=20
            )
        except grpc.aio.AioRpcError as refused:  # a secret found gone: refused, also fine
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            return
        exp = jwt.decode(reply.access_token, options={"verify_signature": False})["exp"]
        assert exp <= overlap_ends, f"the token outlives the overlap by {exp - overlap_ends:.0f}s"
        assert reply.expires_in <= OVERLAP_S


async def _cache_ms(channel: grpc.aio.Channel, api_key: str) -> int:
    """ext_authz Check for `api_key`: how long the edge may reuse the verdict (ms)."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = "198.51.100.9"
    request.attributes.request.http.headers["x-api-key"] = api_key
    reply = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    assert reply.status.code == 0, reply
    return int(reply.dynamic_metadata.fields[key_cache.CACHE_MS].number_value)


async def test_no_cache_reuses_a_verdict_past_the_credentials_end(own_redis):
    # The auth service's 2 s cache and the edge's 5 s bound reused an old secret's
    # verdict seconds after its overlap ended (and a key's after its expiry).
    async with _auth(own_redis) as (service, channel):
        key, old = await service.keys.create(
            "acme", "rotated", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        _, _, overlap_ends = await service.keys.rotate(key.id, OVERLAP_S)
        # The server's "now" is at or after this one: what is left of the overlap
        # then is at most this (read after the call, a loaded CI machine's reply
        # time came off the bound and failed it).
        asked_at = time.time()
        assert await _cache_ms(channel, old) <= (overlap_ends - asked_at) * 1000 + 1
        _, expiring = await service.keys.create(
            "acme", "expiring", ["inference:generate"], [], auth_pb2.KeyLimits(), 1
        )
        assert await _cache_ms(channel, expiring) <= 1000
        # A key without an end keeps the whole bound.
        _, lasting = await service.keys.create(
            "acme", "lasting", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        assert await _cache_ms(channel, lasting) > 4000


async def test_an_old_secret_is_refused_once_its_overlap_ended_though_cached(own_redis):
    async with _auth(own_redis) as (service, _):
        key, old = await service.keys.create(
            "acme", "rotated", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        await service.keys.rotate(key.id, 0.2)
        headers = {"x-api-key": old}
        assert await service.authenticator.authenticate(headers, "198.51.100.9")
        probe = aioredis.Redis(connection_pool=service.keys.redis.connection_pool)
        doomed = f"{PREFIX}secret:{service.keys.secret.hash_api_key(old)}"
        deadline = time.monotonic() + 10
        while await probe.exists(doomed):  # the overlap ends in Redis
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(Unauthenticated):  # within the 2 s the verdict was cached for
            await service.authenticator.authenticate(headers, "198.51.100.9")


async def test_the_lookup_script_touches_only_the_keys_it_declares(own_redis):
    # The script built the key record's name from the secret's value and read it: a key
    # not declared in KEYS, against Redis's scripting rule (ACL key patterns and Redis
    # Cluster route and check by the declared keys). MONITOR shows every command a
    # script runs ("lua" as its client) after the EVAL/EVALSHA that declared its keys.
    client = aioredis.from_url(own_redis)
    watcher = aioredis.from_url(own_redis)
    store = ApiKeyStore(client, ServerSecret(b"k" * 32))
    marker = f"{PREFIX}test:end-of-lookup"
    try:
        _, secret = await store.create(
            "acme", "declared", ["inference:generate"], [], auth_pb2.KeyLimits(), None
        )
        async with watcher.monitor() as monitor:
            await client.ping()  # MONITOR is on: what follows is seen
            assert await store.lookup(secret) is not None
            await client.get(marker)  # the end of what the lookup sent
            declared: set[str] = set()  # by every EVALSHA the lookup sent
            touched: set[str] = set()  # the first argument (a key) of the script's commands
            while marker not in (seen := await monitor.next_command())["command"]:
                name, *args = seen["command"].split(" ")
                if seen["client_type"] == "lua":
                    touched.add(args[0])
                elif name.upper() == "EVALSHA":  # sha, numkeys, keys..., args...
                    declared.update(args[2 : 2 + int(args[1])])
        assert touched, "the lookup ran no script"
        assert touched <= declared, f"undeclared: {touched - declared}"
    finally:
        await watcher.aclose()
        await client.aclose()
