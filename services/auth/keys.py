"""API keys in Redis: metadata as protobuf, secrets only as keyed hashes.

Layout (all keys under `tm:auth:`):
    key:<id>            ApiKey (serialized protobuf; never a secret)
    secret:<hmac>       -> key id; rotated-out secrets carry a TTL (the overlap)
    key:<id>:secrets    set of the key's live secret hashes (for revocation)
    keys                sorted set of key ids by creation time
    tenant:<tenant>     set of the tenant's key ids
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.auth.crypto import ServerSecret, new_api_key
from services.core.errors import FailedPrecondition, NotFound
from services.core.redis_service import text
from tokenmesh.auth.v1 import auth_pb2

PREFIX = "tm:auth:"
SCOPES = ("inference:generate", "inference:embed", "models:read", "usage:read", "admin")


@dataclass(frozen=True)
class Principal:
    """Principal is an authenticated caller."""

    key_id: str
    tenant: str
    scopes: tuple[str, ...]
    models: tuple[str, ...]
    tier: str
    rpm: int = 0  # requests per minute; 0 = the tier's default
    tpm: int = 0  # tokens per minute; 0 = unlimited
    monthly: int = 0  # tokens per calendar month; 0 = unlimited
    pins: str = ""  # "model=version,..." the key's requests default to

    def has_scope(self, scope: str) -> bool:
        """Tells whether the caller holds `scope` (admin holds every scope)."""
        return scope in self.scopes or "admin" in self.scopes

    @classmethod
    def from_key(cls, key: auth_pb2.ApiKey) -> Principal:
        """Builds the principal an API key authenticates as."""
        return cls(
            key.id,
            key.tenant,
            tuple(key.scopes),
            tuple(key.allowed_models),
            key.limits.priority_tier,
            key.limits.requests_per_minute,
            key.limits.tokens_per_minute,
            key.limits.monthly_tokens,
            format_pins(key.pinned_versions),
        )


def format_pins(pins: Mapping[str, str]) -> str:
    """Returns pins as one header/claim value: "model=version,..." (sorted)."""
    return ",".join(f"{model}={version}" for model, version in sorted(pins.items()))


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def key_state(key: auth_pb2.ApiKey, now: float) -> auth_pb2.ApiKeyState.ValueType:
    """Returns a key's effective state (expiry is evaluated at read time)."""
    if key.state == auth_pb2.API_KEY_STATE_ACTIVE and key.HasField("expire_time"):
        if key.expire_time.ToNanoseconds() <= now * 1e9:
            return auth_pb2.API_KEY_STATE_EXPIRED
    return key.state


class ApiKeyStore:
    """ApiKeyStore creates, finds, rotates and revokes API keys."""

    def __init__(self, client: aioredis.Redis, secret: ServerSecret) -> None:
        self.redis = client
        self.secret = secret

    async def create(
        self,
        tenant: str,
        name: str,
        scopes: Sequence[str],
        allowed_models: Sequence[str],
        limits: auth_pb2.KeyLimits,
        ttl_s: float | None,
        pinned_versions: Mapping[str, str] | None = None,
    ) -> tuple[auth_pb2.ApiKey, str]:
        """Stores a new key; returns it and its secret (the only time it exists)."""
        now = time.time()
        secret = new_api_key()
        key = auth_pb2.ApiKey(
            id=f"key_{uuid.uuid4().hex[:16]}",
            tenant=tenant,
            name=name,
            scopes=list(scopes),
            allowed_models=list(allowed_models),
            limits=limits,
            create_time=_timestamp(now),
            state=auth_pb2.API_KEY_STATE_ACTIVE,
            prefix=secret[:7],
            pinned_versions=dict(pinned_versions or {}),
        )
        if ttl_s:
            key.expire_time.CopyFrom(_timestamp(now + ttl_s))
        await self._store(key, secret, now)
        return key, secret

    async def _store(self, key: auth_pb2.ApiKey, secret: str, now: float) -> None:
        digest = self.secret.hash_api_key(secret)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}key:{key.id}", key.SerializeToString())
            pipe.set(f"{PREFIX}secret:{digest}", key.id)
            pipe.sadd(f"{PREFIX}key:{key.id}:secrets", digest)
            pipe.zadd(f"{PREFIX}keys", {key.id: now})
            pipe.sadd(f"{PREFIX}tenant:{key.tenant}", key.id)
            await pipe.execute()

    async def get(self, key_id: str) -> auth_pb2.ApiKey:
        """Returns a key's metadata; NotFound when unknown."""
        raw = await self.redis.get(f"{PREFIX}key:{key_id}")
        if raw is None:
            raise NotFound(f"API key {key_id!r} does not exist", reason="API_KEY_NOT_FOUND")
        key = auth_pb2.ApiKey.FromString(raw if isinstance(raw, bytes) else raw.encode())
        key.state = key_state(key, time.time())
        return key

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[auth_pb2.ApiKey], str]:
        """Returns keys (newest first, optionally of one tenant) and the next page token."""
        raw: list[Any] = (
            sorted(await self.redis.smembers(f"{PREFIX}tenant:{tenant}"), reverse=True)
            if tenant
            else list(await self.redis.zrevrange(f"{PREFIX}keys", 0, -1))
        )
        ids = [text(i) for i in raw]
        start = ids.index(page_token) + 1 if page_token in ids else 0
        page = ids[start : start + page_size]
        keys = [await self.get(key_id) for key_id in page]
        return keys, page[-1] if start + page_size < len(ids) else ""

    async def authenticate(self, api_key: str) -> auth_pb2.ApiKey | None:
        """Returns the active key a secret belongs to, or None (unknown, revoked, expired)."""
        digest = self.secret.hash_api_key(api_key)
        key_id = await self.redis.get(f"{PREFIX}secret:{digest}")
        if key_id is None:
            return None
        try:
            key = await self.get(text(key_id))
        except NotFound:
            return None
        return key if key.state == auth_pb2.API_KEY_STATE_ACTIVE else None

    async def touch(self, key: auth_pb2.ApiKey) -> None:
        """Records that a key was used (callers throttle this)."""
        key.last_used_time.CopyFrom(_timestamp(time.time()))
        await self.redis.set(f"{PREFIX}key:{key.id}", key.SerializeToString(), xx=True)

    async def revoke(self, key_id: str) -> auth_pb2.ApiKey:
        """Revokes a key and deletes every secret hash that maps to it."""
        key = await self.get(key_id)
        key.state = auth_pb2.API_KEY_STATE_REVOKED
        digests = await self.redis.smembers(f"{PREFIX}key:{key_id}:secrets")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}key:{key_id}", key.SerializeToString())
            for digest in digests:
                pipe.delete(f"{PREFIX}secret:{text(digest)}")
            pipe.delete(f"{PREFIX}key:{key_id}:secrets")
            await pipe.execute()
        return key

    async def rotate(self, key_id: str, overlap_s: float) -> tuple[auth_pb2.ApiKey, str, float]:
        """Issues a new secret; old ones keep working for `overlap_s` seconds, then stop."""
        key = await self.get(key_id)
        if key.state != auth_pb2.API_KEY_STATE_ACTIVE:
            raise FailedPrecondition(
                f"API key {key_id!r} is not active", reason="API_KEY_NOT_ACTIVE"
            )
        secret = new_api_key()
        digest = self.secret.hash_api_key(secret)
        old = [text(d) for d in await self.redis.smembers(f"{PREFIX}key:{key_id}:secrets")]
        key.prefix = secret[:7]
        expires_at = time.time() + overlap_s
        async with self.redis.pipeline(transaction=True) as pipe:
            for old_digest in old:
                if overlap_s > 0:
                    pipe.pexpire(f"{PREFIX}secret:{old_digest}", max(1, int(overlap_s * 1000)))
                else:
                    pipe.delete(f"{PREFIX}secret:{old_digest}")
                pipe.srem(f"{PREFIX}key:{key_id}:secrets", old_digest)
            pipe.set(f"{PREFIX}secret:{digest}", key_id)
            pipe.sadd(f"{PREFIX}key:{key_id}:secrets", digest)
            pipe.set(f"{PREFIX}key:{key_id}", key.SerializeToString())
            await pipe.execute()
        return key, secret, expires_at

    async def adopt(self, api_key: str, tenant: str, scopes: Sequence[str]) -> auth_pb2.ApiKey:
        """Registers a given secret (the production bootstrap key from a secret store)."""
        existing = await self.authenticate(api_key)
        if existing is not None:
            return existing
        now = time.time()
        key = auth_pb2.ApiKey(
            id=f"key_{uuid.uuid4().hex[:16]}",
            tenant=tenant,
            name="bootstrap",
            scopes=list(scopes),
            create_time=_timestamp(now),
            state=auth_pb2.API_KEY_STATE_ACTIVE,
            prefix=api_key[:7],
        )
        await self._store(key, api_key, now)
        return key
