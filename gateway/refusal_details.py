"""The google.rpc details of the edge's own refusals, as a service's errors carry them.

A worker's error reaches a gRPC caller with `grpc-status-details-bin` (ErrorInfo's
reason and metadata, RetryInfo, QuotaFailure) and a REST caller with the same
details in its JSON body (the transcoder prints them). The edge's own refusals
carried none: a gRPC caller read only a code and a message, a REST caller
`"details": []`, so a client could not tell a missing scope from a revoked key,
nor read when to retry from the error itself. Each refusal now has them:

- 401 and 429 of ext_authz (a bad credential, too many failed attempts): the
  auth service adds `grpc-status-details-bin` to its denial (its RetryInfo is
  the limiter's own wait); a REST answer's JSON gets the same ErrorInfo and a
  RetryInfo of its Retry-After (`rest_mappers`).
- 429 of the rate-limit filter: the rate-limit service adds the header (the
  worker's RATE_LIMITED refusal); REST likewise, its QuotaFailure's subject
  from the limiter's `x-tokenmesh-quota-subject` (which no answer keeps).
- 403 of the RBAC filter: it knows no more than "denied", so one mapper per
  scope matches the RPCs that need it (the request's `:path`, the gRPC path
  once transcoded) and answers what a service answers for that scope: the
  message "this operation needs the 'jobs' scope", ErrorInfo MISSING_SCOPE
  with the scope (its Status precomputed here for gRPC callers; RBAC's own
  "RBAC: access denied" named the filter and not the scope).

A gRPC caller's details must carry the very message of its grpc-message
(grpc's `rpc_status.from_call` refuses them otherwise): where this module
precomputes a Status, the mapper's body (which becomes the grpc-message) is the
same fixed text; the services' headers carry the text they put in the body.
A REST answer never shows the header: the edge's response Lua drops gRPC's
protocol fields from every answer that is not gRPC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from google.protobuf import any_pb2, json_format

from gateway import edge_auth, grpc_paths, openai_edge
from services.core import contract
from services.core.errors import (
    ERROR_DOMAIN,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TokenmeshError,
    Unauthenticated,
    Unavailable,
    missing_scope,
)

# RBAC's 403 on a path no scope lists (an unknown method): no scope would allow it
# but admin.
NOT_ALLOWED = PermissionDenied(
    "this credential may not call this operation", reason="PERMISSION_DENIED"
)
# Envoy's own 503s, with the edge's Retry-After (RETRY_AFTER_S) as their RetryInfo.
RETRY_AFTER_S = 1
NO_HEALTHY_UPSTREAM = Unavailable(
    "no healthy upstream", retry_after_s=RETRY_AFTER_S, reason="NO_HEALTHY_UPSTREAM"
)
UPSTREAM_UNAVAILABLE = Unavailable(
    openai_edge.UNAVAILABLE_MESSAGE, retry_after_s=RETRY_AFTER_S, reason="UPSTREAM_UNAVAILABLE"
)
# A gRPC request Envoy's codec refused before any filter (a fragment in its path,
# a malformed header): gRPC's mapping of HTTP 400 made it INTERNAL, which a client
# reads as the server's fault and may retry.
MALFORMED_GRPC = InvalidArgument(
    [FieldViolation("request", "the edge could not read this request's path or headers")],
    reason="MALFORMED_REQUEST",
)
# A gRPC request over the edge's buffer (its REST and OpenAI answers say it their way).
GRPC_TOO_LARGE = ResourceExhausted(
    "request larger than the edge accepts; send a smaller message", reason="REQUEST_TOO_LARGE"
)


def scope_paths() -> Mapping[str, list[str]]:
    """Returns each scope's RPC paths (public RPCs need none)."""
    paths: dict[str, list[str]] = {}
    for path, scope in edge_auth.RPC_SCOPES.items():
        if scope != edge_auth.PUBLIC:
            paths.setdefault(scope, []).append(path)
    return paths


def _path_is_one_of(paths: list[str]) -> dict[str, Any]:
    # Exact matches, not one regex: RE2's program-size limit in Envoy (100 by
    # default) refuses an alternation of a scope's 30 paths.
    return {
        "or_filter": {
            "filters": [
                {"header_filter": {"header": {"name": ":path", "string_match": {"exact": p}}}}
                for p in paths
            ]
        }
    }


def _forbidden() -> dict[str, Any]:
    return grpc_paths.status_filter("EQ", 403, "tm.lr.forbidden")


def _scope_refusals() -> Iterator[tuple[dict[str, Any], PermissionDenied]]:
    """Yields (the local-reply filter of RBAC's 403 on a scope's RPCs, the refusal
    the caller reads), then the refusal of any other 403."""
    for scope, paths in sorted(scope_paths().items()):
        condition = {"and_filter": {"filters": [_forbidden(), _path_is_one_of(paths)]}}
        yield condition, missing_scope(scope)
    yield _forbidden(), NOT_ALLOWED


def details_header(error: TokenmeshError) -> dict[str, Any]:
    """A local reply's `grpc-status-details-bin` of `error` (a mapper's headers_to_add)."""
    return {
        "header": {"key": contract.STATUS_DETAILS_HEADER, "value": error.status_details_bin()},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _fixed_text(message: str) -> dict[str, Any]:
    return {"text_format_source": {"inline_string": _escaped(message)}}


def grpc_reply(error: TokenmeshError, *headers: dict[str, Any]) -> dict[str, Any]:
    """A native gRPC mapper's answer of `error`: `headers` (a grpc-status, a
    retry-after), its details, and its message (the grpc-message, fixed so that the
    details agree with it)."""
    return {
        "headers_to_add": [*headers, details_header(error)],
        "body_format_override": _fixed_text(error.message),
    }


def rest_reply(error: TokenmeshError) -> dict[str, Any]:
    """A REST mapper's body of `error`: its code, message and details."""
    code = error.to_status().code
    return rest_body(code, _escaped(error.message), _json_details(error))


def malformed_grpc_mapper() -> dict[str, Any]:
    """Envoy's 400 to a native gRPC request: INVALID_ARGUMENT, not gRPC's INTERNAL."""
    return {
        "filter": grpc_paths.native_grpc(grpc_paths.status_filter("EQ", 400, "tm.lr.grpc400")),
        **grpc_reply(
            MALFORMED_GRPC, grpc_paths.grpc_status_header(MALFORMED_GRPC.to_status().code)
        ),
    }


def grpc_mappers() -> list[dict[str, Any]]:
    """RBAC's 403 to a native gRPC caller: the scope's refusal and its details."""
    return [
        {"filter": grpc_paths.native_grpc(condition), **grpc_reply(refusal)}
        for condition, refusal in _scope_refusals()
    ]


def openai_mappers() -> list[dict[str, Any]]:
    """RBAC's 403 on an /openai/ path: the scope's refusal in OpenAI's error shape."""
    return [
        {
            "filter": openai_edge.on_openai_path_with(condition),
            "body_format_override": openai_edge.openai_body(
                {**openai_edge.error_object(403), "message": _escaped(refusal.message)}
            ),
        }
        for condition, refusal in _scope_refusals()
    ]


def rest_mappers() -> list[dict[str, Any]]:
    """The REST API's JSON of the edge's refusals, with their details."""
    mappers = [
        {"filter": condition, "body_format_override": rest_reply(refusal)}
        for condition, refusal in _scope_refusals()
    ]
    mappers += [
        _flagged_rest_mapper("UAEX", 401, Unauthenticated, contract.INVALID_CREDENTIALS),
        _flagged_rest_mapper(
            "UAEX", 429, ResourceExhausted, contract.AUTH_FAILURES_RATE_LIMITED, retry=True
        ),
        _flagged_rest_mapper(
            "RL", 429, ResourceExhausted, contract.RATE_LIMITED, retry=True, quota=True
        ),
    ]
    return mappers


def _flagged_rest_mapper(
    flag: str,
    status: int,
    kind: type[TokenmeshError],
    reason: str,
    *,
    retry: bool = False,
    quota: bool = False,
) -> dict[str, Any]:
    """A REST mapper of one filter's refusal (`flag`: ext_authz's UAEX, the rate-limit
    filter's RL): its reason, when it said to retry (its Retry-After) and, for the
    limiter's, which quota (its subject header, the message its description: a
    worker's RATE_LIMITED refusal's QuotaFailure)."""
    details: list[dict[str, Any]] = [
        {"@type": _type_url("google.rpc.ErrorInfo"), "reason": reason, "domain": ERROR_DOMAIN}
    ]
    if retry:
        details.append(
            {"@type": _type_url("google.rpc.RetryInfo"), "retry_delay": "%RESP(retry-after)%s"}
        )
    if quota:
        violation = {
            "subject": f"%RESP({contract.QUOTA_SUBJECT_HEADER})%",
            "description": "%LOCAL_REPLY_BODY%",
        }
        details.append({"@type": _type_url("google.rpc.QuotaFailure"), "violations": [violation]})
    condition = {
        "and_filter": {
            "filters": [
                grpc_paths.status_filter("EQ", status, f"tm.lr.{flag.lower()}{status}"),
                {"response_flag_filter": {"flags": [flag]}},
            ]
        }
    }
    return {
        "filter": condition,
        # Every grpc.StatusCode carries its number (google.rpc.Code's).
        "body_format_override": rest_body(int(kind.code.value[0]), "%LOCAL_REPLY_BODY%", details),
    }


def rest_body(grpc_code: int, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    """The REST API's error JSON (the transcoder's shape of a service's error)."""
    return {
        "json_format": {
            "code": grpc_code,
            "message": message,
            "http_status": "%RESPONSE_CODE%",
            "details": details,
        },
        "content_type": "application/json",
    }


def _json_details(error: TokenmeshError) -> list[dict[str, Any]]:
    """`error`'s details as the transcoder prints a service's (proto field names)."""
    details = []
    for detail in error.details():
        packed = any_pb2.Any()
        packed.Pack(detail)
        printed = json_format.MessageToDict(packed, preserving_proto_field_name=True)
        details.append(_escaped_values(printed))
    return details


def _escaped_values(value: Any) -> Any:
    if isinstance(value, str):
        return _escaped(value)
    if isinstance(value, dict):
        return {key: _escaped_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped_values(item) for item in value]
    return value


def _escaped(text: str) -> str:
    # Envoy reads a format string: a literal "%" would start a command.
    return text.replace("%", "%%")


def _type_url(name: str) -> str:
    return f"type.googleapis.com/{name}"
