"""The largest request body the edge accepts, refused before auth or a service reads it.

Nothing bounded a REST body: the transcoder's own limit counts only the
bytes its JSON parser has not consumed yet, so a long string (or a long
unknown field) streams through it whatever its size. A 9 MiB
`POST /v1/auth/token` (a public RPC: nothing else buffers it) reached the
auth service and answered its 401, a 40 MiB one was the auth service's
gRPC size limit (429, naming its 16 MiB); only routes that buffered the
transcoded message (model routing, an authenticated OpenAI call) answered
413, and unauthenticated callers got 401 instead. Now every REST route
answers 413 for a body over MAX_BODY_BYTES, in the shape of its surface
(the REST JSON error, OpenAI's on /openai/ paths), whoever the caller is:

- a declared `content-length` over the limit is refused by the edge's
  request Lua (gateway/edge_lua.py), the first filter, from the headers
  alone: before the credential is checked (no auth call is spent on a
  request that cannot be served, and an honest client learns what is
  wrong, as nginx's `client_max_body_size` and Envoy AI Gateway answer),
  and before any byte of the body is read, so an anonymous caller makes the
  edge buffer nothing;
- a body of undeclared size (HTTP/1.1 chunked; HTTP/2 without
  `content-length`) is buffered by Envoy's buffer filter before the
  transcoder (`unsized_body_filters`) and refused once it passes the limit
  (the file uploads' limit on their paths, MAX_BODY_BYTES elsewhere).
  Its size is known only by reading it, so this one runs before
  authentication: an anonymous caller can make the edge hold at most the
  limit, for at most `EdgeLimits.request_timeout_s`, what any caller's
  accepted body takes anyway (the transcoder holds a whole message). Every
  common client (curl, httpx and OpenAI's SDKs, browsers' fetch) declares
  its length, so this path is rare.

Native gRPC requests keep their own limit (the model-routing filter's
buffer, RESOURCE_EXHAUSTED): neither check applies to a content type Envoy
treats as gRPC (`grpc_paths.GRPC_CONTENT_TYPE`). A prefix test let gRPC-Web
and made-up `application/grpcX` REST bodies past both checks (40 MiB reached
the auth service again).
"""

from __future__ import annotations

from typing import Any

from gateway import handover
from gateway.grpc_paths import GRPC_CONTENT_TYPE

# What the edge accepts of a REST request body: the transcoder's buffer (it raises
# the stream's buffer limit to envoy_config.MAX_TRANSCODED_RESPONSE_BYTES, 8 MiB).
MAX_BODY_BYTES = 8 << 20
# OpenAI's file uploads carry the largest file (8 MiB) and its multipart framing.
UPLOAD_PATH_PREFIX = "/openai/v1/files"
MAX_UPLOAD_BYTES = handover.MAX_UPLOAD_BYTES
# What a REST or OpenAI client reads of every 413 the edge answers (the message of
# the local reply; Envoy's own texts named its transcoder).
TOO_LARGE_MESSAGE = (
    f"request body larger than the edge accepts ({MAX_BODY_BYTES >> 20} MiB); send a smaller one"
)
FILTER_NAME = "tokenmesh.unsized_body_limit"
UPLOAD_FILTER_NAME = "tokenmesh.unsized_upload_limit"
_TYPE = "type.googleapis.com/envoy"

# A Lua function of the edge's request filter (gateway/edge_lua.py). Returns true
# when it answered the request (nothing else may run on it then).
LUA_FUNCTION = f"""
local MAX_BODY_BYTES = {MAX_BODY_BYTES}
local MAX_UPLOAD_BYTES = {MAX_UPLOAD_BYTES}
local UPLOAD_PATH_PREFIX = "{UPLOAD_PATH_PREFIX}"

-- Native gRPC (Envoy's test: application/grpc, +proto, ;...); gRPC-Web and any
-- other type are REST here.
local function is_native_grpc(headers)
  local content_type = headers:get("content-type") or ""
  return content_type == "application/grpc"
    or string.find(content_type, "^application/grpc[+;]") ~= nil
end

local function refuse_oversized_body(handle, headers, path)
  local length = tonumber(headers:get("content-length") or "")
  if length == nil or length <= MAX_BODY_BYTES then
    return false
  end
  if length <= MAX_UPLOAD_BYTES and string.find(path or "", UPLOAD_PATH_PREFIX, 1, true) == 1 then
    return false
  end
  if is_native_grpc(headers) then  -- native gRPC keeps its own limit
    return false
  end
  -- A local reply: the edge's mappers give it the REST or OpenAI error shape.
  handle:respond({{[":status"] = "413"}}, "{TOO_LARGE_MESSAGE}")
  return true
end
"""


def _header_matches(name: str, match: dict[str, Any]) -> dict[str, Any]:
    return {
        "single_predicate": {
            "input": {
                "name": name,
                "typed_config": {
                    "@type": f"{_TYPE}.type.matcher.v3.HttpRequestHeaderMatchInput",
                    "header_name": name,
                },
            },
            "value_match": match,
        }
    }


def unsized_body_filters() -> list[dict[str, Any]]:
    """Builds the buffer filters that bound a REST body of undeclared size: one at
    MAX_BODY_BYTES for every route but the file uploads, one at MAX_UPLOAD_BYTES
    for those (a file and its multipart framing).

    Each is skipped for a request that declares its length (the request Lua judged
    it), for native gRPC (Envoy's own test: `grpc_paths.GRPC_CONTENT_TYPE`, so
    gRPC-Web and any other `application/grpc...` type count as REST), and for the
    other filter's paths; a request without a body passes at once.
    """
    uploads = _header_matches(":path", {"prefix": UPLOAD_PATH_PREFIX})
    return [
        _buffer_filter(FILTER_NAME, MAX_BODY_BYTES, uploads),
        _buffer_filter(UPLOAD_FILTER_NAME, MAX_UPLOAD_BYTES, {"not_matcher": uploads}),
    ]


def _buffer_filter(name: str, limit: int, other_paths: dict[str, Any]) -> dict[str, Any]:
    skip = {
        "action": {
            "name": "skip",
            "typed_config": {
                "@type": f"{_TYPE}.extensions.filters.common.matcher.action.v3.SkipFilter"
            },
        }
    }
    declared_grpc_or_elsewhere = {
        "or_matcher": {
            "predicate": [
                _header_matches(
                    "content-length", {"safe_regex": {"google_re2": {}, "regex": "[0-9]+"}}
                ),
                _header_matches(
                    "content-type", {"safe_regex": {"google_re2": {}, "regex": GRPC_CONTENT_TYPE}}
                ),
                other_paths,
            ]
        }
    }
    return {
        "name": name,
        "typed_config": {
            "@type": f"{_TYPE}.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": f"{_TYPE}.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": limit,
                },
            },
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [{"predicate": declared_grpc_or_elsewhere, "on_match": skip}]
                }
            },
        },
    }
