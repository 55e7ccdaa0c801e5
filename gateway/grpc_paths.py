"""A native gRPC request that no route of a gRPC method takes: NOT_FOUND, for every caller.

REST paths (`/v1/models/x:complete`, `/openai/v1/...`) are transcoded only
when the request is not already gRPC; a request with a gRPC content type is
passed on as it is. Such a request used to match no route, and what it got
then depended on state: with an API key the key cache (gateway/key_cache.py)
had verified recently, RBAC let the caller through and Envoy's no-route
reply became UNIMPLEMENTED (the fuzzer's "a public RPC the edge no longer
routes"); once the entry expired, ext_authz (which skips requests without a
route) left no identity and RBAC answered PERMISSION_DENIED. A REST
Complete path matched the hand-over routes and was sent raw to a worker or
the jobs service (UNIMPLEMENTED, or UNAVAILABLE).

The last route of the edge takes every such request and answers NOT_FOUND
itself, naming what a gRPC path looks like. Authentication is off on it: it
serves nothing, so every caller gets the same answer at no callout's cost.
"""

from __future__ import annotations

from typing import Any

from gateway import edge_auth, key_cache

# The content types Envoy treats as gRPC (application/grpc, +proto, ;...);
# gRPC-Web is not among them (it gets the JSON 404 of any unknown path).
GRPC_CONTENT_TYPE = r"^application/grpc([+;].*)?$"
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
MESSAGE = (
    "no RPC at this path: a gRPC method's path is /<package>.<Service>/<Method>; "
    "REST paths take JSON, not a gRPC content type"
)
TYPE_PREFIX = "type.googleapis.com/envoy"
# What a transcoded (REST) request carries: the path the transcoder rewrote.
ORIGINAL_PATH_HEADER = "x-envoy-original-path"


def grpc_content_type(invert: bool = False) -> dict[str, Any]:
    """A route header matcher for a gRPC content type (`invert`: anything else, or none)."""
    matcher: dict[str, Any] = {
        "name": "content-type",
        "string_match": {"safe_regex": {"regex": GRPC_CONTENT_TYPE}},
    }
    if invert:
        matcher.update(invert_match=True, treat_missing_header_as_empty=True)
    return matcher


def native_grpc_request() -> list[dict[str, Any]]:
    """Route header matchers for a native gRPC request: a gRPC content type, and no path
    the transcoder rewrote (a transcoded REST request has a gRPC content type too)."""
    return [
        grpc_content_type(),
        {"name": ORIGINAL_PATH_HEADER, "present_match": False},
    ]


def _disabled(auth_filters: bool) -> dict[str, Any]:
    if not auth_filters:
        return {}
    return {
        **edge_auth.ext_authz_disabled(),
        **key_cache.disabled(),
        # The generic per-route switch (the router's xDS encoder knows its type).
        "envoy.filters.http.rbac": {
            "@type": f"{TYPE_PREFIX}.config.route.v3.FilterConfig",
            "disabled": True,
        },
    }


def grpc_status_header(code: int) -> dict[str, Any]:
    """A header to add to a local reply (a route's direct response, a local-reply mapper):
    its gRPC status. Envoy keeps one set this way and derives the status from the HTTP
    code only when there is none (404 -> UNIMPLEMENTED, 429 -> UNAVAILABLE)."""
    return {
        "header": {"key": "grpc-status", "value": str(code)},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def unrouted_grpc_route(auth_filters: bool) -> dict[str, Any]:
    """Builds the edge's last route: any gRPC request still unrouted gets NOT_FOUND
    (grpc-status set here; Envoy would derive UNIMPLEMENTED from the 404)."""
    route: dict[str, Any] = {
        "match": {"prefix": "/", "headers": [grpc_content_type()]},
        "direct_response": {"status": 404, "body": {"inline_string": MESSAGE}},
        "response_headers_to_add": [grpc_status_header(NOT_FOUND)],
    }
    disabled = _disabled(auth_filters)
    if disabled:
        route["typed_per_filter_config"] = disabled
    return route


def status_filter(op: str, status: int, runtime_key: str) -> dict[str, Any]:
    """A local-reply filter on the HTTP status (`op`: EQ, GE, LE)."""
    comparison = {"op": op, "value": {"default_value": status, "runtime_key": runtime_key}}
    return {"status_code_filter": {"comparison": comparison}}


def native_grpc(condition: dict[str, Any]) -> dict[str, Any]:
    """A local-reply filter: `condition`, for a native gRPC request (a gRPC content type;
    a transcoded REST request has one too by then, but carries x-envoy-original-path)."""
    return {
        "and_filter": {
            "filters": [
                condition,
                {"header_filter": {"header": grpc_content_type()}},
                {
                    "header_filter": {
                        "header": {"name": ORIGINAL_PATH_HEADER, "present_match": False}
                    }
                },
            ]
        }
    }


#: The local reply's own text as the body: Envoy sends a gRPC caller the body as
#: its grpc-message (REST callers get the JSON error shape instead).
PLAIN_MESSAGE = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}}


def local_reply_mapper() -> dict[str, Any]:
    """Keeps the message of Envoy's own error reply to a native gRPC request (404 from
    the last route, 401 from jwt_authn or ext_authz, 403 from RBAC, ...) as plain text,
    its grpc-message, instead of the JSON body REST clients get (which a gRPC caller
    read as its message: `{"code":16,"details":[],...}`)."""
    return {
        "filter": native_grpc(status_filter("GE", 400, "tm.lr.grpc_error")),
        "body_format_override": PLAIN_MESSAGE,
    }


def rate_limited_mapper() -> dict[str, Any]:
    """Answers a native gRPC request's 429 (ext_authz's failed-authentication limiter,
    the rate limit filter) RESOURCE_EXHAUSTED with a plain message.

    Envoy derives a local reply's grpc-status from the HTTP status when none is
    set, and maps 429 to UNAVAILABLE, which gRPC clients retry at once: the
    limiter's Retry-After went unheeded. A grpc-status set here is kept.
    """
    return {
        "filter": native_grpc(status_filter("EQ", 429, "tm.lr.grpc429")),
        "headers_to_add": [grpc_status_header(RESOURCE_EXHAUSTED)],
        "body_format_override": PLAIN_MESSAGE,
    }
