"""Whether a job's owner may still spend: its API key's record, where the auth service keeps it.

A job runs as the key that submitted it (services/jobs/execution.py); the
workers take the identity the edge vouched for at submission and do not ask
the auth service again. So the runner asks here before an item starts, and
for the jobs whose items it runs, every watch round: a key that was revoked
(or expired) stops its jobs (`JobStore.stop`, reason KEY_REVOKED or
KEY_EXPIRED), as the edge refuses the key's own requests.

The record is the auth service's (`tm:auth:key:<id>`, an ApiKey protobuf in
the same AOF Redis, named by services/auth/keys.py's `key_record_name`: not
built again here, so the two never drift apart), read and never written: no RPC
to the auth service per item, and jobs keep running while it restarts. A
verdict is kept `ttl_s` (2 s, the auth service's own cache): with the
runner's watch round (0.5 s) a revoked key's calls are cut within the 5 s
revocation bound the edge keeps (services/auth/authenticator.py).

A key id with no record is not stopped: no key record is ever deleted, so
that is an identity the key store does not hold (the tests' made-up keys),
which nothing could revoke either. An id the auth service never mints
(contract.API_KEY_ID) is not looked up at all: the jobs Redis user may read
the key records only (services/core/redis_acl.py), not the sets of secret
digests named `tm:auth:key:<id>:secrets` beside them.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import redis.asyncio as aioredis

from services.auth import keys as auth_keys
from services.core import contract
from services.jobs.store import KEY_EXPIRED, KEY_REVOKED
from tokenmesh.auth.v1 import auth_pb2

# How long a verdict is kept (what the auth service caches a key for).
CACHE_TTL_S = 2.0
# The most verdicts kept; when full the cache starts over (a refill is one read a key).
MAX_ENTRIES = 10_000
# A key's effective state -> why its jobs stop.
STOP_REASONS = {
    auth_pb2.API_KEY_STATE_REVOKED: KEY_REVOKED,
    auth_pb2.API_KEY_STATE_EXPIRED: KEY_EXPIRED,
}


def stop_reason_of(raw: bytes | None, now: float) -> str:
    """Returns why a key's jobs must stop, from its stored record ("" when they may run:
    the key is active, or has no record)."""
    if raw is None:
        return ""
    key = auth_pb2.ApiKey.FromString(raw)
    return STOP_REASONS.get(auth_keys.key_state(key, now), "")


class KeyStatus:
    """KeyStatus tells whether keys may still spend, from a cache of `ttl_s`.

    Args:
        client: the Redis holding the auth service's key records.
        ttl_s: how long a verdict is reused.
    """

    def __init__(self, client: aioredis.Redis, ttl_s: float = CACHE_TTL_S) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._verdicts: dict[str, tuple[float, str]] = {}  # key id -> (read at, reason)

    async def stop_reason(self, key_id: str) -> str:
        """Returns why a key's jobs must stop ("" when they may run)."""
        return (await self.stop_reasons([key_id]))[key_id]

    async def stop_reasons(self, key_ids: Collection[str]) -> dict[str, str]:
        """Returns why each key's jobs must stop ("" when they may run); the keys whose
        verdict is older than `ttl_s` are read again, in one round trip."""
        now = time.monotonic()
        reasons: dict[str, str] = {}
        stale: list[str] = []
        for key_id in set(key_ids):
            verdict = self._verdicts.get(key_id)
            if verdict is not None and now - verdict[0] < self.ttl_s:
                reasons[key_id] = verdict[1]
            elif contract.is_api_key_id(key_id):
                stale.append(key_id)
            else:
                reasons[key_id] = ""  # no such record can exist
        if stale:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in stale:
                    pipe.get(auth_keys.key_record_name(key_id))
                records = await pipe.execute()
            if len(self._verdicts) + len(stale) > MAX_ENTRIES:
                self._verdicts.clear()
            wall = time.time()
            for key_id, raw in zip(stale, records, strict=True):
                reasons[key_id] = stop_reason_of(raw, wall)
                self._verdicts[key_id] = (now, reasons[key_id])
        return reasons
