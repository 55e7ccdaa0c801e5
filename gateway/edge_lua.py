"""The edge's Lua work that every request and response pays, in one filter each way.

Envoy runs each Lua filter in a coroutine of its own per request (and per
response for `envoy_on_response`), whatever the script then does: the
edge's filter chain alone (direct response, a JWT caller) cost 177 µs of
Envoy CPU per request with six Lua filters and 126 µs with these four
(docs/perf/summary.md, "E1-E3"). Checks that need only a header lookup on
most requests share one coroutine:

- request (before the health-check filter): drop header names gRPC cannot
  carry and a client's `x-tokenmesh-*` headers (gateway/header_names.py),
  refuse an API key in the URL (gateway/url_credentials.py) and a
  body declared larger than the edge accepts, before anything reads
  it (gateway/request_body.py), mark a
  unary gRPC call (a table lookup, gateway/response_headers.py), then, for
  `grpc.health.v1.Health/Check` only, gate it on `/healthz`
  (gateway/edge_health.py). The health-check
  filter answers only `GET /healthz`, so running the gate before it changes
  nothing for either path;
- response (before the transcoder, so it sees REST responses): a unary
  answer's response headers, and a REST error's metadata, are lifted out of
  its trailers (gateway/response_headers.py), a worker's OpenAI error JSON
  becomes the body (gateway/openai_edge.py), else a 400's transcoder message
  is put in the API's words (gateway/transcoder_messages.py), then the REST status a service
  asked for is applied (gateway/error_status.py), in the order the two
  filters ran in before; last, a REST answer's gRPC protocol headers go
  (gateway/response_headers.py).

The modules keep their own filters (and their tests' subjects) for Envoys
that need only one of them (e.g. gateway/openai_backend.py).
"""

from __future__ import annotations

import functools
from typing import Any

from gateway import (
    edge_health,
    error_status,
    header_names,
    openai_edge,
    request_body,
    response_headers,
    transcoder_messages,
    url_credentials,
)

REQUEST_FILTER = "tokenmesh.edge_requests"
RESPONSE_FILTER = "tokenmesh.edge_responses"


@functools.cache
def request_source() -> str:
    """The request filter's Lua (it names every unary gRPC method: built once)."""
    return (
        header_names.LUA_FUNCTION
        + request_body.LUA_FUNCTION  # before url_credentials: it defines is_native_grpc
        + url_credentials.LUA_FUNCTION
        + edge_health.LUA_FUNCTION
        + response_headers.request_lua_function()
        + """
function envoy_on_request(handle)
  local headers = handle:headers()
  drop_client_headers(headers)
  local path = headers:get(":path")
  if refuse_key_in_url(handle, headers, path) or refuse_oversized_body(handle, headers, path) then
    return
  end
  mark_unary_grpc(handle, path)
  if path == HEALTH_CHECK_PATH then
    gate_edge_health(handle)
  end
end
"""
    )


@functools.cache
def response_source() -> str:
    """The response filter's Lua (it names the API's enums: built once)."""
    return RESPONSE_SOURCE_HEAD + transcoder_messages.lua_function() + RESPONSE_SOURCE_TAIL


RESPONSE_SOURCE_HEAD = (
    response_headers.RESPONSE_LUA_FUNCTION + openai_edge.LUA_FUNCTION + error_status.LUA_FUNCTION
)
RESPONSE_SOURCE_TAIL = """
function envoy_on_response(handle)
  local headers = handle:headers()
  if lift_response_headers(handle, headers) then
    -- It waited for the body: header objects do not survive a wait, fetch them again.
    headers = handle:headers()
  end
  if openai_error_body(handle, headers) then
    -- The body was replaced: header objects do not survive that, fetch them again.
    headers = handle:headers()
  elseif transcoder_message_in_api_words(handle, headers) then
    headers = handle:headers()
  end
  apply_error_status(headers)
  drop_grpc_protocol_headers(headers)
  mark_event_stream(headers)
end
"""


def _lua(name: str, source: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source},
        },
    }


def request_filter() -> dict[str, Any]:
    """Builds the request-side filter: header names gRPC cannot carry, bodies declared
    too large, edge health."""
    return _lua(REQUEST_FILTER, request_source())


def response_filter() -> dict[str, Any]:
    """Builds the response-side filter: OpenAI error bodies, then REST error statuses."""
    return _lua(RESPONSE_FILTER, response_source())
