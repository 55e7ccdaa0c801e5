"""Lifts a unary answer's response headers out of its trailers, at the edge.

A service's unary answer carries its response headers (request id, serving
version, rate limits, deprecation...) in its trailing metadata, named by
`x-tokenmesh-response-headers`: grpc.aio sends headers a handler sends early
as a batch of their own, which cost a worker 200 µs per call through the
edge (services.core.interceptors, HeadersAtEnd). The edge moves them back
into the response headers, so its REST and gRPC clients see what they saw
before:

- request (the edge's request filter, before the transcoder): a native gRPC
  call of a unary method (its path is the method's) is marked in the
  stream's dynamic metadata. REST requests cannot be told apart here;
- response (the edge's response filter, after the transcoder): a whole unary
  answer is a marked gRPC call's, or a transcoded REST one's (the transcoder
  holds a unary answer's headers until its trailers, then sets `grpc-status`
  in them). Its body is buffered (REST: the transcoder buffered it already),
  and the trailers it names become headers, unless the edge set that header
  itself. An answer that sent its headers first (one over
  contract.HEADERS_AT_END_MAX_BYTES, or REST_HEADERS_AT_END_MAX_BYTES when
  transcoded, which the buffer might not hold) says so in them: the mark is
  removed and nothing is buffered.

Streams never wait: their headers go first, as always. So do an error's
once its handler sent them (a trailers-only error is retried by Envoy).

Deprecation and Sunset can come twice: a deprecated API version's from the
service (services/core/api_versions.py) and a deprecated model version's
from its route (services/router/snapshot.py, which adds rather than
replaces). A client gets one of each, the earliest: the answer stops on the
first of the two sunsets, and is deprecated since the first of the two
deprecations (the route's used to replace the service's, so a v1 answer
advertised the model version's later date, even after v1 was retired). The
API version's Link stays (a model version has none).

A REST error answer (transcoded, status >= 400) waits for its body too:
the transcoder makes a trailers-only error's metadata its headers, but an
error whose handler sent headers first keeps its own metadata (retry-after,
the limits' headers, `contract.HTTP_STATUS_HEADER`, OpenAI's error JSON) in
the trailers, after the body the transcoder wrote from its status: no
REST client got them as headers, over HTTP/1.1 (a content-length, so no
trailers) or HTTP/2 (tests/integration/test_edge_error_trailers.py). Every
trailer but gRPC's own status fields becomes a header, as a trailers-only
error's would have; the filters after this one then see the REST status
and OpenAI JSON the service asked for.

A REST answer's headers lose gRPC's protocol fields: the transcoder merges a
unary answer's trailers into its headers, so every 200 (and the jobs
service's 202 to `Prefer: respond-async`) showed `grpc-status: 0` and an
empty `grpc-message` to REST clients, details of the mesh's gRPC hop (a REST
error carries none: the transcoder made its status and body of them); and
every REST and OpenAI answer, streams included, passed on the service's
`grpc-accept-encoding` (the compressions its gRPC server reads, which a REST
client cannot use). gRPC reserves the `grpc-` prefix for its own protocol
(no service metadata has it), so each of its response fields goes
(GRPC_PROTOCOL_HEADERS). gRPC answers keep them all, and a stream's trailers
keep its status (its only end-of-stream status).
"""

from __future__ import annotations

import functools

from gateway import protos
from services.core import contract

# Where the request filter marks a unary gRPC call (the stream's dynamic metadata).
MARK_NAMESPACE = "tokenmesh.unary"


@functools.cache
def unary_grpc_paths() -> tuple[str, ...]:
    """Returns the paths of every tokenmesh gRPC method that answers once."""
    paths = []
    for module in protos.stub_modules("*_service_pb2.py"):
        for service in module.DESCRIPTOR.services_by_name.values():
            paths += [
                f"/{service.full_name}/{method.name}"
                for method in service.methods
                if not method.server_streaming
            ]
    return tuple(paths)


def request_lua_function() -> str:
    """Lua: `mark_unary_grpc(handle, path)`, with the unary methods' paths."""
    entries = "".join(f'  ["{path}"] = true,\n' for path in unary_grpc_paths())
    return f"""
local UNARY_GRPC_PATHS = {{
{entries}}}

local function mark_unary_grpc(handle, path)
  if UNARY_GRPC_PATHS[path] then
    handle:streamInfo():dynamicMetadata():set("{MARK_NAMESPACE}", "unary", true)
  end
end
"""


# A transcoded error's trailers that are no metadata of the service's: the
# transcoder made the status and the JSON body of them.
GRPC_STATUS_TRAILERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")
# Every response field of gRPC's protocol (grpc/doc/PROTOCOL-HTTP2.md): the status and
# the message compression a gRPC server sends. None means anything to a REST client
# (a transcoded message is never compressed).
GRPC_PROTOCOL_HEADERS = (*GRPC_STATUS_TRAILERS, "grpc-encoding", "grpc-accept-encoding")
# Trailers of an error that never become headers: framing, hop-by-hop and
# entity fields, and those that act on the client (cookies, redirects, HSTS).
# Our services send none of them; this keeps it so whatever a handler sends.
NEVER_LIFTED = (
    *GRPC_STATUS_TRAILERS,
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "keep-alive",
    "location",
    "proxy-connection",
    "set-cookie",
    "strict-transport-security",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)
_NEVER_LIFTED_TABLE = "".join(f'  ["{name}"] = true,\n' for name in NEVER_LIFTED)

# A Lua function of the edge's response filter (gateway/edge_lua.py).
RESPONSE_LUA_FUNCTION = f"""
local RESPONSE_HEADERS = "{contract.RESPONSE_HEADERS_TRAILER}"
local GRPC_PROTOCOL_HEADERS = {{ {", ".join(f'"{n}"' for n in GRPC_PROTOCOL_HEADERS)} }}
local NEVER_LIFTED = {{
{_NEVER_LIFTED_TABLE}}}

local MONTHS = {{
  Jan = "01", Feb = "02", Mar = "03", Apr = "04", May = "05", Jun = "06",
  Jul = "07", Aug = "08", Sep = "09", Oct = "10", Nov = "11", Dec = "12",
}}

-- An IMF-fixdate ("Thu, 31 Dec 2099 00:00:00 GMT", RFC 8594's Sunset) as a key that
-- sorts by time ("20991231000000"); nil if it is none.
local function http_date_key(value)
  local day, month, year, hour, minute, second = string.match(
    value, "^%a%a%a, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  if day == nil or MONTHS[month] == nil then
    return nil
  end
  return year .. MONTHS[month] .. day .. hour .. minute .. second
end

-- RFC 9745's Deprecation ("@<unix seconds>") as a number; nil if it is none.
local function structured_date_key(value)
  return tonumber(string.match(value, "^@(%d+)$"))
end

-- The headers that may come from both the service and the route, and how to order them.
local RETIREMENT_KEYS = {{
  ["deprecation"] = structured_date_key,
  ["sunset"] = http_date_key,
}}

-- Leaves one value of each retirement header, the earliest (all of them if one
-- cannot be read: nothing is lost).
local function keep_earliest_retirement(headers)
  for name, key_of in pairs(RETIREMENT_KEYS) do
    local count = headers:getNumValues(name)
    if count > 1 then
      local earliest, earliest_key = nil, nil
      for index = 0, count - 1 do
        local value = headers:getAtIndex(name, index)
        local key = key_of(value)
        if key == nil then
          earliest = nil
          break
        end
        if earliest_key == nil or key < earliest_key then
          earliest, earliest_key = value, key
        end
      end
      if earliest ~= nil then
        headers:replace(name, earliest)
      end
    end
  end
end

-- Returns whether the answer is whole at once (a unary one), and whether it is a
-- REST error: a transcoded error's trailers, if any, are its metadata whose
-- headers went first (Envoy's own replies have none).
local function answers_once(handle, headers)
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    local mark = handle:streamInfo():dynamicMetadata():get("{MARK_NAMESPACE}")
    return mark ~= nil and mark["unary"] == true, false
  end
  if headers:get("grpc-status") ~= nil then
    return true, false
  end
  local failed = (tonumber(headers:get(":status")) or 0) >= 400
  return failed, failed
end

-- Moves a trailer into the headers (all its values), unless the edge set that header
-- (the retirement headers join the edge's: keep_earliest_retirement picks one; the
-- service's request id replaces the edge's, which the edge adds to every answer that
-- has none when its headers come).
-- Returns whether it lifted a retirement header.
local function lift_trailer(headers, trailers, name)
  local retirement = RETIREMENT_KEYS[name] ~= nil
  if name == "x-request-id" then
    headers:remove(name)
  end
  if retirement or headers:get(name) == nil then
    for index = 0, trailers:getNumValues(name) - 1 do
      headers:add(name, trailers:getAtIndex(name, index))
    end
  end
  trailers:remove(name)
  return retirement
end

-- Returns whether it waited for the body (the caller's header object is then stale)
-- and whether the headers may now hold two retirement values: always when they
-- came first (a stream's, an answer's sent early: a route's values join them), for
-- a whole answer only when it lifted one (most lifted none: no lookup for them).
local function lift_trailers(handle, headers)
  if headers:get(RESPONSE_HEADERS) ~= nil then
    headers:remove(RESPONSE_HEADERS)
    return false, true
  end
  local whole, failed = answers_once(handle, headers)
  if not whole then
    return false, true
  end
  handle:body()
  local trailers = handle:trailers()
  if trailers == nil then
    return true, true  -- trailers-only (an error): its metadata is in the headers
  end
  headers = handle:headers()
  local retired = false
  local names = trailers:get(RESPONSE_HEADERS)
  if names ~= nil then
    trailers:remove(RESPONSE_HEADERS)
    for name in string.gmatch(names, "[^,]+") do
      retired = lift_trailer(headers, trailers, name) or retired
    end
  end
  if failed then
    local metadata = {{}}
    for name, _ in pairs(trailers) do
      local envoys = string.find(name, "x-envoy-", 1, true) == 1
      if not NEVER_LIFTED[name] and not envoys and string.sub(name, 1, 1) ~= ":" then
        metadata[#metadata + 1] = name
      end
    end
    for _, name in ipairs(metadata) do
      retired = lift_trailer(headers, trailers, name) or retired
    end
  end
  return true, retired
end

-- A REST answer's gRPC protocol headers (the status the transcoder put in a unary
-- answer's headers, the service's grpc-accept-encoding on every answer) are the
-- mesh's: a REST client gets the HTTP status and the body. A gRPC answer keeps them.
local function drop_grpc_protocol_headers(headers)
  headers:remove("{contract.QUOTA_SUBJECT_HEADER}")  -- the REST JSON's, read by now
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    return
  end
  for _, name in ipairs(GRPC_PROTOCOL_HEADERS) do
    headers:remove(name)
  end
end

-- An event stream must reach the client as it is written: no cache may keep it, and
-- no proxy in front of the edge (nginx, an ingress) may buffer it until it ends.
local function mark_event_stream(headers)
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "text/event-stream", 1, true) == 1 then
    headers:replace("cache-control", "no-cache")
    headers:replace("x-accel-buffering", "no")
  end
end

-- Lifts a unary answer's headers out of its trailers, then leaves one Deprecation and
-- one Sunset. Returns whether it waited for the body (the caller's headers are stale).
local function lift_response_headers(handle, headers)
  local waited, retired = lift_trailers(handle, headers)
  if retired then
    keep_earliest_retirement(waited and handle:headers() or headers)
  end
  return waited
end
"""
