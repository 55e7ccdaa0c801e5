"""Turns a request's credentials (API key or JWT) into a Principal.

Used by the ext_authz check (API keys at the edge) and by the auth service's
own admin RPCs, which never trust identity headers a caller could forge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import NoReturn

from services.auth.crypto import looks_like_api_key
from services.auth.failures import FailureLimiter
from services.auth.keys import ApiKeyStore, Principal
from services.auth.tokens import TokenIssuer
from services.core import contract
from services.core.errors import ResourceExhausted, Unauthenticated, missing_scope

# A revoked (or expired) key is refused everywhere within this many seconds.
REVOCATION_BOUND_S = 5.0
# Cached API-key lookups expire quickly so a revocation reaches the edge within the
# bound: the edge's key cache (gateway/key_cache.py) may keep what is left of it.
CACHE_TTL_S = 2.0
TOUCH_INTERVAL_S = 60.0


# What the edge's key cache trims (Lua's %s): str.strip() also took Unicode spaces,
# so `key + "\u00a0"` verified as the key while the edge cached it apart, and one
# key could fill every Envoy thread's cache with spellings of itself.
ASCII_SPACE = " \t\n\v\f\r"


def credential(headers: Mapping[str, str]) -> str:
    """Returns the credential a request carries: x-api-key, else the bearer token."""
    api_key = headers.get("x-api-key", "").strip(ASCII_SPACE)
    if api_key:
        return api_key
    authorization = headers.get("authorization", "").strip(ASCII_SPACE)
    scheme, _, token = authorization.partition(" ")
    return token.strip(ASCII_SPACE) if scheme.lower() == "bearer" else ""


def _left_s(principal: Principal) -> float:
    """Returns how long the principal's credential still works (seconds; inf: no end)."""
    return principal.expires_at - time.time() if principal.expires_at else math.inf


def unauthenticated() -> Unauthenticated:
    """Returns the one answer for every bad credential (unknown, revoked, malformed)."""
    return Unauthenticated("missing or invalid credentials", reason=contract.INVALID_CREDENTIALS)


class Authenticator:
    """Authenticator verifies credentials, with a short cache and failure limiting."""

    def __init__(self, keys: ApiKeyStore, tokens: TokenIssuer, limiter: FailureLimiter) -> None:
        self.keys = keys
        self.tokens = tokens
        self.limiter = limiter
        # secret hash -> (read from Redis at, reusable until: monotonic seconds, principal)
        self._cache: dict[str, tuple[float, float, Principal]] = {}
        self._touched: dict[str, float] = {}

    async def authenticate(
        self,
        headers: Mapping[str, str],
        source: str,
        *,
        allow_jwt: bool = True,
        fresh: bool = False,
    ) -> Principal:
        """Returns the caller; raises Unauthenticated (or ResourceExhausted when guessing).

        Only failures are throttled: a valid credential is accepted even from
        a source over its failure limit, so one misbehaving client behind a
        shared NAT or proxy cannot lock everyone there out. NOTE: guessing
        stays hopeless (API keys carry 256 random bits); the limit bounds
        what a flood of bad credentials costs and tells a broken client so.

        The edge's ext_authz passes allow_jwt=False: a JWT that Envoy's
        jwt_authn did not accept must not get a second opinion here.

        fresh=True reads an API key from Redis even when a verdict is cached:
        IssueToken mints a JWT from it that lives on after a revocation or a
        rotation, so it must not go by a verdict from before either.

        A JWT (the auth service's own admin RPCs: allow_jwt) counts only while
        the key it was issued for (`sub`) is still active, read from Redis on
        every call, not from the cache: its signature and claims stay valid
        until it expires, after a revocation too.
        """
        token = credential(headers)
        principal = (
            await self._verify(token, fresh)
            if token and (allow_jwt or looks_like_api_key(token))
            else None
        )
        if principal is not None:
            return principal
        self.refuse(source)

    def refuse(self, source: str) -> NoReturn:
        """Refuses a failed authentication from `source`: RESOURCE_EXHAUSTED while it
        is over its failures, else UNAUTHENTICATED, counted."""
        retry_after = self.limiter.retry_after(source)
        if retry_after is not None:
            raise ResourceExhausted(
                "too many failed authentication attempts",
                retry_after_s=retry_after,
                reason=contract.AUTH_FAILURES_RATE_LIMITED,
            )
        self.limiter.record(source)
        raise unauthenticated()

    async def _verify(self, token: str, fresh: bool = False) -> Principal | None:
        if not looks_like_api_key(token):
            principal = await self.tokens.verify(token)
            if principal is None or not await self.token_key_stands(
                principal.key_id, principal.secret_id
            ):
                return None
            return principal
        digest = self.keys.secret.hash_api_key(token)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now and not fresh:
            return cached[2]
        found = await self.keys.lookup(token)
        if found is None:
            self._cache.pop(digest, None)
            return None
        key, secret_ends_at = found
        if now - self._touched.get(key.id, 0.0) > TOUCH_INTERVAL_S:
            self._touched[key.id] = now
            await self.keys.touch(key)
        principal = Principal.from_key(key, secret_ends_at, digest)
        if len(self._cache) > 10_000:
            self._cache.clear()
        # Never reused past the credential's end (a rotated-out secret's overlap,
        # the key's expiry): the cached verdict would outlive what it says is alive.
        until = now + min(CACHE_TTL_S, _left_s(principal))
        self._cache[digest] = (now, until, principal)
        return principal

    async def token_key_stands(self, key_id: str, secret_id: str) -> bool:
        """Tells whether a JWT of key `key_id`, minted from its secret `secret_id` ("":
        a token from before secret ids), still counts: the key is active and, minted
        from a secret a rotation ended (`--overlap 0` after a leak), the token made
        admin calls until its exp (a new admin key of its own, say). Read from Redis."""
        if not await self.keys.is_active(key_id):
            return False
        return not secret_id or await self.keys.secret_works(key_id, secret_id)

    def edge_cache_s(self, headers: Mapping[str, str]) -> float:
        """Returns how long the edge may reuse the verdict on this request's API key.

        That is what is left of REVOCATION_BOUND_S since the key was last read
        from Redis (the entry `authenticate` just used), and never past the
        credential's end (a rotated-out secret's overlap, the key's expiry);
        0 for anything else.
        """
        token = credential(headers)
        if not looks_like_api_key(token):
            return 0.0
        cached = self._cache.get(self.keys.secret.hash_api_key(token))
        if cached is None:
            return 0.0
        verified_at, _, principal = cached
        bound = REVOCATION_BOUND_S - (time.monotonic() - verified_at)
        return max(0.0, min(bound, _left_s(principal)))

    async def require(self, headers: Mapping[str, str], source: str, scope: str) -> Principal:
        """Authenticates and checks one scope (PERMISSION_DENIED when missing)."""
        principal = await self.authenticate(headers, source)
        if not principal.has_scope(scope):
            raise missing_scope(scope)
        return principal
