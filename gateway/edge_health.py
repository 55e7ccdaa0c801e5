"""gRPC health at the edge (`grpc.health.v1.Health/Check`), mirroring `/healthz`.

`GET /healthz` is Envoy's health-check filter: 200 only while every upstream
cluster has a healthy host. A gRPC health answer needs a real
`HealthCheckResponse` message, which no Envoy local reply can carry (for a
gRPC request Envoy sends a trailers-only response, and a Lua or direct
response body is dropped), so the edge's own condition gates the call instead:

- a Lua filter asks this edge's `/healthz` over loopback (the very filter and
  cluster health that answer `/healthz`, no copy of its rule);
- 503 there: the call ends here, UNAVAILABLE, with a message saying why;
- 200: the call goes on to a worker, which answers SERVING as before.

That is service "". The route is public (no credential), so the only other
names that reach a worker are the workers' public service names
(`WORKER_SERVICES`, e.g. `tokenmesh.inference.v1.InferenceService`), which
get that worker's answer as before. Every other name ends here as NOT_FOUND,
what a worker answers for a name it does not serve: a worker's per-version
names (`<service>/<model>/<version>`, what Envoy's own health checks ask the
workers directly) would tell anyone which model versions exist and whether
they are ready. A request this filter cannot read (compressed, malformed)
ends here too, INVALID_ARGUMENT, so no name slips past it unread.
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
UNREADABLE_MESSAGE = "the edge reads only an uncompressed HealthCheckRequest"
UNAVAILABLE = 14
NOT_FOUND = 5
INVALID_ARGUMENT = 3
#: The named services a public Health/Check may ask the workers about: the
#: public services every worker serves (services/inference/service.py
#: `service_names`, less the admin one), whose answer says only that some
#: worker serves. Never a per-version name (gateway/model_routing.py
#: `model_health_name`).
WORKER_SERVICES = (
    "tokenmesh.inference.v1.InferenceService",
    "tokenmesh.inference.v2.InferenceService",
    "tokenmesh.openai.v1.OpenAIService",
)

# A HealthCheckRequest is one gRPC frame: a 5-byte prefix (flag 0: not
# compressed, then the message's length) and the message, whose only field is
# 1, `service` (tag 10, a varint length, the bytes). Service "" is an empty
# message or field 1 with length 0; a repeated field 1 counts as its last copy
# (protobuf's rule, what a worker would read).
# Lua functions of the edge's request filter (gateway/edge_lua.py) and of this one.
_LUA_NAMES = ", ".join(f'["{name}"] = true' for name in WORKER_SERVICES)
LUA_FUNCTION = f"""
local HEALTH_CHECK_PATH = "{HEALTH_CHECK_PATH}"
local WORKER_SERVICES = {{{_LUA_NAMES}}}

-- Returns the varint at `at` and the index after it (nil: cut short or over 28 bits,
-- longer than any request body the edge takes).
local function read_varint(bytes, at)
  local value, scale = 0, 1
  for i = at, math.min(at + 3, #bytes) do
    local byte = string.byte(bytes, i)
    value = value + (byte % 128) * scale
    if byte < 128 then
      return value, i + 1
    end
    scale = scale * 128
  end
  return nil
end

-- Returns the service a Health/Check request body asks for; nil when it is not
-- one uncompressed HealthCheckRequest frame holding nothing but field 1.
local function requested_service(bytes)
  if #bytes < 5 or string.byte(bytes, 1) ~= 0 then
    return nil
  end
  local b2, b3, b4, b5 = string.byte(bytes, 2, 5)
  if ((b2 * 256 + b3) * 256 + b4) * 256 + b5 ~= #bytes - 5 then
    return nil
  end
  local service, at = "", 6
  while at <= #bytes do
    if string.byte(bytes, at) ~= 10 then
      return nil
    end
    local length, start = read_varint(bytes, at + 1)
    if length == nil or start + length - 1 > #bytes then
      return nil
    end
    service = string.sub(bytes, start, start + length - 1)
    at = start + length
  end
  return service
end

-- A 200 local reply keeps grpc-status: Envoy derives grpc-status from the HTTP
-- status only when none is set, and an error status would get a JSON body
-- from local_reply_config as its grpc-message.
local function grpc_reply(handle, status, message)
  local headers = {{
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = status,
  }}
  if message ~= nil then
    headers["grpc-message"] = message
  end
  handle:respond(headers, "")
end

-- Service "": UNAVAILABLE while /healthz is not 200, else on to a worker.
-- A public worker service name: on to a worker. Any other name: NOT_FOUND here,
-- with no message, as a worker answers a name it does not serve.
local function gate_edge_health(handle)
  local body = handle:body()
  local service = nil
  if body ~= nil then
    service = requested_service(body:getBytes(0, body:length()))
  end
  if service == nil then
    grpc_reply(handle, "{INVALID_ARGUMENT}", "{UNREADABLE_MESSAGE}")
    return
  end
  if WORKER_SERVICES[service] then
    return
  end
  if service ~= "" then
    grpc_reply(handle, "{NOT_FOUND}", nil)
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
  grpc_reply(handle, "{UNAVAILABLE}", "{NOT_READY_MESSAGE}")
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
    """Builds the filter that answers Health/Check for service "" as `/healthz` does
    (and NOT_FOUND for any name but `WORKER_SERVICES`)."""
    return {
        "name": "tokenmesh.edge_health",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }
