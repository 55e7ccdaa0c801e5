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
  transcoder's 404 for an unknown path): local-reply mappers, placed before
  the REST API's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}

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


def _status_is(status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": f"tm.openai.{status}"},
            }
        }
    }


def local_reply_mappers() -> list[dict[str, Any]]:
    """Envoy's own error replies on /openai/ paths, in OpenAI's error shape."""
    mappers = []
    for status, (kind, code) in LOCAL_ERRORS.items():
        mapper: dict[str, Any] = {
            "filter": {"and_filter": {"filters": [_on_openai_path(), _status_is(status)]}},
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": "%LOCAL_REPLY_BODY%",
                        "type": kind,
                        "param": None,
                        "code": code,
                    }
                },
                "content_type": "application/json",
            },
        }
        if status == 503:
            mapper["headers_to_add"] = [
                {
                    "header": {"key": "retry-after", "value": "1"},
                    "append_action": "ADD_IF_ABSENT",
                }
            ]
        mappers.append(mapper)
    return mappers
