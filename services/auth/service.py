"""The auth service: settings, stores, bootstrap key and signing-key schedule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client import Gauge
from redis.exceptions import RedisError

from services.auth.authenticator import Authenticator
from services.auth.crypto import ServerSecret, weak_api_key
from services.auth.ext_authz import ExtAuthzServicer
from services.auth.failures import FailureLimiter
from services.auth.keys import SCOPES, ApiKeyStore
from services.auth.servicer import AuthServicer
from services.auth.signing import SigningKeyRing, current_since
from services.auth.tokens import TokenIssuer
from services.core import secret_files
from services.core.errors import FailedPrecondition
from services.core.redis_service import RedisBackedService
from services.core.server import RunningServer
from services.core.settings import RedisSettings, SettingsError, env, require
from services.core.tasks import SupervisedTask
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc

logger = logging.getLogger(__name__)
NEXT_ROTATION = Gauge(
    "tokenmesh_auth_signing_next_rotation_timestamp_seconds",
    "When the JWT signing key is due to rotate on this auth replica's schedule (Unix time; "
    "in the past while a due rotation is refused).",
)
# How often each replica checks that Redis still holds the signing keys.
SIGNING_CHECK_S = 1.0
# The health condition that fails while no key can sign a token.
SIGNING_CONDITION = "signing keys"
SERVICE_NAME = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
EXT_AUTHZ_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


@dataclass(frozen=True)
class AuthSettings(RedisSettings):
    """AuthSettings configure the auth service."""

    secret: str | None = env(
        "TOKENMESH_AUTH_SECRET", None, "Server secret (>= 32 chars) for key hashes."
    )
    secret_file: Path | None = env(
        "TOKENMESH_AUTH_SECRET_FILE", None, "File holding the server secret (created if missing)."
    )
    issuer: str = env("TOKENMESH_AUTH_ISSUER", "https://tokenmesh.local/auth", "JWT iss claim.")
    audience: str = env("TOKENMESH_AUTH_AUDIENCE", "tokenmesh", "JWT aud claim.")
    token_ttl_s: int = env("TOKENMESH_AUTH_TOKEN_TTL_SECONDS", 900, "Lifetime of issued JWTs.")
    jwks_cache_s: float = env(
        "TOKENMESH_AUTH_JWKS_CACHE_SECONDS", 300.0, "How long edges cache the JWKS."
    )
    rotation_s: float = env(
        "TOKENMESH_AUTH_SIGNING_ROTATION_SECONDS",
        86400.0,
        "Rotate the signing key this often; 0 = never.",
    )
    rotate_overlap_s: float = env(
        "TOKENMESH_AUTH_ROTATE_OVERLAP_SECONDS",
        3600.0,
        "Default overlap of a rotated API key's old secret.",
    )
    max_failures: int = env(
        "TOKENMESH_AUTH_MAX_FAILURES_PER_MINUTE", 20, "Failed attempts per source before 429."
    )
    bootstrap_key: str | None = env(
        "TOKENMESH_AUTH_BOOTSTRAP_KEY", None, "An admin API key to register at start (production)."
    )
    bootstrap_key_file: Path | None = env(
        "TOKENMESH_AUTH_BOOTSTRAP_KEY_FILE",
        None,
        "Dev: create an admin key on first start, write it here.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            bool(self.secret or self.secret_file),
            "TOKENMESH_AUTH_SECRET",
            "set it (or TOKENMESH_AUTH_SECRET_FILE)",
        )
        require(
            self.secret is None or len(self.secret) >= 32,
            "TOKENMESH_AUTH_SECRET",
            "needs >= 32 characters",
        )
        require(
            60 <= self.token_ttl_s <= 86400, "TOKENMESH_AUTH_TOKEN_TTL_SECONDS", "must be 60-86400"
        )
        require(self.jwks_cache_s > 0, "TOKENMESH_AUTH_JWKS_CACHE_SECONDS", "must be > 0")
        require(self.max_failures >= 1, "TOKENMESH_AUTH_MAX_FAILURES_PER_MINUTE", "must be >= 1")
        require(
            self.rotation_s == 0 or self.rotation_s >= 60,
            "TOKENMESH_AUTH_SIGNING_ROTATION_SECONDS",
            "must be 0 or >= 60",
        )
        # An admin key: one an operator typed (`tm_` and a word) was accepted.
        weak = weak_api_key(self.bootstrap_key) if self.bootstrap_key is not None else ""
        require(not weak, "TOKENMESH_AUTH_BOOTSTRAP_KEY", weak)

    def server_secret(self) -> bytes:
        """Returns the server secret, creating the secret file on first use."""
        if self.secret:
            return self.secret.encode()
        assert self.secret_file is not None
        secret_files.create_secret(self.secret_file, os.urandom(32).hex().encode())
        value = self.secret_file.read_text().strip().encode()
        if len(value) < 32:
            raise SettingsError(
                f"TOKENMESH_AUTH_SECRET_FILE: {self.secret_file} holds fewer than 32 characters"
            )
        return value


class AuthService(RedisBackedService):
    """AuthService serves tokenmesh.auth.v1.AuthService and Envoy's ext_authz."""

    name = "auth"

    def __init__(self, settings: AuthSettings) -> None:
        super().__init__(settings)
        self.settings = settings
        secret = ServerSecret(settings.server_secret())
        self.keys = ApiKeyStore(self.redis, secret)
        self.ring = SigningKeyRing(self.redis, secret, settings.token_ttl_s, settings.jwks_cache_s)
        self.tokens = TokenIssuer(
            self.ring, settings.issuer, settings.audience, settings.token_ttl_s
        )
        self.authenticator = Authenticator(
            self.keys, self.tokens, FailureLimiter(max_failures=settings.max_failures)
        )
        self._rotation: SupervisedTask | None = None
        self._signing_watch: SupervisedTask | None = None

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME, EXT_AUTHZ_SERVICE]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(
                self.keys,
                self.ring,
                self.tokens,
                self.authenticator,
                self.settings.rotate_overlap_s,
            ),
            server,
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            ExtAuthzServicer(self.authenticator), server
        )

    async def start(self, running: RunningServer) -> None:
        await super().start(running)
        await self.ring.ensure()
        await self._bootstrap()
        self._signing_watch = self.tasks.spawn("signing-keys", self._keep_signing_keys)
        if self.settings.rotation_s:
            self._rotation = self.tasks.spawn("signing-rotation", self._rotate_on_schedule)

    async def _bootstrap(self) -> None:
        if self.settings.bootstrap_key:
            key = await self.keys.adopt(self.settings.bootstrap_key, "admin", ["admin"])
            if key is not None:  # else refused (revoked or rotated out): adopt logged why
                logger.info("bootstrap admin key %s registered", key.id)
        path = self.settings.bootstrap_key_file
        if path is not None and not (
            path.exists() and await self.keys.authenticate(path.read_text().strip())
        ):
            key, secret = await self.keys.create(
                "admin", "dev admin", list(SCOPES), [], auth_pb2.KeyLimits(), None
            )
            await asyncio.to_thread(secret_files.replace_secret, path, f"{secret}\n".encode())
            logger.info("created dev admin key %s (secret written to %s)", key.id, path)

    async def _keep_signing_keys(self) -> None:
        """Re-creates the signing keys whenever Redis has lost them.

        Redis restarted without its data (a lost volume, a failover to an empty
        replica, FLUSHALL) leaves an empty ring: every token refused at the
        edge and none issued, while Redis answers and the service looked
        healthy, until someone restarted it.
        """
        while True:
            await asyncio.sleep(SIGNING_CHECK_S)
            try:
                await self._check_signing_keys()
            except RedisError:
                continue  # unreachable: the "redis" condition reports it

    async def _check_signing_keys(self) -> None:
        """Does what a first start does when the ring lacks its current or next key."""
        states = {r.state for r in await self.ring.records()}
        if {"current", "next"} <= states:
            await self.health.report(SIGNING_CONDITION, True)
            return
        # Without a current key nothing can be signed: NOT_SERVING until there is one.
        await self.health.report(SIGNING_CONDITION, "current" in states)
        logger.error(
            "the signing-key ring lost its %s key (Redis lost its data?): creating it as "
            "a first start does",
            " and ".join(s for s in ("current", "next") if s not in states),
        )
        # Under the ring's lock, as at start: replicas racing here create one
        # current key; the others find the lock held and look again next time.
        await self.ring.ensure()
        if "current" not in states:
            # A ring without a current key means Redis came back empty: register
            # the bootstrap admin key again, exactly as a restart would (a
            # revoked bootstrap secret's record went with the data: see
            # docs/runbook.md, "Back up and restore the durable Redis").
            await self._bootstrap()
        recovered = any(r.state == "current" for r in await self.ring.records())
        await self.health.report(SIGNING_CONDITION, recovered)

    async def _rotate_on_schedule(self) -> None:
        """Rotates the signing key every `rotation_s` (a restarted run resumes the schedule)."""
        while True:
            # Counted from the promotion: the key was created one period earlier, as next.
            since = current_since(await self.ring.records())
            due = (since if since is not None else time.time()) + self.settings.rotation_s
            # The gauge keeps the time the rotation was due while it is refused
            # (no next key, not yet published, another replica's lock): the
            # retries every second must not move it, or it never looks overdue
            # and TokenmeshSigningRotationStuck cannot fire.
            NEXT_ROTATION.set(due)
            await asyncio.sleep(max(1.0, due - time.time()))
            with contextlib.suppress(FailedPrecondition):
                record = await self.ring.rotate()
                logger.info("signing key rotated on schedule; current kid %s", record.kid)

    async def stop(self) -> None:
        for task in (self._rotation, self._signing_watch):
            if task is not None:
                await task.stop(timeout_s=5)
        await super().stop()
