"""Drops request headers whose names gRPC cannot carry, before anything forwards them.

HTTP/1.1 allows header names such as `a$b` or `+h` (any token character);
gRPC metadata keys allow only `0-9 a-z _ . -`. Envoy forwarded such a header
to the upstream gRPC server, whose gRPC core refused the whole call:
`500 {"code":13,"message":"Illegal header key: +h"}` on every REST route
(found by schemathesis, tests/e2e/test_openapi.py). The header means nothing
to any service, so it is removed; the request goes on. (Names with `_` never
get here: the connection manager rejects them.)

One pass over the request's header names in Lua: no body, no buffering.
"""

from __future__ import annotations

from typing import Any

FILTER_NAME = "tokenmesh.grpc_header_names"
# A Lua function of the edge's request filter (gateway/edge_lua.py) and of this one.
LUA_FUNCTION = """
local function drop_illegal_header_names(headers)
  local illegal = {}
  for key, _ in pairs(headers) do
    if string.sub(key, 1, 1) ~= ":" and string.find(key, "[^0-9a-z_.%-]") then
      illegal[#illegal + 1] = key
    end
  end
  for _, key in ipairs(illegal) do
    headers:remove(key)
  end
end
"""
LUA_SOURCE = (
    LUA_FUNCTION
    + """
function envoy_on_request(handle)
  drop_illegal_header_names(handle:headers())
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the filter that removes request headers gRPC metadata cannot hold."""
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }
