"""Edge authentication and authorization, all in Envoy's C++ filters.

Order in the filter chain (after the transcoder, so REST and gRPC requests
both carry their gRPC path):

1. identity headers sent by the client are removed (`header_mutation`);
2. `jwt_authn` verifies a JWT against the auth service's JWKS (fetched from
   the edge's own `/.well-known/jwks.json`, cached, refreshed in the
   background) and copies claims into the identity headers;
3. the key cache (gateway/key_cache.py, Lua) marks requests with a verified
   JWT, and sets the identity headers of an API key this Envoy worker saw
   verified within the revocation bound;
4. the JWT key check (`ext_authz`, open) asks the auth service whether a
   verified JWT's key and secret still stand, once per key and secret per
   Envoy worker within the bound (the key cache marks the requests to ask);
5. `ext_authz` (closed) runs only for requests the key cache did not mark: it
   asks the auth service about an API key, which answers with the same identity
   headers (and refuses a JWT whose key the check found revoked);
6. `rbac` allows each RPC only to callers holding its scope.

Both ext_authz filters call the auth service through their own cluster
(AUTH_CHECKS_CLUSTER). A valid JWT costs one Python call per key, Envoy worker
and 5 s, and keeps working while the auth service is down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import key_cache, static_site
from services.core import contract

# The identity headers are part of the mesh contract (services honour them only from the edge).
IDENTITY_HEADERS = contract.IDENTITY_HEADERS
# JWT claim -> identity header (the auth service issues exactly these claims).
CLAIM_HEADERS = {
    "sub": contract.KEY_ID_HEADER,
    "tenant": contract.TENANT_HEADER,
    "scope": contract.SCOPES_HEADER,
    "models": contract.MODELS_HEADER,
    "tier": contract.TIER_HEADER,
    "rpm": contract.RPM_HEADER,
    "tpm": contract.TPM_HEADER,
    "monthly": contract.MONTHLY_TOKENS_HEADER,
    "pins": contract.PINS_HEADER,
}
# The longest lifetime the auth service may give a JWT: the upper bound of
# TOKENMESH_AUTH_TOKEN_TTL_SECONDS (services/auth/service.py; a key's expiry only
# shortens it). An edge told the configured TTL (EdgeAuth.token_ttl_s) refuses
# longer-lived tokens.
LONGEST_TOKEN_TTL_S = 86400
# TOKENMESH_AUTH_TOKEN_TTL_SECONDS's default (services/auth/service.py).
DEFAULT_TOKEN_TTL_S = 900
# How far the edge's clock may differ from the auth service's for exp and nbf.
JWT_CLOCK_SKEW_S = 10
PUBLIC = "public"  # no credentials needed
AUTHENTICATED = "authenticated"  # any valid credential
# Every public RPC and the scope it needs ("admin" holds every scope).
RPC_SCOPES: Mapping[str, str] = {
    "/tokenmesh.auth.v1.AuthService/IssueToken": PUBLIC,
    "/tokenmesh.auth.v1.AuthService/GetJwks": PUBLIC,
    # gRPC load balancers and grpc_health_probe: service "" mirrors /healthz
    # (gateway/edge_health.py); a named service is a worker's answer.
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/tokenmesh.auth.v1.AuthService/CreateApiKey": "admin",
    "/tokenmesh.auth.v1.AuthService/ListApiKeys": "admin",
    "/tokenmesh.auth.v1.AuthService/GetApiKey": "admin",
    "/tokenmesh.auth.v1.AuthService/RevokeApiKey": "admin",
    "/tokenmesh.auth.v1.AuthService/RotateApiKey": "admin",
    "/tokenmesh.auth.v1.AuthService/RotateSigningKey": "admin",
    "/tokenmesh.auth.v1.AuthService/ListSigningKeys": "admin",
    "/tokenmesh.inference.v1.InferenceService/ListModels": "models:read",
    "/tokenmesh.inference.v1.InferenceService/GetModel": "models:read",
    "/tokenmesh.inference.v1.InferenceService/Generate": "inference:generate",
    "/tokenmesh.inference.v1.InferenceService/Complete": "inference:generate",
    "/tokenmesh.inference.v1.InferenceService/Embed": "inference:embed",
    "/tokenmesh.inference.v2.InferenceService/ListModels": "models:read",
    "/tokenmesh.inference.v2.InferenceService/GetModel": "models:read",
    "/tokenmesh.inference.v2.InferenceService/Generate": "inference:generate",
    "/tokenmesh.inference.v2.InferenceService/Complete": "inference:generate",
    "/tokenmesh.inference.v2.InferenceService/Embed": "inference:embed",
    "/tokenmesh.openai.v1.OpenAIService/ListModels": "models:read",
    "/tokenmesh.openai.v1.OpenAIService/GetModel": "models:read",
    "/tokenmesh.openai.v1.OpenAIService/CreateChatCompletion": "inference:generate",
    "/tokenmesh.openai.v1.OpenAIService/CreateCompletion": "inference:generate",
    "/tokenmesh.openai.v1.OpenAIService/CreateEmbedding": "inference:embed",
    "/tokenmesh.router.v1.RouterService/ListCatalogModels": "models:read",
    "/tokenmesh.router.v1.RouterService/GetCatalogModel": "models:read",
    "/tokenmesh.router.v1.RouterService/RegisterModelVersion": "admin",
    "/tokenmesh.router.v1.RouterService/SetTrafficSplit": "admin",
    "/tokenmesh.router.v1.RouterService/PinModelVersion": "admin",
    "/tokenmesh.router.v1.RouterService/DeprecateModelVersion": "admin",
    "/tokenmesh.router.v1.RouterService/SetFallbackModel": "admin",
    "/tokenmesh.router.v1.RouterService/SetModelWorkerPools": "admin",
    "/tokenmesh.router.v1.RouterService/SetModelAlias": "admin",
    "/tokenmesh.router.v1.RouterService/SetModelPrice": "admin",
    "/tokenmesh.router.v1.RouterService/StartRollout": "admin",
    "/tokenmesh.router.v1.RouterService/GetRollout": "admin",
    "/tokenmesh.router.v1.RouterService/PauseRollout": "admin",
    "/tokenmesh.router.v1.RouterService/ResumeRollout": "admin",
    "/tokenmesh.router.v1.RouterService/AbortRollout": "admin",
    "/tokenmesh.router.v1.RouterService/SetShadowTraffic": "admin",
    "/tokenmesh.router.v1.RouterService/CompareModelVersions": "admin",
    "/tokenmesh.router.v1.RouterService/ListPromptTemplates": "models:read",
    "/tokenmesh.router.v1.RouterService/GetPromptTemplate": "models:read",
    "/tokenmesh.router.v1.RouterService/CreatePromptTemplate": "admin",
    "/tokenmesh.router.v1.RouterService/SetPromptTemplateAlias": "admin",
    # Content policies and redacted samples: admin only (samples hold request text).
    **{
        f"/tokenmesh.router.v1.RouterService/{rpc}": "admin"
        for rpc in (
            "CreatePolicy",
            "GetPolicy",
            "ListPolicies",
            "AttachPolicy",
            "DetachPolicy",
            "SetSampleSettings",
            "ExportSamples",
        )
    },
    "/tokenmesh.usage.v1.UsageService/GetUsage": "usage:read",
    "/tokenmesh.usage.v1.UsageService/ListAuditEntries": "admin",
    "/tokenmesh.usage.v2.UsageService/GetUsage": "usage:read",
    # Jobs: the `jobs` scope opens the API; each item also needs its own RPC's
    # scope (checked at submission, and by the worker for the jobs identity).
    **{
        f"/tokenmesh.jobs.v1.JobsService/{rpc}": "jobs"
        for rpc in (
            "CreateJob",
            "GetJob",
            "ListJobs",
            "CancelJob",
            "ListJobResults",
            "DownloadJobResults",
            "WatchJob",
            "RedeliverWebhook",
            "CreateWebhookSecret",
            "RotateWebhookSecret",
        )
    },
    # OpenAI's files and batches are jobs; `Prefer: respond-async` creates one.
    **{
        f"/tokenmesh.openai.v1.OpenAIBatchService/{rpc}": "jobs"
        for rpc in (
            "CreateFile",
            "GetFile",
            "GetFileContent",
            "ListFiles",
            "DeleteFile",
            "CreateBatch",
            "GetBatch",
            "CancelBatch",
            "ListBatches",
        )
    },
    "/tokenmesh.jobs.v1.HandoverService/CompleteV2": "jobs",
    "/tokenmesh.jobs.v1.HandoverService/CompleteV1": "jobs",
}
# Static files the edge answers itself (the playground): no credential needed.
PUBLIC_PATHS: tuple[str, ...] = static_site.PATHS
# Reflection needs a valid credential, but no particular scope.
AUTHENTICATED_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
JWT_FILTER = "envoy.filters.http.jwt_authn"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
# The auth service again, for the edge's own callouts only (both ext_authz filters):
# on the cluster clients' auth requests use (IssueToken is public, its bodies may be
# slow), those requests could fill Envoy's per-cluster request limits, and every
# check then failed: API keys closed (503 for every caller), JWT key checks open.
AUTH_CHECKS_CLUSTER = "auth-checks"
JWT_KEY_CHECK_STATS = "jwt_key_check"


@dataclass(frozen=True)
class EdgeAuth:
    """EdgeAuth is what the edge must agree on with the auth service."""

    issuer: str = "https://tokenmesh.local/auth"
    audience: str = "tokenmesh"
    jwks_cache_s: float = 300.0
    # Per-key request rate limits (the usage service's RateLimitService).
    ratelimit: bool = True
    # Whether requests are refused while the rate limiter is unreachable.
    ratelimit_failure_mode_deny: bool = False
    # Reuse an allowed API key's identity per Envoy worker within the revocation
    # bound (gateway/key_cache.py); off: every API-key request asks the auth service.
    api_key_cache: bool = True
    # The auth service's TOKENMESH_AUTH_TOKEN_TTL_SECONDS (the launcher passes it to
    # the auth service): a JWT living longer is refused. Verified JWTs are cached
    # until they expire, even once their signing key left the JWKS: a token minted
    # with a stolen key and a day's lifetime kept working a day after the key was
    # retired (every edge allowed any TTL the auth service could be set to); now
    # at most this long.
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S


def _type(name: str) -> str:
    return f"type.googleapis.com/envoy.{name}"


def strip_headers_filter(names: Sequence[str]) -> dict[str, Any]:
    """Removes client-sent copies of headers only the edge may set (identity, routing)."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _type("extensions.filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": {"request_mutations": [{"remove": name} for name in names]},
        },
    }


def jwt_filter(auth: EdgeAuth, listen_port: int) -> dict[str, Any]:
    """Verifies JWTs in C++; a missing or failed JWT falls through to ext_authz."""
    public = [*(path for path, scope in RPC_SCOPES.items() if scope == PUBLIC), *PUBLIC_PATHS]
    provider = {
        "issuer": auth.issuer,
        "audiences": [auth.audience],
        "remote_jwks": {
            "http_uri": {
                "uri": f"http://127.0.0.1:{listen_port}/.well-known/jwks.json",
                "cluster": "jwks",
                "timeout": "2s",
            },
            # Refreshed in the background shortly before it expires; while the
            # auth service is down the cached JWKS keeps verifying until then.
            # Rotations need no refetch: the JWKS pre-publishes the next key.
            "cache_duration": f"{auth.jwks_cache_s:g}s",
            "async_fetch": {"fast_listener": True, "failed_refetch_duration": "1s"},
        },
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": True,  # upstreams that authorize for themselves (auth admin RPCs) see the token
        "payload_in_metadata": "jwt_payload",
        "clock_skew_seconds": JWT_CLOCK_SKEW_S,
        # A token without `exp` (the auth service always sets one) would be valid
        # forever: refused. A longer remaining lifetime than the auth service can
        # issue is refused too; the skew allowance makes this refuse only tokens
        # whose `nbf` check would already refuse them when new (issuing clock
        # more than the skew ahead).
        "require_expiration": True,
        "max_lifetime": f"{auth.token_ttl_s + JWT_CLOCK_SKEW_S}s",
        # Verified tokens are cached: a client reusing its JWT costs one
        # signature check, not one per request.
        "jwt_cache_config": {"jwt_cache_size": 10000},
        "claim_to_headers": [{"header_name": h, "claim_name": c} for c, h in CLAIM_HEADERS.items()],
    }
    rules: list[dict[str, Any]] = [{"match": {"path": path}} for path in public]
    rules.append(
        {
            "match": {"prefix": "/"},
            "requires": {
                "requires_any": {
                    "requirements": [
                        {"provider_name": "tokenmesh"},
                        {"allow_missing_or_failed": {}},
                    ]
                }
            },
        }
    )
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": _type("extensions.filters.http.jwt_authn.v3.JwtAuthentication"),
            "providers": {"tokenmesh": provider},
            "rules": rules,
        },
    }


def ext_authz_filter(key_cache_on: bool = True) -> dict[str, Any]:
    """Asks the auth service about API keys, only when no JWT was verified (and, with
    the key cache, the key was not verified on this Envoy worker recently)."""
    only_when_no_jwt = {
        "filter": JWT_FILTER,
        "path": [{"key": "jwt_payload"}],
        "value": {"present_match": True},
        "invert": True,
    }
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": {
            "@type": _type("extensions.filters.http.ext_authz.v3.ExtAuthz"),
            "grpc_service": {"envoy_grpc": {"cluster_name": AUTH_CHECKS_CLUSTER}, "timeout": "2s"},
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "filter_enabled_metadata": (
                key_cache.ext_authz_enabled_metadata() if key_cache_on else only_when_no_jwt
            ),
        },
    }


def jwt_key_check_filter() -> dict[str, Any]:
    """Asks the auth service whether a verified JWT's key still stands (not revoked, its
    secret not rotated out), once per key and secret per Envoy worker thread within
    the revocation bound (gateway/key_cache.py marks the requests to ask about).

    Open when the auth service cannot answer (down, or slower than the timeout): a
    JWT keeps working through an auth outage, as the JWKS cache lets it; only the
    service's "no" refuses it, and the key cache keeps that "no": the key's later
    requests go to the API-key ext_authz, which is closed. It is sent jwt_authn's
    verified payload and the key id header, not the token. Its counters are
    `http.<listener>.ext_authz.jwt_key_check.*` (`failure_mode_allowed`: let
    through unchecked, alert TokenmeshJwtKeyChecksFailingOpen).
    """
    return {
        "name": key_cache.JWT_KEY_CHECK_FILTER,
        "typed_config": {
            "@type": _type("extensions.filters.http.ext_authz.v3.ExtAuthz"),
            "grpc_service": {"envoy_grpc": {"cluster_name": AUTH_CHECKS_CLUSTER}, "timeout": "1s"},
            "transport_api_version": "V3",
            "failure_mode_allow": True,
            "stat_prefix": JWT_KEY_CHECK_STATS,
            "metadata_context_namespaces": [JWT_FILTER],
            "allowed_headers": {"patterns": [{"exact": contract.KEY_ID_HEADER}]},
            "filter_enabled_metadata": key_cache.jwt_check_enabled_metadata(),
        },
    }


def ext_authz_disabled() -> dict[str, Any]:
    """Per-route config that turns ext_authz off (public RPCs)."""
    return {
        EXT_AUTHZ_FILTER: {
            "@type": _type("extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"),
            "disabled": True,
        }
    }


def _scope_principal(scope: str) -> dict[str, Any]:
    regex = f"(^|.* ){re.escape(scope)}( .*|$)"
    return {
        "header": {"name": contract.SCOPES_HEADER, "string_match": {"safe_regex": {"regex": regex}}}
    }


def _paths(paths: list[str]) -> dict[str, Any]:
    return {"or_rules": {"rules": [{"url_path": {"path": {"exact": p}}} for p in paths]}}


def rbac_filter() -> dict[str, Any]:
    """Allows each RPC only to callers with its scope; everything else is 403."""
    policies: dict[str, Any] = {
        PUBLIC: {
            "permissions": [
                _paths([*(p for p, s in RPC_SCOPES.items() if s == PUBLIC), *PUBLIC_PATHS])
            ],
            "principals": [{"any": True}],
        },
        "admin": {"permissions": [{"any": True}], "principals": [_scope_principal("admin")]},
        AUTHENTICATED: {
            "permissions": [
                {
                    "or_rules": {
                        "rules": [
                            {"url_path": {"path": {"prefix": p}}} for p in AUTHENTICATED_PREFIXES
                        ]
                    }
                }
            ],
            "principals": [{"header": {"name": contract.KEY_ID_HEADER, "present_match": True}}],
        },
    }
    for scope in sorted({s for s in RPC_SCOPES.values() if s not in (PUBLIC, "admin")}):
        policies[f"scope:{scope}"] = {
            "permissions": [_paths([p for p, s in RPC_SCOPES.items() if s == scope])],
            "principals": [_scope_principal(scope)],
        }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _type("extensions.filters.http.rbac.v3.RBAC"),
            "rules": {"action": "ALLOW", "policies": policies},
        },
    }


# Public RPCs served by another cluster than auth.
PUBLIC_RPC_CLUSTERS: Mapping[str, str] = {"/grpc.health.v1.Health/Check": "inference"}


def public_routes() -> list[dict[str, Any]]:
    """Exact routes for public RPCs (to the auth service, unless named above) and the
    static files the edge serves, ext_authz and the key cache off."""
    rpcs = [
        {
            "match": {"path": path},
            "route": {"cluster": PUBLIC_RPC_CLUSTERS.get(path, "auth"), "timeout": "10s"},
            "typed_per_filter_config": {**ext_authz_disabled(), **key_cache.disabled()},
        }
        for path, scope in RPC_SCOPES.items()
        if scope == PUBLIC
    ]
    files = [
        {
            **r,
            "typed_per_filter_config": {
                **r["typed_per_filter_config"],
                **ext_authz_disabled(),
                **key_cache.disabled(),
            },
        }
        for r in static_site.routes()
    ]
    return [*files, *rpcs]


def ratelimit_filter(failure_mode_deny: bool) -> dict[str, Any]:
    """Asks the usage service's RateLimitService about each authenticated request.

    Draft-03 `x-ratelimit-*` headers go on every answer; an unreachable
    limiter lets requests through unless `failure_mode_deny`.
    """
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": _type("extensions.filters.http.ratelimit.v3.RateLimit"),
            "domain": "tokenmesh",
            "timeout": "0.25s",
            "failure_mode_deny": failure_mode_deny,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limited_as_resource_exhausted": True,
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "usage"}},
            },
        },
    }


def rate_limits() -> list[dict[str, Any]]:
    """The per-key descriptor (key id + its limit); absent for anonymous requests."""
    return [
        {
            "actions": [
                {
                    "request_headers": {
                        "header_name": contract.KEY_ID_HEADER,
                        "descriptor_key": "key_id",
                    }
                },
                *(
                    {
                        "request_headers": {
                            "header_name": header,
                            "descriptor_key": key,
                            "skip_if_absent": True,
                        }
                    }
                    for header, key in (
                        (contract.RPM_HEADER, "rpm"),
                        (contract.TIER_HEADER, "tier"),
                        (contract.TENANT_HEADER, "tenant"),
                        # Set by the model-routing Lua filter, which runs first.
                        ("x-tokenmesh-model", "model"),
                    )
                ),
            ]
        }
    ]
