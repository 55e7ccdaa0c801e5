"""AuthService servicer: API keys, tokens, signing keys and the JWKS."""

from __future__ import annotations

import json
from collections.abc import Mapping

from google.api import httpbody_pb2

from services.auth.authenticator import ASCII_SPACE, Authenticator
from services.auth.crypto import looks_like_api_key
from services.auth.keys import SCOPES, ApiKeyStore, Principal
from services.auth.signing import SigningKeyRing
from services.auth.tokens import TokenIssuer
from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument, PermissionDenied, Unauthenticated
from services.core.interceptors import Context, request_headers
from services.core.time_fields import duration_seconds
from tokenmesh.auth.v1 import auth_service_pb2 as pb
from tokenmesh.auth.v1 import auth_service_pb2_grpc

MAX_OVERLAP_S = 7 * 24 * 3600
MAX_TTL_S = 100 * 366 * 24 * 3600  # a key's expiry stays a valid Timestamp


def request_source(context: Context, headers: Mapping[str, str]) -> str:
    """Returns the caller's address: the client's, when the edge forwarded it."""
    # Set by the edge (use_remote_address); direct callers are internal.
    return headers.get("x-envoy-external-address", "") or context.peer()


def _validate_create(request: pb.CreateApiKeyRequest) -> None:
    out: list[FieldViolation] = []
    if not contract.is_tenant(request.tenant):
        out.append(FieldViolation("tenant", f"must be {contract.TENANT_RULE}"))
    elif contract.is_reserved_tenant(request.tenant):
        # The mesh's own accounts: shadow copies are metered to tokenmesh.shadow with
        # every tenant's request tags (a key of it, usage:read, read them all), and
        # rollout decisions are audited as tokenmesh.system (a key's requests mixed in).
        out.append(
            FieldViolation("tenant", f"{contract.RESERVED_TENANT_PREFIX}* tenants are reserved")
        )
    if len(request.name) > 128:
        out.append(FieldViolation("name", "must be at most 128 characters"))
    if not request.scopes:
        out.append(FieldViolation("scopes", f"needs at least one of {', '.join(SCOPES)}"))
    for i, scope in enumerate(request.scopes):
        if scope not in SCOPES:
            out.append(
                FieldViolation(f"scopes[{i}]", f"{scope!r} is not one of {', '.join(SCOPES)}")
            )
    for i, model in enumerate(request.allowed_models):
        if not contract.is_model_name(model):
            out.append(
                FieldViolation(f"allowed_models[{i}]", f"must be {contract.MODEL_NAME_RULE}")
            )
    for model, version in request.pinned_versions.items():
        if not contract.is_model_name(model):
            out.append(
                FieldViolation(
                    f"pinned_versions[{model}]", f"key must be {contract.MODEL_NAME_RULE}"
                )
            )
        elif not contract.is_model_version(version):
            out.append(
                FieldViolation(
                    f"pinned_versions[{model}]", f"must be {contract.MODEL_VERSION_RULE}"
                )
            )
    limits = request.limits
    if limits.priority_tier and not contract.is_priority_tier(limits.priority_tier):
        # It becomes a header value and a JWT claim, a name in per-tier settings.
        out.append(FieldViolation("limits.priority_tier", f"must be {contract.TENANT_RULE}"))
    for name in ("requests_per_minute", "tokens_per_minute", "monthly_tokens"):
        if getattr(limits, name) < 0:
            out.append(FieldViolation(f"limits.{name}", "must be >= 0"))
    if request.HasField("ttl") and not 0 < duration_seconds(request.ttl, "ttl") <= MAX_TTL_S:
        out.append(FieldViolation("ttl", "must be positive and at most 100 years when set"))
    if out:
        raise InvalidArgument(out)


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """AuthServicer implements tokenmesh.auth.v1.AuthService."""

    def __init__(
        self,
        keys: ApiKeyStore,
        ring: SigningKeyRing,
        tokens: TokenIssuer,
        authenticator: Authenticator,
        default_overlap_s: float,
    ) -> None:
        self.keys = keys
        self.ring = ring
        self.tokens = tokens
        self.authenticator = authenticator
        self.default_overlap_s = default_overlap_s

    async def _admin(self, context: Context) -> Principal:
        headers = request_headers(context)
        principal = await self.authenticator.require(
            headers, request_source(context, headers), "admin"
        )
        # Through the edge (the only caller whose x-tokenmesh-* headers a service
        # takes), the key it authorized: the edge prefers a verified JWT, this service
        # an x-api-key, and a call carrying both ran as another key than the one the
        # edge saw ("a key cannot revoke itself" judged on the other).
        vouched = headers.get(contract.KEY_ID_HEADER)
        if vouched is not None and vouched != principal.key_id:
            raise Unauthenticated(
                "the request carries two credentials of different keys: send one",
                reason="CONFLICTING_CREDENTIALS",
            )
        return principal

    async def IssueToken(
        self, request: pb.IssueTokenRequest, context: Context
    ) -> pb.IssueTokenResponse:
        headers = request_headers(context)
        source = request_source(context, headers)
        api_key = request.api_key.strip(ASCII_SPACE)  # as every credential is
        if not looks_like_api_key(api_key):
            # Refused as any failure is: 429 once its source failed too often.
            self.authenticator.refuse(source)
        principal = await self.authenticator.authenticate(
            {"x-api-key": api_key}, source, fresh=True
        )
        token, expires_in = await self.tokens.issue(principal)
        return pb.IssueTokenResponse(access_token=token, token_type="Bearer", expires_in=expires_in)

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> httpbody_pb2.HttpBody:
        body = json.dumps(await self.ring.jwks()).encode()
        return httpbody_pb2.HttpBody(content_type="application/json", data=body)

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        await self._admin(context)
        _validate_create(request)
        ttl = duration_seconds(request.ttl, "ttl") if request.HasField("ttl") else None
        key, secret = await self.keys.create(
            request.tenant,
            request.name,
            request.scopes,
            request.allowed_models,
            request.limits,
            ttl,
            request.pinned_versions,
        )
        return pb.CreateApiKeyResponse(api_key=key, secret=secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        await self._admin(context)
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument([FieldViolation("page_size", "must be between 0 and 1000")])
        keys, next_token = await self.keys.list(
            request.tenant, request.page_size or 100, request.page_token
        )
        return pb.ListApiKeysResponse(api_keys=keys, next_page_token=next_token)

    async def GetApiKey(
        self, request: pb.GetApiKeyRequest, context: Context
    ) -> pb.GetApiKeyResponse:
        await self._admin(context)
        key = await self.keys.get(_key_id(request.id))
        for ends_at in await self.keys.rotated_secret_ends(key):
            key.rotated_secret_expire_times.add().FromNanoseconds(int(ends_at * 1e9))
        return pb.GetApiKeyResponse(api_key=key)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        principal = await self._admin(context)
        if _key_id(request.id) == principal.key_id:
            raise PermissionDenied("a key cannot revoke itself", reason="SELF_REVOCATION")
        return pb.RevokeApiKeyResponse(api_key=await self.keys.revoke(_key_id(request.id)))

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: Context
    ) -> pb.RotateApiKeyResponse:
        await self._admin(context)
        overlap = (
            duration_seconds(request.overlap, "overlap")
            if request.HasField("overlap")
            else self.default_overlap_s
        )
        if not 0 <= overlap <= MAX_OVERLAP_S:
            raise InvalidArgument([FieldViolation("overlap", "must be between 0 and 7 days")])
        key, secret, expires_at = await self.keys.rotate(_key_id(request.id), overlap)
        response = pb.RotateApiKeyResponse(api_key=key, secret=secret)
        response.old_secret_expire_time.FromNanoseconds(int(expires_at * 1e9))
        return response

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: Context
    ) -> pb.RotateSigningKeyResponse:
        await self._admin(context)
        record = await self.ring.rotate()
        return pb.RotateSigningKeyResponse(signing_key=record.to_pb())

    async def ListSigningKeys(
        self, request: pb.ListSigningKeysRequest, context: Context
    ) -> pb.ListSigningKeysResponse:
        await self._admin(context)
        records = [r for r in await self.ring.records() if r.state != "next"]
        return pb.ListSigningKeysResponse(signing_keys=[r.to_pb() for r in records])


def _key_id(key_id: str) -> str:
    """Returns a request's key id, checked against how ids are minted: the id is part
    of Redis key names, and `key_x:secrets` named a key's secrets set (INTERNAL)."""
    if not contract.is_api_key_id(key_id):
        raise InvalidArgument([FieldViolation("id", f"must be {contract.API_KEY_ID_RULE}")])
    return key_id
