"""JWT signing keys (ES256) in Redis, with a pre-published next key.

The JWKS always holds the current key, the *next* key, and previous keys
whose tokens may still be valid. Rotation promotes the next key (which every
Envoy already caches) and publishes a new next key, so tokens signed after a
rotation verify at once and no Envoy restart or refetch race is involved.
Rotation is refused while the next key is younger than the edge's JWKS cache
duration (plus a margin for the refetch): only then has every edge's cache
turned over since it was published. A JWKS fetch proves nothing about the
others (it may be one edge of several, a probe, anyone: the JWKS is public),
so fetches are not counted. Private keys are stored AES-GCM encrypted under
the server secret.

Each replica keeps the JWKS it built for JWKS_SERVE_CACHE_S (GetJwks is public
and not rate limited: decrypting every key for every fetch let a flood compete
with ext_authz) and each private key it decrypted, by kid (a kid's key never
changes). A change of the ring on this replica is served at once; one made by
another replica within the cache time. That time counts towards publishing
the next key: an edge may fetch a JWKS built that long before the next key was
created, so rotation waits for it too.

A key's age as the signing key counts from its promotion (`activated`), not
from its creation as the next key one period earlier: the schedule took a
promoted key for due at once and rotated twice a period.

Every change of the ring (first keys, rotation, retiring old keys) holds a
lock shared by all auth replicas and carries its fencing token: taking the
lock issues a token larger than every earlier one, and the change is written
by a Lua script only if no newer token was issued since. So two replicas
rotating at once leave one consistent ring (one current key, one next key),
and a replica that stalled past its lock's lifetime writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import timestamp_pb2

from services.auth.crypto import ServerSecret
from services.core.errors import FailedPrecondition
from services.core.redis_service import known_fields
from tokenmesh.auth.v1 import auth_pb2

KEYS = "tm:auth:signing:keys"
LOCK = "tm:auth:signing:lock"
FENCE = "tm:auth:signing:fence"
ALGORITHM = "ES256"
# An edge refetches the JWKS when its cache runs out: a 2 s fetch, retried every
# second after a failure (gateway/edge_auth.py). Some seconds past the cache
# duration, every edge that can reach the auth service holds the new JWKS.
JWKS_REFETCH_MARGIN_S = 10.0
# How long a replica serves the JWKS it built (from before its Redis read).
JWKS_SERVE_CACHE_S = 2.0
# A change of the ring takes milliseconds; a holder that stalls longer loses the lock.
LOCK_MS = 10_000

# KEYS: lock, fencing counter; ARGV: lock lifetime in ms.
# Returns a fencing token larger than every earlier one, or 0 while the lock is held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', tonumber(ARGV[1]))
return token
"""

# KEYS: fencing counter, key ring; ARGV: token, n, then n (kid, record) pairs to
# store, then kids to delete. Writes only if no newer token was issued; returns 1, else 0.
_FENCED_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local stored = 2 + 2 * tonumber(ARGV[2])
for i = 3, stored, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
for i = stored + 1, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
return 1
"""

# KEYS: lock; ARGV: token. Releases the lock only if this token still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class SigningKeyRecord:
    """SigningKeyRecord is one key's stored form (private part encrypted)."""

    kid: str
    created: float
    state: str  # "next", "current", "previous"
    deactivated: float  # when it stopped being current (0 while current/next)
    private: str
    # When it became current (0 while next, and in records stored before it was kept).
    activated: float = 0.0

    def to_pb(self) -> auth_pb2.SigningKey:
        """Returns the public description of the key."""
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(self.created * 1e9))
        state = {
            "current": auth_pb2.SIGNING_KEY_STATE_CURRENT,
            "previous": auth_pb2.SIGNING_KEY_STATE_PREVIOUS,
        }.get(self.state, auth_pb2.SIGNING_KEY_STATE_UNSPECIFIED)
        return auth_pb2.SigningKey(
            kid=self.kid, algorithm=ALGORITHM, state=state, create_time=created
        )


def current_since(records: Sequence[SigningKeyRecord]) -> float | None:
    """Returns when the current key became current (None when there is none).

    A record stored before `activated` was kept became current when the key
    before it was retired (the newest previous key's `deactivated`), or, the
    first key of all, when it was created.
    """
    current = next((r for r in records if r.state == "current"), None)
    if current is None:
        return None
    if current.activated:
        return current.activated
    retired = [r.deactivated for r in records if r.state == "previous"]
    return max(retired, default=current.created)


def _b64url(number: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(32, "big")).rstrip(b"=").decode()


class SigningKeyRing:
    """SigningKeyRing issues, rotates and publishes signing keys.

    Args:
        client: Redis.
        secret: encrypts private keys at rest.
        token_ttl_s: the longest token lifetime (how long previous keys stay published).
        jwks_cache_s: how long an edge may cache the JWKS.
        lock_ms: how long a replica may hold the ring's lock.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        secret: ServerSecret,
        token_ttl_s: float,
        jwks_cache_s: float,
        lock_ms: int = LOCK_MS,
    ) -> None:
        self.redis = client
        self.secret = secret
        self.token_ttl_s = token_ttl_s
        self.jwks_cache_s = jwks_cache_s
        self.lock_ms = lock_ms
        self._private_cache: dict[str, ec.EllipticCurvePrivateKey] = {}
        # The JWKS served until (monotonic seconds); None after a change of the ring.
        self._jwks: tuple[float, list[dict[str, str]]] | None = None
        # Bumped by every change of the ring: a build that read the ring before
        # one is served to its own callers but not kept.
        self._ring_changes = 0
        self._jwks_lock = asyncio.Lock()
        self._acquire = client.register_script(_ACQUIRE)
        self._fenced_write = client.register_script(_FENCED_WRITE)
        self._release = client.register_script(_RELEASE)

    def _new_record(self, state: str) -> SigningKeyRecord:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        kid = f"sk_{uuid.uuid4().hex[:12]}"
        now = time.time()
        return SigningKeyRecord(
            kid,
            now,
            state,
            0.0,
            self.secret.encrypt(pem, kid.encode()),
            activated=now if state == "current" else 0.0,
        )

    async def records(self) -> list[SigningKeyRecord]:
        """Returns every stored key, newest first."""
        raw = await self.redis.hgetall(KEYS)
        # Fields a newer replica added are left out: replicas of two versions share a ring.
        records = [
            SigningKeyRecord(**known_fields(SigningKeyRecord, json.loads(value)))
            for value in raw.values()
        ]
        return sorted(records, key=lambda r: r.created, reverse=True)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[int]:
        """Holds the ring's lock across replicas; yields its fencing token.

        Raises FailedPrecondition while another replica holds it.
        """
        token = int(await self._acquire(keys=[LOCK, FENCE], args=[self.lock_ms]))
        if not token:
            raise FailedPrecondition(
                "another auth replica is changing the signing keys; try again in a few seconds",
                reason="SIGNING_KEYS_LOCKED",
            )
        try:
            yield token
        finally:
            await self._release(keys=[LOCK], args=[token])

    async def _save(
        self, token: int, records: Sequence[SigningKeyRecord], retire: Sequence[str] = ()
    ) -> None:
        """Stores `records` and deletes `retire`, unless a newer lock holder came since.

        Raises FailedPrecondition (and changes nothing) when one did.
        """
        pairs = [x for r in records for x in (r.kid, json.dumps(asdict(r)))]
        args: list[str | int] = [token, len(records), *pairs, *retire]
        try:
            written = await self._fenced_write(keys=[FENCE, KEYS], args=args)
        finally:  # whatever came of it (a timeout may hide a write): read the ring again
            self._jwks = None
            self._ring_changes += 1
        if not written:
            raise FailedPrecondition(
                "this auth replica held the signing-key lock too long and another took it; "
                "nothing was changed, try again",
                reason="SIGNING_KEYS_LOCK_LOST",
            )

    async def ensure(self) -> None:
        """Creates the current and next keys on first start (safe with replicas)."""
        with contextlib.suppress(FailedPrecondition):  # another replica is creating them
            async with self._locked() as token:
                states = {r.state for r in await self.records()}
                missing = [s for s in ("current", "next") if s not in states]
                if missing:
                    await self._save(token, [self._new_record(s) for s in missing])

    async def current(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """Returns (kid, private key) of the key that signs new tokens."""
        record = next((r for r in await self.records() if r.state == "current"), None)
        if record is None:
            raise FailedPrecondition("no current signing key", reason="NO_SIGNING_KEY")
        return record.kid, self._private(record)

    def _private(self, record: SigningKeyRecord) -> ec.EllipticCurvePrivateKey:
        """Returns a record's private key, decrypted once per kid."""
        key = self._private_cache.get(record.kid)
        if key is None:
            pem = self.secret.decrypt(record.private, record.kid.encode())
            loaded = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            key = self._private_cache[record.kid] = loaded
        return key

    async def rotate(self, force: bool = False) -> SigningKeyRecord:
        """Promotes the next key to current; returns the new current key.

        Raises FailedPrecondition when edges may not know the next key yet
        (unless `force`), or while another replica changes the ring.
        """
        async with self._locked() as token:
            return await self._rotate(token, force)

    async def _rotate(self, token: int, force: bool) -> SigningKeyRecord:
        records = await self.records()
        by_state = {r.state: r for r in records if r.state in ("current", "next")}
        upcoming = by_state.get("next")
        if upcoming is None:
            # Redis lost the ring: every auth replica re-creates it within seconds.
            raise FailedPrecondition(
                "no next signing key; the auth service creates one within seconds, try again",
                reason="NO_NEXT_KEY",
            )
        now = time.time()
        wait = self.publish_s - (now - upcoming.created)
        if not force and wait > 0:
            raise FailedPrecondition(
                f"edges may not know the next signing key yet; rotate again in {wait:.0f}s "
                f"(edges refresh the JWKS every {self.jwks_cache_s:.0f}s)",
                reason="SIGNING_KEY_NOT_PUBLISHED",
            )
        changed = [upcoming, self._new_record("next")]
        upcoming.state, upcoming.activated = "current", now
        if "current" in by_state:
            old = by_state["current"]
            old.state, old.deactivated = "previous", now
            changed.append(old)
        await self._save(token, changed, self._expired(records, now))
        return upcoming

    @property
    def publish_s(self) -> float:
        """How long the next key is published before it may sign: every replica
        serves it, and every edge's JWKS cache has turned over (and been
        refetched) by then."""
        return self.jwks_cache_s + JWKS_REFETCH_MARGIN_S + JWKS_SERVE_CACHE_S

    def _expired(self, records: list[SigningKeyRecord], now: float) -> list[str]:
        """Returns the kids of previous keys no unexpired token can name any more."""
        return [
            r.kid
            for r in records
            if r.state == "previous" and now - r.deactivated > self.token_ttl_s + 60
        ]

    async def jwks(self) -> dict[str, Any]:
        """Returns the JWK Set: current, next and still-valid previous keys.

        Built at most every JWKS_SERVE_CACHE_S (by one caller; the others wait
        for it), and at once after a change of the ring on this replica.
        """
        keys = self._fresh_jwks()
        if keys is None:
            async with self._jwks_lock:
                keys = self._fresh_jwks()
                if keys is None:
                    changes, started = self._ring_changes, time.monotonic()
                    keys = await self._build_jwks()
                    if changes == self._ring_changes:
                        self._jwks = (started + JWKS_SERVE_CACHE_S, keys)
        return {"keys": [dict(k) for k in keys]}  # a caller's copy

    def _fresh_jwks(self) -> list[dict[str, str]] | None:
        cached = self._jwks
        return cached[1] if cached is not None and cached[0] > time.monotonic() else None

    async def _build_jwks(self) -> list[dict[str, str]]:
        keys = []
        now = time.time()
        records = await self.records()
        for record in records:
            if record.state == "previous" and now - record.deactivated > self.token_ttl_s + 60:
                continue
            numbers = self._private(record).public_key().public_numbers()
            keys.append(
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "alg": ALGORITHM,
                    "use": "sig",
                    "kid": record.kid,
                    "x": _b64url(numbers.x),
                    "y": _b64url(numbers.y),
                }
            )
        # Keys retired from the ring (by any replica) are forgotten here too.
        stored = {r.kid for r in records}
        for kid in [k for k in self._private_cache if k not in stored]:
            del self._private_cache[kid]
        return keys
