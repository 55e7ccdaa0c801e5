"""gRPC health at the edge (`grpc.health.v1.Health/Check`, service ""), mirroring `/healthz`.

`GET /healthz` is Envoy's health-check filter: 200 only while every upstream
cluster has a healthy host. A gRPC health answer needs a real
`HealthCheckResponse` message, which no Envoy local reply can carry (for a
gRPC request Envoy sends a trailers-only response, and a Lua or direct
response body is dropped), so the edge's own condition gates the call instead:

- a Lua filter asks this edge's `/healthz` over loopback (the very filter and
  cluster health that answer `/healthz`, no copy of its rule);
- 503 there: the call ends here, UNAVAILABLE, with a message saying why;
- 200: the call goes on to a worker, which answers SERVING as before.

Only service "" is gated. A named service (e.g.
`tokenmesh.inference.v1.InferenceService`) still goes to a worker and gets
that worker's answer for the service, as it always did.
"""

from __future__ import annotations

from typing import Any

HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
# The cluster through which the filter reaches this edge's own plaintext listener.
SELF_CLUSTER = "edge_self"
HEALTHZ_PATH = "/healthz"
# How long the loopback /healthz may take (Envoy answers it in memory).
HEALTHZ_TIMEOUT_MS = 1000
# What a gRPC client reads when the edge is not ready.
NOT_READY_MESSAGE = "edge not ready: an upstream has no healthy host (GET /healthz is 503)"
UNAVAILABLE = 14

# A HealthCheckRequest is one gRPC frame: a 5-byte prefix (flag 0: not
# compressed) and the message. Service "" is an empty message (or field 1
# written with length 0). Anything else, compressed or not readable here, is
# left to the worker as before.
# Lua functions of the edge's request filter (gateway/edge_lua.py) and of this one.
LUA_FUNCTION = f"""
local HEALTH_CHECK_PATH = "{HEALTH_CHECK_PATH}"

local function asks_for_the_whole_edge(bytes)
  if #bytes < 5 or string.byte(bytes, 1) ~= 0 then
    return false
  end
  local message = string.sub(bytes, 6)
  return message == "" or message == "\\10\\0"
end

-- Ends a Health/Check for service "" with UNAVAILABLE while /healthz is not 200.
local function gate_edge_health(handle)
  local body = handle:body()
  if body == nil or not asks_for_the_whole_edge(body:getBytes(0, body:length())) then
    return
  end
  local answer = handle:httpCall(
    "{SELF_CLUSTER}",
    {{[":method"] = "GET", [":path"] = "{HEALTHZ_PATH}", [":authority"] = "edge"}},
    "",
    {HEALTHZ_TIMEOUT_MS})
  if answer ~= nil and answer[":status"] == "200" then
    return
  end
  -- A 200 local reply keeps these: Envoy derives grpc-status from the HTTP
  -- status only when none is set, and an error status would get a JSON body
  -- from local_reply_config as its grpc-message.
  handle:respond({{
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = "{UNAVAILABLE}",
    ["grpc-message"] = "{NOT_READY_MESSAGE}",
  }}, "")
end
"""
LUA_SOURCE = (
    LUA_FUNCTION
    + """
function envoy_on_request(handle)
  if handle:headers():get(":path") == HEALTH_CHECK_PATH then
    gate_edge_health(handle)
  end
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the filter that answers Health/Check for service "" as `/healthz` does."""
    return {
        "name": "tokenmesh.edge_health",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }
