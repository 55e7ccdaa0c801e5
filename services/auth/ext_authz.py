"""Envoy ext_authz for API-key callers, and the key check of JWT callers.

Allowed API keys get the same identity headers the edge's jwt_authn filter
sets from JWT claims, so everything behind the edge sees one shape:
x-tokenmesh-key-id, -tenant, -scopes (space-separated), -models
(comma-separated; empty = all), -tier.

A JWT's signature and claims Envoy verifies itself; the edge's JWT key check
(gateway/edge_auth.py jwt_key_check_filter) asks here, once per key and secret
per Envoy worker thread within the revocation bound, whether the token's key
still stands (not revoked, its secret not rotated out). It sends Envoy's
verified payload (jwt_authn's dynamic metadata) and the key id header, never
the token: nothing is verified twice, and a token Envoy refused never reaches
this branch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2

from gateway import key_cache
from gateway.edge_auth import IDENTITY_HEADERS
from services.auth.authenticator import REVOCATION_BOUND_S, Authenticator
from services.auth.keys import Principal
from services.core import contract
from services.core.errors import ResourceExhausted, TokenmeshError
from services.core.interceptors import Context

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def identity_headers(principal: Principal) -> dict[str, str]:
    """Returns the identity headers for a principal (the edge's JWT claims, as headers)."""
    values = (
        principal.key_id,
        principal.tenant,
        " ".join(principal.scopes),
        ",".join(principal.models),
        principal.tier,
        str(principal.rpm),
        str(principal.tpm),
        str(principal.monthly),
        principal.pins,
    )
    return dict(zip(IDENTITY_HEADERS, values, strict=True))


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _denied(error: TokenmeshError) -> external_auth_pb2.CheckResponse:
    # The edge's local-reply mapper wraps the body into its JSON error shape (and
    # gives a REST answer the details: its response Lua drops the gRPC header).
    # A gRPC caller reads the body as its grpc-message, so the details' message,
    # which gRPC clients check against it, is the same text.
    headers = []
    if isinstance(error, ResourceExhausted):
        http = http_status_pb2.StatusCode.TooManyRequests
        # Rounded up: a client retrying after a rounded-down wait is throttled again.
        # RetryInfo says the same (gRPC clients read it first).
        retry_after = max(1, math.ceil(error.retry_after_s or 1))
        error.retry_after_s = retry_after
        headers.append(_header("retry-after", str(retry_after)))
    else:
        http = http_status_pb2.StatusCode.Unauthorized
        headers.append(
            _header("www-authenticate", 'Bearer realm="tokenmesh", error="invalid_token"')
        )
    headers.append(_header(contract.STATUS_DETAILS_HEADER, error.status_details_bin()))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=error.to_status().code, message=error.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http), headers=headers, body=error.message
        ),
    )


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """ExtAuthzServicer answers Envoy's Authorization.Check: for API keys, and whether a
    verified JWT's key stands (the JWT key check)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Context
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        # Envoy's view of the client (it does not trust client-sent forwarding headers).
        source = request.attributes.source.address.socket_address.address
        claims = _verified_jwt_claims(request)
        try:
            if claims is not None:
                return await self._check_token_key(claims, source)
            principal = await self.authenticator.authenticate(http.headers, source, allow_jwt=False)
        except (ResourceExhausted, TokenmeshError) as error:
            return _denied(error)
        identity = identity_headers(principal)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in identity.items()]
            ),
            dynamic_metadata=_reusable(identity, self.authenticator.edge_cache_s(http.headers)),
        )

    async def _check_token_key(
        self, claims: Mapping[str, Any], source: str
    ) -> external_auth_pb2.CheckResponse:
        """Allows a verified JWT while its key stands; the edge reuses the answer for the
        key and secret for the revocation bound (the identity headers are the
        token's own claims, set by jwt_authn: none here)."""
        key_id, secret_id = str(claims.get("sub", "")), str(claims.get("sid", ""))
        if not await self.authenticator.token_key_stands(key_id, secret_id):
            try:
                self.authenticator.refuse(source)
            except TokenmeshError as error:
                refused = _denied(error)
                # For good: the edge keeps it, and sends the key's later requests to
                # the API-key check, which is closed (gateway/key_cache.py REFUSED).
                refused.dynamic_metadata.update({key_cache.REFUSED: True})
                return refused
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(),
            dynamic_metadata=_reusable({}, REVOCATION_BOUND_S),
        )


def _verified_jwt_claims(request: external_auth_pb2.CheckRequest) -> Mapping[str, Any] | None:
    """Returns the payload of the JWT Envoy's jwt_authn verified on this request (the
    JWT key check sends its metadata), or None (an API-key check)."""
    metadata = request.attributes.metadata_context.filter_metadata
    if key_cache.JWT_NAMESPACE not in metadata:
        return None
    payload = metadata[key_cache.JWT_NAMESPACE].fields.get(key_cache.JWT_PAYLOAD)
    if payload is None or not payload.HasField("struct_value"):
        return None
    return json_format.MessageToDict(payload.struct_value)


def _reusable(identity: dict[str, str], cache_s: float) -> struct_pb2.Struct:
    """Returns the edge key cache's copy of an allowed key's identity (gateway/key_cache.py)."""
    verdict = struct_pb2.Struct()
    verdict.update({key_cache.IDENTITY: identity, key_cache.CACHE_MS: int(cache_s * 1000)})
    return verdict
