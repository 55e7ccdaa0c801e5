"""Refuses an API key sent in a URL's query string, before anything logs or traces it.

The transcoder binds query parameters to request fields, so `POST
/v1/auth/token?api_key=tm_...` was a working way to send a key (`IssueTokenRequest.
api_key`). A URL is not a place for a secret: the edge's access log wrote it
(`grpc_path`, for a request the transcoder did not rewrite: a wrong verb, an unknown
parameter, any route given `?api_key=`), and the edge's trace span exported it as
`http.url` (built from the original path, query and all) to the tracing backend,
for every such request, answered or not.

So the edge's first Lua pass answers such a request 400 itself, after taking the
query off its `:path`: the span and the access log then see the path alone. A
native gRPC call (which reads no field from a query) goes on without its query. The
parameter is matched as the transcoder reads it (`api_key`, its JSON name `apiKey`,
any case, any character percent-encoded).
"""

from __future__ import annotations

MESSAGE = (
    "an API key goes in a header (x-api-key, Authorization: Bearer) or the request "
    "body, never the URL: the query names api_key"
)
# A Lua function of the edge's request filter (gateway/edge_lua.py).
LUA_FUNCTION = f"""
local URL_KEY_MESSAGE = "{MESSAGE}"
local function names_api_key(query)
  -- As the transcoder reads the names: percent-decoded (`%61pi_key` is `api_key`).
  local decoded = string.gsub(query, "%%(%x%x)", function(hex)
    return string.char(tonumber(hex, 16))
  end)
  return string.find("&" .. string.lower(decoded), "&api_?key=") ~= nil
end
local function refuse_key_in_url(handle, headers, path)
  local at = string.find(path or "", "?", 1, true)
  if at == nil or not names_api_key(string.sub(path, at + 1)) then
    return false
  end
  headers:replace(":path", string.sub(path, 1, at - 1))
  -- Native gRPC reads no field from a query: it goes on without it (a local reply
  -- to it would be a gRPC INTERNAL, Envoy's mapping of a 400).
  if is_native_grpc(headers) then  -- gateway/request_body.py's
    return false
  end
  -- A local reply: the edge's mappers give it the REST or OpenAI error shape.
  handle:respond({{[":status"] = "400"}}, URL_KEY_MESSAGE)
  return true
end
"""
