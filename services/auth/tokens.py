"""Short-lived JWTs: issued for API keys, verified with the published JWKS."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from gateway.edge_auth import JWT_CLOCK_SKEW_S
from services.auth.keys import Principal
from services.auth.signing import ALGORITHM, SigningKeyRing
from services.core.errors import Unauthenticated


class TokenIssuer:
    """TokenIssuer signs and verifies the mesh's access tokens.

    Claims: iss, aud, sub (key id), tenant, scope (space-separated), models
    (comma-separated; empty allows all), tier, rpm, tpm, monthly, pins
    ("model=version,..."), iat, nbf, exp, jti; header kid.
    Lists are strings so the edge can copy them into headers unchanged.
    """

    def __init__(self, ring: SigningKeyRing, issuer: str, audience: str, ttl_s: int) -> None:
        self.ring = ring
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s

    async def issue(self, principal: Principal) -> tuple[str, int]:
        """Returns a signed JWT for `principal` and its lifetime in seconds.

        It expires after `ttl_s`, or sooner when the principal's credential
        ends (a rotated-out secret's overlap, the key's expiry): then the edge
        stops taking it by that end. Raises Unauthenticated, as for an ended
        credential, when that leaves the token no lifetime.
        """
        kid, key = await self.ring.current()
        now = int(time.time())
        exp = now + self.ttl_s
        if principal.expires_at:
            exp = min(exp, _last_exp(principal.expires_at))
            if exp <= now:
                raise _credential_ended()
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": principal.key_id,
            "tenant": principal.tenant,
            "scope": " ".join(principal.scopes),
            "models": ",".join(principal.models),
            "tier": principal.tier,
            "rpm": principal.rpm,
            "tpm": principal.tpm,
            "monthly": principal.monthly,
            "pins": principal.pins,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        if principal.secret_id:
            claims["sid"] = principal.secret_id
        return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid}), exp - now

    async def verify(self, token: str) -> Principal | None:
        """Returns the principal of a valid token, else None (any failure)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            jwks = await self.ring.jwks()
            jwk = next((k for k in jwks["keys"] if k["kid"] == kid), None)
            if jwk is None:
                return None
            public = jwt.PyJWK(jwk).key
            claims: dict[str, Any] = jwt.decode(
                token,
                public,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                # As the edge takes them: a token another replica minted, its clock
                # a second ahead, was refused (nbf, iat in the future) for that long.
                leeway=JWT_CLOCK_SKEW_S,
                options={"require": ["exp", "nbf", "iat", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        models = tuple(m for m in str(claims.get("models", "")).split(",") if m)
        return Principal(
            str(claims["sub"]),
            str(claims.get("tenant", "")),
            tuple(str(claims.get("scope", "")).split()),
            models,
            str(claims.get("tier", "")),
            int(claims.get("rpm", 0) or 0),
            int(claims.get("tpm", 0) or 0),
            int(claims.get("monthly", 0) or 0),
            str(claims.get("pins", "")),
            secret_id=str(claims.get("sid", "")),
        )


def _last_exp(ends_at: float) -> int:
    """Returns the latest `exp` whose token the edge refuses from `ends_at` on.

    Envoy's jwt_authn takes a token while `now <= exp + JWT_CLOCK_SKEW_S`, with
    `now` in whole seconds (truncated): through the end of that second. With
    `exp` at the credential's end, a token for a rotated-out secret or an
    expiring key worked at the edge 10 s (up to 11 s) past it.
    """
    return int(ends_at) - JWT_CLOCK_SKEW_S - 1


def _credential_ended() -> Unauthenticated:
    """Returns the answer for a credential too close to its end to mint a token: the
    one every bad credential gets (authenticator.unauthenticated)."""
    # Imported here: the authenticator module imports this one.
    from services.auth.authenticator import unauthenticated

    return unauthenticated()
