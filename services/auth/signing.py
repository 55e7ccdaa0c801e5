"""JWT signing keys (ES256) in Redis, with a pre-published next key.

The JWKS always holds the current key, the *next* key, and previous keys
whose tokens may still be valid. Rotation promotes the next key (which every
Envoy already caches) and publishes a new next key, so tokens signed after a
rotation verify at once and no Envoy restart or refetch race is involved.
Rotation is refused while the next key is younger than the edge's JWKS cache
duration. Private keys are stored AES-GCM encrypted under the server secret.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import timestamp_pb2

from services.auth.crypto import ServerSecret
from services.core.errors import FailedPrecondition
from tokenmesh.auth.v1 import auth_pb2

KEYS = "tm:auth:signing:keys"
LOCK = "tm:auth:signing:lock"
LAST_SERVED = "tm:auth:signing:jwks-served-at"
ALGORITHM = "ES256"


@dataclass
class SigningKeyRecord:
    """SigningKeyRecord is one key's stored form (private part encrypted)."""

    kid: str
    created: float
    state: str  # "next", "current", "previous"
    deactivated: float  # when it stopped being current (0 while current/next)
    private: str

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


def _b64url(number: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(32, "big")).rstrip(b"=").decode()


class SigningKeyRing:
    """SigningKeyRing issues, rotates and publishes signing keys.

    Args:
        client: Redis.
        secret: encrypts private keys at rest.
        token_ttl_s: the longest token lifetime (how long previous keys stay published).
        jwks_cache_s: how long an edge may cache the JWKS.
    """

    def __init__(
        self, client: aioredis.Redis, secret: ServerSecret, token_ttl_s: float, jwks_cache_s: float
    ) -> None:
        self.redis = client
        self.secret = secret
        self.token_ttl_s = token_ttl_s
        self.jwks_cache_s = jwks_cache_s
        self._private_cache: dict[str, ec.EllipticCurvePrivateKey] = {}

    def _new_record(self, state: str) -> SigningKeyRecord:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        kid = f"sk_{uuid.uuid4().hex[:12]}"
        return SigningKeyRecord(
            kid, time.time(), state, 0.0, self.secret.encrypt(pem, kid.encode())
        )

    async def records(self) -> list[SigningKeyRecord]:
        """Returns every stored key, newest first."""
        raw = await self.redis.hgetall(KEYS)
        records = [SigningKeyRecord(**json.loads(value)) for value in raw.values()]
        return sorted(records, key=lambda r: r.created, reverse=True)

    async def _save(self, *records: SigningKeyRecord) -> None:
        if not records:
            return
        await self.redis.hset(KEYS, mapping={r.kid: json.dumps(asdict(r)) for r in records})

    async def ensure(self) -> None:
        """Creates the current and next keys on first start (safe with replicas)."""
        if await self.redis.set(LOCK, "1", nx=True, px=5000):
            try:
                states = {r.state for r in await self.records()}
                missing = [s for s in ("current", "next") if s not in states]
                await self._save(*(self._new_record(s) for s in missing))
            finally:
                await self.redis.delete(LOCK)

    async def current(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """Returns (kid, private key) of the key that signs new tokens."""
        record = next((r for r in await self.records() if r.state == "current"), None)
        if record is None:
            raise FailedPrecondition("no current signing key", reason="NO_SIGNING_KEY")
        if record.kid not in self._private_cache:
            pem = self.secret.decrypt(record.private, record.kid.encode())
            key = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._private_cache[record.kid] = key
        return record.kid, self._private_cache[record.kid]

    async def rotate(self, force: bool = False) -> SigningKeyRecord:
        """Promotes the next key to current; returns the new current key."""
        records = await self.records()
        by_state = {r.state: r for r in records if r.state in ("current", "next")}
        upcoming = by_state.get("next")
        if upcoming is None:
            raise FailedPrecondition(
                "no next signing key; restart the auth service", reason="NO_NEXT_KEY"
            )
        if not force and not await self._next_key_published(upcoming):
            wait = self.jwks_cache_s - (time.time() - upcoming.created)
            raise FailedPrecondition(
                f"no edge has fetched the next signing key yet; rotate again in {wait:.0f}s "
                f"(edges refresh the JWKS every {self.jwks_cache_s:.0f}s)",
                reason="SIGNING_KEY_NOT_PUBLISHED",
            )
        now = time.time()
        changed = [upcoming, self._new_record("next")]
        upcoming.state = "current"
        if "current" in by_state:
            old = by_state["current"]
            old.state, old.deactivated = "previous", now
            changed.append(old)
        await self._save(*changed)
        await self._retire(records, now)
        return upcoming

    async def _next_key_published(self, upcoming: SigningKeyRecord) -> bool:
        """Tells whether edges know the next key: one fetched the JWKS since it
        was created, or every edge's cache has turned over since."""
        served_at = float(await self.redis.get(LAST_SERVED) or 0)
        return served_at > upcoming.created or time.time() - upcoming.created >= self.jwks_cache_s

    async def mark_served(self) -> None:
        """Records that an edge fetched the JWKS (called by GetJwks)."""
        await self.redis.set(LAST_SERVED, str(time.time()))

    async def _retire(self, records: list[SigningKeyRecord], now: float) -> None:
        expired = [
            r.kid
            for r in records
            if r.state == "previous" and now - r.deactivated > self.token_ttl_s + 60
        ]
        if expired:
            await self.redis.hdel(KEYS, *expired)

    async def jwks(self) -> dict[str, Any]:
        """Returns the JWK Set: current, next and still-valid previous keys."""
        keys = []
        now = time.time()
        for record in await self.records():
            if record.state == "previous" and now - record.deactivated > self.token_ttl_s + 60:
                continue
            private = serialization.load_pem_private_key(
                self.secret.decrypt(record.private, record.kid.encode()), password=None
            )
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            numbers = private.public_key().public_numbers()
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
        return {"keys": keys}
