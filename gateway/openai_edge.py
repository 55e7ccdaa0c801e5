"""The edge's part of the OpenAI-compatible surface (/openai/v1): its errors.

Successful responses pass through untouched: the workers write OpenAI's
bytes as google.api.HttpBody, which the transcoder forwards as they come.

Errors come in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:

- from a worker: it aborts before any output with the gRPC status (the
  transcoder maps it to the HTTP status) and OpenAI's error JSON in
  `contract.OPENAI_ERROR_HEADER`. A Lua filter placed before the transcoder
  sees the transcoded response on its way out and, only when that header is
  there, makes it the body (success responses cost one header lookup);
- from Envoy itself on /openai/ paths (401 from jwt_authn or ext_authz, 403
  from RBAC, 429 from the rate limiter, 503 without a healthy worker, the
  transcoder's 404 for an unknown path, 413 for a body over the edge's limit
  (gateway/request_body.py), 408 when the request did not arrive
  within `request_timeout`, any other error status): local-reply mappers,
  placed before the REST API's own;
- from Envoy before it read the request's headers (HTTP/1.1 only: 431 for
  headers over `max_request_headers_kb`, 408 for headers slower than
  `request_headers_timeout`, 400 for a malformed request or a header name
  with "_"): no mapper can tell an /openai/ path then (no request header
  exists, `:path` included), so the edge answers one body that both kinds
  of client read (gateway/envoy_config.py, `before_request_mappers`), with
  this module's `error` object in it. Over HTTP/2 Envoy resets the stream
  instead: there is no reply to shape (docs/openai.md, "Errors").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import grpc_paths, request_body
from services.core import contract

PATH_PREFIX = "/openai/"
# HTTP status of a local reply -> OpenAI's (type, code) for it.
LOCAL_ERRORS: Mapping[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    # OpenAI answers a bad key with type invalid_request_error (its SDKs go by status).
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    # The request (`request_timeout`) or its headers (`request_headers_timeout`)
    # arrived too slowly; the SDKs retry a 408.
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    # Headers over the edge's max_request_headers_kb or max_headers.
    431: ("invalid_request_error", "request_headers_too_large"),
    500: ("server_error", "internal_error"),
    501: ("server_error", "not_implemented"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}
# What Envoy answers over HTTP/1.1 before it has read a request's headers (see the
# module's docstring), on any path: the OpenAPI document lists them on every route.
BEFORE_HEADERS_STATUSES = (400, 408, 431)
# What a client reads of a 503 Envoy answers itself (no healthy worker, a refused or
# reset connection to one): never Envoy's own text, which names its internals
# ("upstream connect error or disconnect/reset before headers. ... reset reason").
UNAVAILABLE_MESSAGE = "upstream unavailable; try again"
# Any other error status Envoy answers (OpenAI's `code` may be null).
OTHER_CLIENT_ERROR = ("invalid_request_error", None)
OTHER_SERVER_ERROR = ("server_error", None)

# A Lua function of the edge's response filter (gateway/edge_lua.py) and of this one.
# It returns true when it replaced the body (the header object is stale then).
LUA_FUNCTION = f"""
local OPENAI_ERROR_HEADER = "{contract.OPENAI_ERROR_HEADER}"

local function openai_error_body(handle, headers)
  local body = headers:get(OPENAI_ERROR_HEADER)
  if body == nil then
    return false
  end
  headers:remove(OPENAI_ERROR_HEADER)
  local status = tonumber(headers:get(":status")) or 0
  local content_type = headers:get("content-type") or ""
  -- gRPC clients keep their status; only a REST error gets the JSON body.
  if status < 400 or string.find(content_type, "application/grpc", 1, true) == 1 then
    return false
  end
  headers:replace("content-type", "application/json")
  handle:body(true):setBytes(body)
  return true
end
"""
LUA_SOURCE = (
    LUA_FUNCTION
    + """
function envoy_on_response(handle)
  openai_error_body(handle, handle:headers())
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the filter that makes a worker's OpenAI error JSON the REST body."""
    return {
        "name": "tokenmesh.openai_errors",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }


def _on_openai_path() -> dict[str, Any]:
    """Matches requests for /openai/ (before the transcoder rewrote the path, and after)."""
    return {
        "or_filter": {
            "filters": [
                {
                    "header_filter": {
                        "header": {
                            "name": name,
                            "string_match": {"prefix": PATH_PREFIX},
                        }
                    }
                }
                for name in (":path", "x-envoy-original-path")
            ]
        }
    }


def error_object(status: int) -> dict[str, Any]:
    """OpenAI's `error` object of Envoy's local reply with this HTTP status (its message
    the reply's own text); a status LOCAL_ERRORS lacks gets `other_error_object`'s."""
    if status not in LOCAL_ERRORS:
        return other_error_object(status)
    return _error(*LOCAL_ERRORS[status])


def other_error_object(status: int) -> dict[str, Any]:
    """OpenAI's `error` object of any error status of `status`'s class (4xx or 5xx)."""
    return _error(*(OTHER_SERVER_ERROR if status >= 500 else OTHER_CLIENT_ERROR))


def _error(kind: str, code: str | None) -> dict[str, Any]:
    return {"message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": code}


def openai_body(error: dict[str, Any]) -> dict[str, Any]:
    return {"json_format": {"error": error}, "content_type": "application/json"}


def on_openai_path_with(status_filter: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": [_on_openai_path(), status_filter]}}


def local_reply_mappers() -> list[dict[str, Any]]:
    """Envoy's own error replies on /openai/ paths, in OpenAI's error shape.

    One mapper per status of LOCAL_ERRORS, then one for any other server
    error and one for any other client error (a 408 from `request_timeout`
    came out in the REST API's google.rpc shape: no mapper had its status).
    """
    mappers = []
    for status in LOCAL_ERRORS:
        mapper: dict[str, Any] = {
            "filter": on_openai_path_with(
                grpc_paths.status_filter("EQ", status, f"tm.openai.{status}")
            ),
            "body_format_override": openai_body(error_object(status)),
        }
        if status == 413:
            # Whichever filter refused the body (Envoy's text named its transcoder).
            too_large = {**error_object(status), "message": request_body.TOO_LARGE_MESSAGE}
            mapper["body_format_override"] = openai_body(too_large)
        if status == 503:
            unavailable = {**error_object(status), "message": UNAVAILABLE_MESSAGE}
            mapper["body_format_override"] = openai_body(unavailable)
            mapper["headers_to_add"] = [
                {
                    "header": {"key": "retry-after", "value": "1"},
                    "append_action": "ADD_IF_ABSENT",
                }
            ]
        mappers.append(mapper)
    for lowest in (500, 400):
        runtime_key = f"tm.openai.{lowest // 100}xx"
        mappers.append(
            {
                "filter": on_openai_path_with(grpc_paths.status_filter("GE", lowest, runtime_key)),
                "body_format_override": openai_body(other_error_object(lowest)),
            }
        )
    return mappers
