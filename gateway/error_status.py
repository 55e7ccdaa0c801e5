"""The REST status a service asks for on an error response.

The transcoder maps a gRPC code to one HTTP status (UNIMPLEMENTED -> 501).
Where REST needs another one for the same code (410 Gone for an API version
past its sunset), the service says so in `contract.HTTP_STATUS_HEADER` on its
error response. This Lua filter sits before the transcoder, so on the way
back it sees the transcoded REST response: it applies the status there, and
removes the header from every response (gRPC clients keep the gRPC code).
One success status is applied too: 202 Accepted on a 200, for a request
handed over to a job (`Prefer: respond-async`, services/jobs/handover.py).

It reads response headers only (no body, no buffering), so a stream's
success path costs one header lookup.
"""

from __future__ import annotations

from typing import Any

from services.core import contract

# Only a transcoded response (not gRPC) is changed: an error (status >= 400) to
# a 4xx or 5xx status, or a 200 to 202.
# A Lua function of the edge's response filter (gateway/edge_lua.py) and of this one.
LUA_FUNCTION = f"""
local HTTP_STATUS_HEADER = "{contract.HTTP_STATUS_HEADER}"

local function apply_error_status(headers)
  local wanted = headers:get(HTTP_STATUS_HEADER)
  if wanted == nil then
    return
  end
  headers:remove(HTTP_STATUS_HEADER)
  local content_type = headers:get("content-type") or ""
  local status = tonumber(headers:get(":status")) or 0
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    return
  end
  if (status >= 400 and string.match(wanted, "^[45]%d%d$"))
      or (status == 200 and wanted == "202") then
    headers:replace(":status", wanted)
  end
end
"""
LUA_SOURCE = (
    LUA_FUNCTION
    + """
function envoy_on_response(handle)
  apply_error_status(handle:headers())
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the filter that applies a service's REST status to its error responses."""
    return {
        "name": "tokenmesh.error_status",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }
