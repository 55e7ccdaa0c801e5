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

One pass over the request's header names in Lua: no body, no buffering.
"""

from __future__ import annotations

from typing import Any

FILTER_NAME = "tokenmesh.grpc_header_names"
# A Lua function of the edge's request filter (gateway/edge_lua.py) and of this one.
LUA_FUNCTION = """
local function drop_client_headers(headers)
  local dropped = {}
  for key, _ in pairs(headers) do
    if string.sub(key, 1, 1) ~= ":"
      and (string.find(key, "[^0-9a-z_.%-]") or string.sub(key, 1, 12) == "x-tokenmesh-") then
      dropped[#dropped + 1] = key
    end
  end
  for _, key in ipairs(dropped) do
    headers:remove(key)
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
