"""The auth service recovers by itself when its Redis comes back empty: it
creates the signing keys and registers the bootstrap admin key again, as a first
start does, and reports NOT_SERVING while no key can sign a token."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth.crypto import ServerSecret, new_api_key
from services.auth.keys import ApiKeyStore
from services.auth.service import SERVICE_NAME, AuthService, AuthSettings
from services.auth.signing import KEYS, LOCK
from services.core.server import serving
from services.launcher.mesh import spawn_redis
from services.launcher.processes import Child, reserve_port
from tests import mtls
from tokenmesh.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

SERVER_SECRET = "s" * 32
# The auth service checks its ring every second: a few checks, with room for a slow host.
RECOVERY_S = 15.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EmptyingRedis:
    """A redis-server of this test's own, on one port, that can come back empty."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = reserve_port()
        self.child: Child | None = None
        self.url = ""

    def start(self) -> None:
        data = self.root / "data"
        shutil.rmtree(data, ignore_errors=True)  # nothing to reload: it starts empty
        self.child, self.url = spawn_redis(
            data, self.root / "redis.log", port=self.port, durable=False
        )

    def stop(self) -> None:
        if self.child is not None:
            self.child.kill()  # as a crash: nothing is saved on the way out
            self.child.wait(10)
            self.child = None


@pytest.fixture
def emptying_redis(tmp_path: Path) -> Iterator[EmptyingRedis]:
    server = EmptyingRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(url: str, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = dict(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=url,
        secret=SERVER_SECRET,
        max_failures=10_000,  # the polls below fail until it recovers: no 429 for them
    )
    values.update(overrides)
    return AuthSettings(**values)


@contextlib.asynccontextmanager
async def _auth(settings: AuthSettings) -> AsyncIterator[grpc.aio.Channel]:
    async with serving(AuthService(settings), settings) as running:
        async with mtls.aio_channel(running.port, peer="auth") as channel:  # as the edge
            yield channel


async def _issue(channel: grpc.aio.Channel, api_key: str) -> str:
    stub = auth_service_pb2_grpc.AuthServiceStub(channel)
    reply = await stub.IssueToken(auth_service_pb2.IssueTokenRequest(api_key=api_key), timeout=5)
    return str(reply.access_token)


async def _jwks_kids(channel: grpc.aio.Channel) -> set[str]:
    stub = auth_service_pb2_grpc.AuthServiceStub(channel)
    reply = await stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=5)
    return {key["kid"] for key in json.loads(reply.data)["keys"]}


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


async def _health(channel: grpc.aio.Channel) -> int:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # grpcio's stubs are untyped
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    return int(reply.status)


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + RECOVERY_S
    while not await check():
        assert time.monotonic() < deadline, f"not within {RECOVERY_S:.0f}s: {what}"
        await asyncio.sleep(0.1)


async def _verifiable_token(channel: grpc.aio.Channel, api_key: str) -> bool:
    """Tells whether `api_key` gets a token whose key the JWKS publishes."""
    try:
        token = await _issue(channel, api_key)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
            return False  # no signing key yet; the bootstrap key not registered yet
        raise
    return _kid(token) in await _jwks_kids(channel)


async def test_auth_issues_tokens_again_after_redis_restarts_empty(
    emptying_redis: EmptyingRedis,
) -> None:
    bootstrap = new_api_key()
    async with _auth(_settings(emptying_redis.url, bootstrap_key=bootstrap)) as channel:
        before = _kid(await _issue(channel, bootstrap))
        emptying_redis.stop()
        emptying_redis.start()  # same port, no data: keys, signing keys, everything gone
        # The old code kept serving an empty JWKS and refused every token
        # (FAILED_PRECONDITION "no current signing key") until a restart.
        await _eventually(
            lambda: _verifiable_token(channel, bootstrap),
            "the bootstrap key gets a token the JWKS can verify",
        )
        kids = await _jwks_kids(channel)
        assert before not in kids and len(kids) == 2  # a new current and next key
        assert await _health(channel) == SERVING


async def test_auth_is_not_serving_while_it_cannot_sign_and_recovers_the_dev_key(
    emptying_redis: EmptyingRedis, tmp_path: Path
) -> None:
    dev_key = tmp_path / "dev-api-key"
    async with _auth(_settings(emptying_redis.url, bootstrap_key_file=dev_key)) as channel:
        await _issue(channel, dev_key.read_text().strip())
        client = aioredis.from_url(emptying_redis.url)
        try:
            # Redis loses everything while another replica holds the ring's lock
            # (it is re-creating the keys, or died doing so): in one transaction,
            # so no check of this replica's falls in between.
            async with client.pipeline(transaction=True) as pipe:
                pipe.flushall()
                pipe.set(LOCK, "999", px=60_000)
                await pipe.execute()

            async def not_serving() -> bool:
                return await _health(channel) == NOT_SERVING

            await _eventually(not_serving, "health turns NOT_SERVING without signing keys")
            await client.delete(LOCK)  # that replica's lock runs out
        finally:
            await client.aclose()

        async def recovered() -> bool:
            # A fresh start's dev admin key: created again, its secret rewritten.
            return await _health(channel) == SERVING and await _verifiable_token(
                channel, dev_key.read_text().strip()
            )

        await _eventually(recovered, "SERVING again, and the dev key gets a token")


async def test_two_replicas_recover_one_ring_and_one_bootstrap_key(
    emptying_redis: EmptyingRedis,
) -> None:
    bootstrap = new_api_key()
    settings = _settings(emptying_redis.url, bootstrap_key=bootstrap)
    async with _auth(settings) as first, _auth(settings) as second:
        emptying_redis.stop()
        emptying_redis.start()
        for channel in (first, second):
            await _eventually(
                functools.partial(_verifiable_token, channel, bootstrap),
                "each replica issues tokens again",
            )
        # Both found the ring empty and both ran a first start's steps: the
        # ring's lock let one create the keys, the other's adoption found the
        # first's bootstrap key.
        assert _kid(await _issue(first, bootstrap)) == _kid(await _issue(second, bootstrap))
        client = aioredis.from_url(emptying_redis.url)
        try:
            states = sorted(json.loads(v)["state"] for v in (await client.hgetall(KEYS)).values())
            keys = ApiKeyStore(client, ServerSecret(SERVER_SECRET.encode()))
            listed, _ = await keys.list("admin", 1000, "")
        finally:
            await client.aclose()
        assert states == ["current", "next"]
        assert [k.name for k in listed] == ["bootstrap"]
