"""API keys in Redis: metadata as protobuf, secrets only as keyed hashes.

Layout (all keys under `tm:auth:`):
    key:<id>            ApiKey (serialized protobuf; never a secret)
    secret:<hmac>       -> key id; rotated-out secrets carry a TTL (the overlap)
    key:<id>:secrets    set of the key's secret hashes that may still work: the
                        current one and every rotated-out one (rotate and revoke
                        end them all; one whose overlap ended is dropped at the
                        next rotation)
    issued:<hmac>       -> key id, for every secret ever issued; never deleted, so a
                        revoked or rotated-out secret stays known as such (adopt)
    keys                sorted set of key ids by creation time
    tenant:<tenant>     set of the tenant's key ids
    last-used           hash: key id -> when it was last used (unix nanoseconds)

`last_used_time` lives apart from the key record, so recording a use (on
every replica, while the key is in use) writes only that field and never a
copy of the record read earlier. Revoke and rotate change the record and its
secrets in one WATCH/MULTI transaction on both, retried when either changed,
so a rotation never brings a key revoked meanwhile back to ACTIVE.

`lookup` reads a secret and its remaining overlap in one Lua script: Redis
freezes its clock for a script, so the secret's liveness and its end come from
one instant. Read apart (GET, then PTTL), a secret whose overlap ended in
between was alive yet had "no TTL", and a JWT minted from it lived the full
token lifetime past the overlap. The key's record is read after the script
(its name comes from the secret's value, and a script touches only the keys
it declares): revoke writes the record and deletes the secrets in one
transaction, so a record read later can only be as revoked as the secret.

A rotation ends every secret of the key, not only the current one: each is cut
to what is left of its overlap or the new overlap, whichever is shorter, in the
transaction that issues the new secret. A rotation used to drop the rotated-out
secret from the key's set, so a second rotation (`overlap: 0s` after a leak)
never reached it and it worked on for the rest of its first overlap.

`adopt` registers a secret given from outside (the production bootstrap key,
passed again on every start). It consults `issued:` rather than the live
secrets: revocation deletes `secret:<hmac>`, and a lookup there alone took a
revoked bootstrap key for a new one and stored it again, active.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from services.auth.crypto import ServerSecret, new_api_key
from services.core.errors import FailedPrecondition, NotFound
from services.core.redis_service import text
from tokenmesh.auth.v1 import auth_pb2

logger = logging.getLogger(__name__)

PREFIX = "tm:auth:"
LAST_USED = f"{PREFIX}last-used"
SCOPES = ("inference:generate", "inference:embed", "models:read", "usage:read", "jobs", "admin")
T = TypeVar("T")

# KEYS: secret:<hmac>.
# Returns {key id, the secret's PTTL (-1: no end)} or nil when the secret is
# gone. One script: the clock is frozen while it runs, so a secret that GET
# finds alive has a PTTL >= 0 or -1 (read apart, it could expire in between:
# PTTL -2 was taken for "never ends"). A secret with 0 ms left is as good as
# gone. It touches no other key: one whose name a script builds is undeclared
# (Redis's scripting rule, which ACL key patterns and Redis Cluster rely on).
_LOOKUP = """
local key_id = redis.call('GET', KEYS[1])
if not key_id then return nil end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 or ttl == 0 then return nil end
return {key_id, ttl}
"""

# KEYS[1]: key:<id>:secrets; KEYS[2..]: secret:<hmac> of each of its members.
# ARGV[1]: the new overlap (ms; 0: end now); ARGV[2..]: the members, as KEYS.
# Cuts each secret to min(what is left of it, the overlap) and drops the ones
# that are over (or gone) from the set. A script: the min needs the PTTL and the
# PEXPIRE at one instant (Redis 6.2 has no PEXPIRE ... LT), and a PTTL read
# before MULTI would lengthen a secret by the time until EXEC. Queued in the
# rotation's MULTI, so the cut and the new secret are one change.
_RETIRE = """
local overlap = tonumber(ARGV[1])
for i = 2, #KEYS do
    local ttl = redis.call('PTTL', KEYS[i])
    if overlap == 0 or ttl == -2 or ttl == 0 then
        redis.call('DEL', KEYS[i])
        redis.call('SREM', KEYS[1], ARGV[i])
    elseif ttl == -1 or ttl > overlap then
        redis.call('PEXPIRE', KEYS[i], overlap)
    end
end
return 0
"""


# A secret's id in a JWT: 64 bits of its keyed hash (HMAC under the server secret:
# it tells nothing of the secret, and a key holds a handful of secrets).
SECRET_ID_CHARS = 16


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
    # When the credential stops working (unix seconds): the key's expiry, or the end
    # of a rotated-out secret's overlap, whichever is first; 0 = never. Tokens issued
    # for it expire by then: a JWT outliving its key is a credential nobody can revoke.
    expires_at: float = 0.0
    # Which of the key's secrets it authenticated with: the first SECRET_ID_CHARS of
    # that secret's keyed hash ("": a token from before secret ids). A JWT carries it
    # (`sid`), so the auth service's admin RPCs take a token only while its secret
    # works: a rotation that ended the secret ends the token there too.
    secret_id: str = ""

    def has_scope(self, scope: str) -> bool:
        """Tells whether the caller holds `scope` (admin holds every scope)."""
        return scope in self.scopes or "admin" in self.scopes

    @classmethod
    def from_key(
        cls, key: auth_pb2.ApiKey, secret_ends_at: float = 0.0, secret_digest: str = ""
    ) -> Principal:
        """Builds the principal an API key authenticates as; `secret_ends_at` is
        when the secret used stops working (a rotated-out one's overlap; 0 = never),
        `secret_digest` its keyed hash."""
        ends = [secret_ends_at] if secret_ends_at else []
        if key.HasField("expire_time"):
            ends.append(key.expire_time.ToNanoseconds() / 1e9)
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
            min(ends, default=0.0),
            secret_digest[:SECRET_ID_CHARS],
        )


def format_pins(pins: Mapping[str, str]) -> str:
    """Returns pins as one header/claim value: "model=version,..." (sorted)."""
    return ",".join(f"{model}={version}" for model, version in sorted(pins.items()))


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _parse(raw: bytes | str, last_used_ns: bytes | str | None) -> auth_pb2.ApiKey:
    """Returns a stored key with its separately stored last use (if any) filled in."""
    key = auth_pb2.ApiKey.FromString(raw if isinstance(raw, bytes) else raw.encode())
    if last_used_ns is not None:
        key.last_used_time.FromNanoseconds(int(last_used_ns))
    return key


def new_key_id() -> str:
    """Returns a fresh API key id (create and adopt): contract.API_KEY_ID's shape."""
    return f"key_{uuid.uuid4().hex[:16]}"


def key_record_name(key_id: str) -> str:
    """Returns the Redis key of an API key's record (an ApiKey protobuf). Public: the
    jobs service reads the record to stop a revoked key's jobs (services/jobs/key_status.py)."""
    return f"{PREFIX}key:{key_id}"


def _issued(digest: str) -> str:
    return f"{PREFIX}issued:{digest}"


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"API key {key_id!r} does not exist", reason="API_KEY_NOT_FOUND")


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
        self._lookup = client.register_script(_LOOKUP)

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
            id=new_key_id(),
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
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_store(pipe, key, self.secret.hash_api_key(secret), now)
            await pipe.execute()

    @staticmethod
    def _queue_store(pipe: Pipeline, key: auth_pb2.ApiKey, digest: str, now: float) -> None:
        pipe.set(key_record_name(key.id), key.SerializeToString())
        pipe.set(f"{PREFIX}secret:{digest}", key.id)
        pipe.set(_issued(digest), key.id)
        pipe.sadd(f"{PREFIX}key:{key.id}:secrets", digest)
        pipe.zadd(f"{PREFIX}keys", {key.id: now})
        pipe.sadd(f"{PREFIX}tenant:{key.tenant}", key.id)

    async def get(self, key_id: str) -> auth_pb2.ApiKey:
        """Returns a key's metadata; NotFound when unknown."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key_record_name(key_id))
            pipe.hget(LAST_USED, key_id)
            raw, last_used = await pipe.execute()
        if raw is None:
            raise _not_found(key_id)
        key = _parse(raw, last_used)
        key.state = key_state(key, time.time())
        return key

    async def rotated_secret_ends(self, key: auth_pb2.ApiKey) -> list[float]:
        """Returns when each of the key's rotated-out secrets still accepted stops
        working (unix seconds, soonest first): those with an overlap left, each ending
        with the key itself at the latest. The current secret has no end of its own;
        one whose overlap ended is gone; a key not active accepts none."""
        if key.state != auth_pb2.API_KEY_STATE_ACTIVE:
            return []
        digests = [text(d) for d in await self.redis.smembers(f"{PREFIX}key:{key.id}:secrets")]
        sent = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:  # one instant
            for digest in digests:
                pipe.pttl(f"{PREFIX}secret:{digest}")
            ttls = await pipe.execute()
        key_ends = key.expire_time.ToNanoseconds() / 1e9 if key.HasField("expire_time") else None
        ends = (sent + int(ttl_ms) / 1000 for ttl_ms in ttls if int(ttl_ms) > 0)
        return sorted(min(end, key_ends) if key_ends else end for end in ends)

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[auth_pb2.ApiKey], str]:
        """Returns keys (newest first, optionally of one tenant) and the next page token."""
        ids: Sequence[str]
        if tenant:
            members: Any = await self.redis.smembers(f"{PREFIX}tenant:{tenant}")
            ids = await self._newest_first([text(i) for i in members])
        else:
            newest: Any = await self.redis.zrevrange(f"{PREFIX}keys", 0, -1)
            ids = [text(i) for i in newest]
        start = ids.index(page_token) + 1 if page_token in ids else 0
        page = ids[start : start + page_size]
        keys = [await self.get(key_id) for key_id in page]
        return keys, page[-1] if start + page_size < len(ids) else ""

    async def _newest_first(self, ids: Sequence[str]) -> Sequence[str]:
        """Returns key ids newest first, by their creation in `keys` (a tenant's set
        has no order: sorted by id, its listing came out shuffled, random ids)."""
        if not ids:
            return []
        created: Any = await self.redis.zmscore(f"{PREFIX}keys", [*ids])
        when = {key_id: float(c or 0) for key_id, c in zip(ids, created, strict=True)}
        return sorted(ids, key=lambda key_id: (when[key_id], key_id), reverse=True)

    async def authenticate(self, api_key: str) -> auth_pb2.ApiKey | None:
        """Returns the active key a secret belongs to, or None (unknown, revoked, expired)."""
        found = await self.lookup(api_key)
        return found[0] if found is not None else None

    async def lookup(self, api_key: str) -> tuple[auth_pb2.ApiKey, float] | None:
        """Returns the active key a secret belongs to and when that secret stops
        working (unix seconds; 0 = not before the key does), or None."""
        digest = self.secret.hash_api_key(api_key)
        # Taken before the read: the secret ends `ttl_ms` after some instant of the
        # script, no earlier than this, so its end is never put later than it is
        # (less 1 ms: PTTL counts from Redis's clock truncated to the millisecond).
        sent = time.time()
        found = await self._lookup(keys=[f"{PREFIX}secret:{digest}"])
        if found is None:
            return None
        key_id, ttl_ms = text(found[0]), found[1]
        # After the secret: a key revoked meanwhile reads revoked here (revoke writes
        # the record and deletes its secrets in one transaction). One MULTI: the
        # record and its last use from one instant.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(key_record_name(key_id))
            pipe.hget(LAST_USED, key_id)
            raw, last_used = await pipe.execute()
        if raw is None:
            return None  # a secret of a deleted key
        key = _parse(raw, last_used)
        now = time.time()
        key.state = key_state(key, now)
        if key.state != auth_pb2.API_KEY_STATE_ACTIVE:
            return None
        ends_at = sent + (int(ttl_ms) - 1) / 1000 if int(ttl_ms) >= 0 else 0.0
        if ends_at and ends_at <= now:
            return None  # its overlap ended while the answer travelled
        return key, ends_at

    async def secret_works(self, key_id: str, secret_id: str) -> bool:
        """Tells whether the secret of key `key_id` whose id is `secret_id` (see
        Principal.secret_id) still works: not rotated out past its overlap, not
        revoked."""
        digests = await self.redis.smembers(f"{PREFIX}key:{key_id}:secrets")
        names = [
            f"{PREFIX}secret:{text(digest)}"
            for digest in digests
            if text(digest).startswith(secret_id)
        ]
        return bool(names) and bool(await self.redis.exists(*names))

    async def is_active(self, key_id: str) -> bool:
        """Tells whether key `key_id` is active now (read from Redis: not revoked,
        not expired, not deleted)."""
        try:
            key = await self.get(key_id)
        except NotFound:
            return False
        return key.state == auth_pb2.API_KEY_STATE_ACTIVE

    async def touch(self, key: auth_pb2.ApiKey) -> None:
        """Records that a key was used (callers throttle this); writes nothing else."""
        now_ns = time.time_ns()
        key.last_used_time.FromNanoseconds(now_ns)
        await self.redis.hset(LAST_USED, key.id, str(now_ns))

    async def revoke(self, key_id: str) -> auth_pb2.ApiKey:
        """Revokes a key and deletes every secret hash that maps to it (its set holds
        the rotated-out ones too)."""

        def write(pipe: Pipeline, key: auth_pb2.ApiKey, digests: Sequence[str]) -> None:
            key.state = auth_pb2.API_KEY_STATE_REVOKED
            pipe.set(key_record_name(key_id), key.SerializeToString())
            for digest in digests:
                pipe.delete(f"{PREFIX}secret:{digest}")
            pipe.delete(f"{PREFIX}key:{key_id}:secrets")

        key, _ = await self._change(key_id, write)
        return key

    async def rotate(self, key_id: str, overlap_s: float) -> tuple[auth_pb2.ApiKey, str, float]:
        """Issues a new secret; every old one (those earlier rotations left in their
        overlap too) stops within `overlap_s` seconds, or when it was to stop if
        that is sooner. Returns the key, the new secret and when the old ones end
        at the latest."""

        def write(pipe: Pipeline, key: auth_pb2.ApiKey, old: Sequence[str]) -> str:
            if key.state != auth_pb2.API_KEY_STATE_ACTIVE:
                raise FailedPrecondition(
                    f"API key {key_id!r} is not active", reason="API_KEY_NOT_ACTIVE"
                )
            secret = new_api_key()
            digest = self.secret.hash_api_key(secret)
            key.prefix = secret[:7]
            self._queue_retire(pipe, key_id, old, overlap_s)
            pipe.set(f"{PREFIX}secret:{digest}", key_id)
            pipe.set(_issued(digest), key_id)
            pipe.sadd(f"{PREFIX}key:{key_id}:secrets", digest)
            pipe.set(key_record_name(key_id), key.SerializeToString())
            return secret

        key, secret = await self._change(key_id, write)
        # Taken once the overlap was set: no lookup puts the old secrets' end later
        # than this (tokens for them expire by it; lookup reads the end from before).
        return key, secret, time.time() + overlap_s

    @staticmethod
    def _queue_retire(
        pipe: Pipeline, key_id: str, digests: Sequence[str], overlap_s: float
    ) -> None:
        """Queues the cut of a key's secrets `digests` to at most `overlap_s` seconds."""
        if not digests:
            return
        overlap_ms = max(1, int(overlap_s * 1000)) if overlap_s > 0 else 0
        names = [f"{PREFIX}secret:{digest}" for digest in digests]
        # EVAL (the body each time): rotations are rare, and a registered script's
        # EVALSHA in MULTI costs a SCRIPT EXISTS (and LOAD) on the watched connection.
        pipe.eval(
            _RETIRE,
            1 + len(names),
            f"{PREFIX}key:{key_id}:secrets",
            *names,
            overlap_ms,
            *digests,
        )

    async def _change(
        self,
        key_id: str,
        write: Callable[[Pipeline, auth_pb2.ApiKey, Sequence[str]], T],
    ) -> tuple[auth_pb2.ApiKey, T]:
        """Runs `write(pipe, key, secret digests)` in one transaction on the key's
        record and secrets, again from a fresh read whenever either changed first.

        `write` queues the new record and secrets on `pipe` (or raises); the key
        it gets has its effective state and no last use (that is stored apart).
        Returns the written key (with its last use) and what `write` returned.
        """
        secrets = f"{PREFIX}key:{key_id}:secrets"
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key_record_name(key_id), secrets)
                    raw = await pipe.get(key_record_name(key_id))
                    if raw is None:
                        raise _not_found(key_id)
                    key = _parse(raw, None)
                    key.state = key_state(key, time.time())
                    digests = [text(d) for d in await pipe.smembers(secrets)]
                    last_used = await pipe.hget(LAST_USED, key_id)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    result = write(pipe, key, digests)
                    await pipe.execute()
                except WatchError:
                    continue  # a concurrent revoke or rotate won: start from its result
            if last_used is not None:
                key.last_used_time.FromNanoseconds(int(last_used))
            return key, result

    async def adopt(
        self, api_key: str, tenant: str, scopes: Sequence[str]
    ) -> auth_pb2.ApiKey | None:
        """Registers a given secret (the production bootstrap key from a secret store).

        Returns the key it authenticates as: the one it already belongs to when
        that is active, else a new one. Returns None, and logs an error, for a
        secret that was revoked, expired or rotated out: it stays refused.
        """
        digest = self.secret.hash_api_key(api_key)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    # Two replicas starting at once: the second sees the first's key.
                    await pipe.watch(_issued(digest))
                    owner = await pipe.get(_issued(digest))
                    existing = await self.authenticate(api_key)
                    if existing is not None:
                        if owner is None:  # issued before `issued:` was kept
                            pipe.multi()  # type: ignore[no-untyped-call]
                            pipe.set(_issued(digest), existing.id)
                            await pipe.execute()
                        return existing
                    if owner is not None:
                        logger.error(
                            "refusing to register the bootstrap API key again: it belonged to "
                            "key %s and was revoked, expired or rotated out; configure a new "
                            "secret (TOKENMESH_AUTH_BOOTSTRAP_KEY) to get a bootstrap key",
                            text(owner),
                        )
                        return None
                    now = time.time()
                    key = auth_pb2.ApiKey(
                        id=new_key_id(),
                        tenant=tenant,
                        name="bootstrap",
                        scopes=list(scopes),
                        create_time=_timestamp(now),
                        state=auth_pb2.API_KEY_STATE_ACTIVE,
                        prefix=api_key[:7],
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._queue_store(pipe, key, digest, now)
                    await pipe.execute()
                    return key
                except WatchError:
                    continue  # another replica registered it meanwhile: read its key
