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
MESSAGE = (
    "no RPC at this path: a gRPC method's path is /<package>.<Service>/<Method>; "
    "REST paths take JSON, not a gRPC content type"
)
TYPE_PREFIX = "type.googleapis.com/envoy"


def grpc_content_type(invert: bool = False) -> dict[str, Any]:
    """A route header matcher for a gRPC content type (`invert`: anything else, or none)."""
    matcher: dict[str, Any] = {
        "name": "content-type",
        "string_match": {"safe_regex": {"regex": GRPC_CONTENT_TYPE}},
    }
    if invert:
        matcher.update(invert_match=True, treat_missing_header_as_empty=True)
    return matcher


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


def unrouted_grpc_route(auth_filters: bool) -> dict[str, Any]:
    """Builds the edge's last route: any gRPC request still unrouted gets NOT_FOUND
    (grpc-status set here; Envoy would derive UNIMPLEMENTED from the 404)."""
    route: dict[str, Any] = {
        "match": {"prefix": "/", "headers": [grpc_content_type()]},
        "direct_response": {"status": 404, "body": {"inline_string": MESSAGE}},
        "response_headers_to_add": [
            {
                "header": {"key": "grpc-status", "value": str(NOT_FOUND)},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }
    disabled = _disabled(auth_filters)
    if disabled:
        route["typed_per_filter_config"] = disabled
    return route


def local_reply_mapper() -> dict[str, Any]:
    """Keeps a native gRPC request's 404 message as plain text (the grpc-message),
    instead of the JSON body REST clients get."""
    return {
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "status_code_filter": {
                            "comparison": {
                                "op": "EQ",
                                "value": {"default_value": 404, "runtime_key": "tm.lr.grpc404"},
                            }
                        }
                    },
                    {"header_filter": {"header": grpc_content_type()}},
                    {
                        "header_filter": {
                            "header": {"name": "x-envoy-original-path", "present_match": False}
                        }
                    },
                ]
            }
        },
        "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}},
    }
