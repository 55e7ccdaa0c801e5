"""Refuses an API key sent in a URL, before anything logs or traces it.

The transcoder binds query parameters to request fields, so `POST
/v1/auth/token?api_key=tm_...` was a working way to send a key (`IssueTokenRequest.
api_key`). A URL is not a place for a secret: the edge's access log wrote it
(`grpc_path`, for a request the transcoder did not rewrite: a wrong verb, an unknown
parameter, any route given `?api_key=`), and the edge's trace span exported it as
`http.url` (built from the original path, query and all) to the tracing backend,
for every such request, answered or not. A key in the path does the same: a client
that gives the key itself where its id goes (`POST /v1/auth/keys/tm_...:revoke`)
wrote a live key to the access log's `path`.

So the edge's first Lua pass answers such a request 400 itself, after taking the
query off its `:path` and the key out of its path: the span and the access log see
the route alone. A native gRPC call (which reads no field from a query) goes on
without its query. The parameter is matched as the transcoder reads it (`api_key`,
its JSON name `apiKey`, any case, any character percent-encoded); a value of any
parameter, or a part of the path, shaped as an API key is (`tm_` and the 43
characters services.auth.crypto.new_api_key makes, percent-encoded or not).
"""

from __future__ import annotations

QUERY_MESSAGE = (
    "an API key goes in a header (x-api-key, Authorization: Bearer) or the request "
    "body, never the URL: the query names api_key"
)
URL_MESSAGE = (
    "an API key goes in a header (x-api-key, Authorization: Bearer) or the request "
    "body, never the URL: the URL holds one (a key's id is key_..., not its secret)"
)
# services.auth.crypto: `tm_` and secrets.token_urlsafe(32), 43 characters.
KEY_CHARACTERS = 43
# What the path holds in the key's place once it is taken out.
REDACTED = "tm_REDACTED"
# A Lua function of the edge's request filter (gateway/edge_lua.py).
LUA_FUNCTION = f"""
local URL_KEY_MESSAGES = {{query = "{QUERY_MESSAGE}", url = "{URL_MESSAGE}"}}
-- A key alone, not part of a longer word: "tm_" and {KEY_CHARACTERS} URL-safe characters.
local URL_KEY_SHAPE = "%f[%w_%-]tm_" .. string.rep("[%w_%-]", {KEY_CHARACTERS}) .. "%f[^%w_%-]"
local function percent_decoded(text)
  -- As the transcoder reads a URL (`%61pi_key` is `api_key`).
  return (string.gsub(text, "%%(%x%x)", function(hex)
    return string.char(tonumber(hex, 16))
  end))
end
local function names_api_key(query)
  return string.find("&" .. string.lower(percent_decoded(query)), "&api_?key=") ~= nil
end
local function holds_key(text)
  -- Cheap first: most URLs hold neither a `tm_` nor a percent sign.
  if not string.find(text, "tm_", 1, true) and not string.find(text, "%", 1, true) then
    return false
  end
  return string.find(percent_decoded(text), URL_KEY_SHAPE) ~= nil
end
local function without_key(route)
  -- The route decoded, its key replaced, encoded again: a valid path that still
  -- says which route was asked for.
  local redacted = string.gsub(percent_decoded(route), URL_KEY_SHAPE, "{REDACTED}")
  return (string.gsub(redacted, "[^%w%-%._~/:@!$&'()*+,;=]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end
local function refuse_key_in_url(handle, headers, path)
  path = path or ""
  local at = string.find(path, "?", 1, true)
  local route = at and string.sub(path, 1, at - 1) or path
  local query = at and string.sub(path, at + 1) or ""
  local named = at ~= nil and names_api_key(query)
  local in_route = holds_key(route)
  if not named and not in_route and not (at ~= nil and holds_key(query)) then
    return false
  end
  headers:replace(":path", in_route and without_key(route) or route)
  -- Native gRPC reads no field from a query: it goes on without it (a local reply
  -- to it would be a gRPC INTERNAL, Envoy's mapping of a 400). No method's name is
  -- a key: one there goes on to UNIMPLEMENTED, without it.
  if is_native_grpc(headers) then  -- gateway/request_body.py's
    return false
  end
  -- A local reply: the edge's mappers give it the REST or OpenAI error shape.
  handle:respond({{[":status"] = "400"}}, URL_KEY_MESSAGES[named and "query" or "url"])
  return true
end
"""
