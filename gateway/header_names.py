"""Drops request headers whose names gRPC cannot carry, before anything forwards them.

HTTP/1.1 allows header names such as `a$b` or `+h` (any token character);
gRPC metadata keys allow only `0-9 a-z _ . -`. Envoy forwarded such a header
to the upstream gRPC server, whose gRPC core refused the whole call:
`500 {"code":13,"message":"Illegal header key: +h"}` on every REST route
(found by schemathesis, tests/e2e/test_openapi.py). The header means nothing
to any service, so it is removed; the request goes on. (Names with `_` never
get here: the connection manager rejects them.)

The same pass drops every `x-tokenmesh-*` header a client sent: only the edge
sets them (its filters after this one), and no service may read a client's copy.
The edge's first filter removes the ones it sets by name (identity, routing,
shadow); a name missing from that list (a response header's, one a later release
adds) reached the services from any client, as if the edge had set it.

And it drops the gRPC protocol headers a REST client sent (`grpc-timeout`,
`grpc-encoding`, any `grpc-*`: the transcoder makes the gRPC call, not the
client), and a native gRPC call's `grpc-timeout` that the gRPC spec does not
allow, or a `grpc-encoding` the workers' gRPC does not decode (identity, gzip,
deflate). Forwarded, `grpc-timeout: garbage` on one REST request
answered `500 Error parsing 'grpc-timeout' metadata` and left the edge's
connection to that worker failing every later call that had a deadline (grpc
core's header table kept the bad entry), for every tenant.

The same pass writes an `Authorization` scheme of any case (`bearer`, `BEARER`)
as `Bearer`: auth schemes are case-insensitive (RFC 9110), and the JWT filter
matches `Bearer ` only, so a JWT sent as `bearer <jwt>` was refused 401 while an
API key so sent was accepted.

One pass over the request's header names in Lua: no body, no buffering.
"""

from __future__ import annotations

from typing import Any

FILTER_NAME = "tokenmesh.grpc_header_names"
# A Lua function of the edge's request filter (gateway/edge_lua.py) and of this one.
LUA_FUNCTION = """
local GRPC_ENCODINGS = {identity = true, gzip = true, deflate = true}
local function bad_grpc_header(key, value, grpc)
  if string.sub(key, 1, 5) ~= "grpc-" then return false end
  if not grpc then return true end
  if key == "grpc-timeout" then
    return not string.match(value, "^%d%d?%d?%d?%d?%d?%d?%d?[HMSmun]$")
  end
  if key == "grpc-encoding" then return not GRPC_ENCODINGS[value] end
  return false
end
local function drop_client_headers(headers)
  local content_type = headers:get("content-type") or ""
  local grpc = string.sub(content_type, 1, 16) == "application/grpc"
  local dropped = {}
  local bearer = nil
  for key, value in pairs(headers) do
    if string.sub(key, 1, 1) ~= ":"
      and (string.find(key, "[^0-9a-z_.%-]") or string.sub(key, 1, 12) == "x-tokenmesh-"
           or bad_grpc_header(key, value, grpc)) then
      dropped[#dropped + 1] = key
    elseif key == "authorization" and string.lower(string.sub(value, 1, 7)) == "bearer "
        and string.sub(value, 1, 7) ~= "Bearer " then
      bearer = "Bearer " .. string.sub(value, 8)
    end
  end
  for _, key in ipairs(dropped) do
    headers:remove(key)
  end
  -- An auth scheme is case-insensitive (RFC 9110): the JWT filter reads "Bearer "
  -- only, and a JWT sent as "bearer <jwt>" was refused 401 (an API key was not).
  if bearer ~= nil then
    headers:replace("authorization", bearer)
  end
end
"""
LUA_SOURCE = (
    LUA_FUNCTION
    + """
function envoy_on_request(handle)
  drop_client_headers(handle:headers())
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the filter that removes request headers gRPC metadata cannot hold, and a
    client's `x-tokenmesh-*` headers."""
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }
