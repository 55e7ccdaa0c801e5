"""A per-Envoy-worker cache of verified API keys and JWT keys: one auth callout per key and worker.

Without it every API-key request paid a Python ext_authz callout (~1.9 ms
more than a JWT request, whose signature Envoy checks in C++). This Lua
filter sits between `jwt_authn` and `ext_authz`:

- a request with a verified JWT, or whose API key this worker thread saw
  verified recently, is marked in dynamic metadata (`NAMESPACE.authenticated`)
  and ext_authz skips it (its `filter_enabled_metadata`); for a cached key
  the filter sets the identity headers the auth service returned for it;
- a verified JWT whose key and secret (`sub`, `sid`) this worker thread has not
  seen stand within the bound is also marked `NAMESPACE.jwt_check`: the JWT key
  check (edge_auth.jwt_key_check_filter, an ext_authz that lets the request
  through when the auth service cannot answer) asks whether the key is still
  active and the secret not rotated out, and its answer is kept here like a
  key's (without identity: the token's own claims set those headers). Before
  it, a JWT outlived its key's revocation until its `exp` (15 minutes by
  default, up to a day);
- any other request goes to ext_authz as before. When the auth service
  allows an API key it also returns the identity headers and how long they
  may be reused (`cache_ms`) as dynamic metadata; on the response path this
  filter stores them under the SHA-256 of the key (the key itself is not
  kept), per worker thread.

Security:
- Only allowed keys are cached. A refused, unknown or malformed key is never
  cached: every such request asks the auth service (which throttles failures).
- A revoked key stops within `REVOCATION_BOUND_MS`: the auth service's
  `cache_ms` is what is left of that bound since it last read the key from
  Redis (services/auth/authenticator.py), counted here from the moment the
  request that filled the entry arrived; it is capped at the bound again here.
- The credential is read exactly as the auth service reads it (`x-api-key`,
  else an `Authorization: Bearer` token, trimmed), so an entry can only be
  used by a request the auth service would have answered the same way.
- Identity headers are still set only by the edge: client copies are
  stripped first (edge_auth.strip_headers_filter), this filter or ext_authz
  set them, RBAC checks each RPC's scope against them as before.
- At most `MAX_ENTRIES` keys per worker thread; when full the table starts
  over (a refill costs one callout per key).
- A JWT entry says only that its key and secret stood (or did not: REFUSED,
  kept REFUSED_MS); the identity headers of a JWT request are always its own
  verified claims. The JWT key check is open (an auth outage must not stop
  JWTs): its timeouts and errors let requests through unchecked (alert
  TokenmeshJwtKeyChecksFailingOpen), its "no" is final.

The filter is off on public routes (nothing to authenticate there).
"""

from __future__ import annotations

from typing import Any

FILTER_NAME = "tokenmesh.key_cache"
# Dynamic metadata: this filter's (authenticated, digest, asked_at) and ext_authz's
# answer (identity headers and cache_ms, services/auth/ext_authz.py).
NAMESPACE = FILTER_NAME
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "jwt_payload"
AUTHENTICATED = "authenticated"
JWT_CHECK = "jwt_check"
# The JWT key check's ext_authz filter (Envoy writes its answer's metadata under
# EXT_AUTHZ_NAMESPACE, whatever the filter's name).
JWT_KEY_CHECK_FILTER = "tokenmesh.jwt_key_check"
# Its "no" (the key revoked or expired, the secret rotated out: for good), kept this
# long: the key's requests then go to the API-key ext_authz, which is closed, and
# never ask the open check again (a flood of them slowed the auth service past the
# check's timeout, and each check that timed out let its request through).
REFUSED = "refused"
REFUSED_MS = 60_000
IDENTITY = "identity"
CACHE_MS = "cache_ms"
# A revoked key is refused everywhere within this (docs/security.md).
REVOCATION_BOUND_MS = 5000
MAX_ENTRIES = 10_000
# services.auth.crypto.looks_like_api_key, which the auth service applies too.
API_KEY_PREFIX = "tm_"
API_KEY_LENGTHS = (40, 64)

# SHA-256 (FIPS 180-4) in LuaJIT's bit operations: Envoy's Lua offers no hash.
# Sums wrap with bit.tobit (exact: every sum stays far below 2^51).
SHA256_LUA = """
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local ror, rshift, lshift, tobit, tohex = bit.ror, bit.rshift, bit.lshift, bit.tobit, bit.tohex
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end

local function sha256_hex(message)
  local bits = #message * 8
  local padded = message .. "\\128" .. string.rep("\\0", (55 - #message) % 64)
    .. string.char(0, 0, 0, 0,
      band(rshift(bits, 24), 255), band(rshift(bits, 16), 255),
      band(rshift(bits, 8), 255), band(bits, 255))
  local h = {
    tobit(0x6a09e667), tobit(0xbb67ae85), tobit(0x3c6ef372), tobit(0xa54ff53a),
    tobit(0x510e527f), tobit(0x9b05688c), tobit(0x1f83d9ab), tobit(0x5be0cd19),
  }
  local w = {}
  for chunk = 1, #padded, 64 do
    for i = 0, 15 do
      local a, b, c, d = string.byte(padded, chunk + i * 4, chunk + i * 4 + 3)
      w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for i = 16, 63 do
      local v15, v2 = w[i - 15], w[i - 2]
      local s0 = bxor(ror(v15, 7), ror(v15, 18), rshift(v15, 3))
      local s1 = bxor(ror(v2, 17), ror(v2, 19), rshift(v2, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, hh = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
    for i = 0, 63 do
      local s1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = tobit(hh + s1 + ch + K[i + 1] + w[i])
      local s0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      hh, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + s0 + maj)
    end
    h[1], h[2], h[3], h[4] = tobit(h[1] + a), tobit(h[2] + b), tobit(h[3] + c), tobit(h[4] + d)
    h[5], h[6], h[7], h[8] = tobit(h[5] + e), tobit(h[6] + f), tobit(h[7] + g), tobit(h[8] + hh)
  end
  return tohex(h[1]) .. tohex(h[2]) .. tohex(h[3]) .. tohex(h[4])
    .. tohex(h[5]) .. tohex(h[6]) .. tohex(h[7]) .. tohex(h[8])
end
"""

LUA_SOURCE = (
    SHA256_LUA
    + f"""
local NAMESPACE = "{NAMESPACE}"
local EXT_AUTHZ = "{EXT_AUTHZ_NAMESPACE}"
local REFUSED_MS = {REFUSED_MS}
local JWT = "{JWT_NAMESPACE}"
local BOUND_MS = {REVOCATION_BOUND_MS}
local MAX_ENTRIES = {MAX_ENTRIES}
local PREFIX = "{API_KEY_PREFIX}"
local SHORTEST, LONGEST = {API_KEY_LENGTHS[0]}, {API_KEY_LENGTHS[1]}

-- digest -> {{expires = ms, filled = ms, identity = {{header = value}}, refused = bool}},
-- per worker thread; a JWT's key and secret under "jwt <sub> <sid>" (identity empty;
-- refused: its key does not stand).
local entries, size = {{}}, 0

local function is_space(b)
  return b == 32 or (b >= 9 and b <= 13)
end

-- Trims ASCII whitespace, in one pass from each end: gsub("%s+$") tries the
-- pattern at every position, quadratic in a run of spaces, and one header of
-- ~55,000 spaces held an Envoy worker thread for seconds before any check.
local function trim(s)
  local first, last = 1, #s
  while first <= last and is_space(string.byte(s, first)) do first = first + 1 end
  while last >= first and is_space(string.byte(s, last)) do last = last - 1 end
  return string.sub(s, first, last)
end

-- The credential as services.auth.authenticator.credential reads it.
local function credential(headers)
  local key = trim(headers:get("x-api-key") or "")
  if key ~= "" then
    return key
  end
  local authorization = trim(headers:get("authorization") or "")
  local space = string.find(authorization, " ", 1, true)
  if space == nil or string.lower(string.sub(authorization, 1, space - 1)) ~= "bearer" then
    return nil
  end
  return trim(string.sub(authorization, space + 1))
end

local function looks_like_api_key(key)
  return key ~= nil and string.sub(key, 1, #PREFIX) == PREFIX
    and #key >= SHORTEST and #key <= LONGEST
end

-- Returns the fresh entry under `digest`, or nil (a stale one is dropped).
-- handle:timestamp() is the wall clock: one stepped back (NTP, a resumed VM)
-- would stretch every entry past the revocation bound, so an entry also ends
-- when the clock reads earlier than when it was filled.
local function fresh(digest, now)
  local entry = entries[digest]
  if entry ~= nil and entry.expires > now and now >= entry.filled then
    return entry
  end
  if entry ~= nil then
    entries[digest] = nil
    size = size - 1
  end
  return nil
end

-- Marks the request for the auth service's answer, kept on the way back.
local function ask(meta, digest, now)
  meta:set(NAMESPACE, "digest", digest)
  meta:set(NAMESPACE, "asked_at", now)
end

function envoy_on_request(handle)
  local meta = handle:streamInfo():dynamicMetadata()
  local jwt = meta:get(JWT)
  local payload = jwt ~= nil and jwt["{JWT_PAYLOAD}"] or nil
  if payload ~= nil then
    -- Verified in C++; its key may have been revoked (or its secret rotated out)
    -- since it was minted: asked once per key and secret within the bound.
    local digest = "jwt " .. tostring(payload.sub) .. " " .. tostring(payload.sid or "")
    local now = handle:timestamp()
    local entry = fresh(digest, now)
    if entry ~= nil and entry.refused then
      return -- the API-key ext_authz (closed) refuses it
    end
    if entry == nil then
      -- Asked for before marked authenticated: an error in between skips nothing.
      meta:set(NAMESPACE, "{JWT_CHECK}", true)
      ask(meta, digest, now)
    end
    meta:set(NAMESPACE, "{AUTHENTICATED}", true)
    return
  end
  local headers = handle:headers()
  local key = credential(headers)
  if not looks_like_api_key(key) then
    return
  end
  local digest = sha256_hex(key)
  local now = handle:timestamp()
  local entry = fresh(digest, now)
  if entry ~= nil then
    for name, value in pairs(entry.identity) do
      headers:replace(name, value)
    end
    meta:set(NAMESPACE, "{AUTHENTICATED}", true)
    return
  end
  ask(meta, digest, now)
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata()
  local mine = meta:get(NAMESPACE)
  if mine == nil or mine.digest == nil or mine.asked_at == nil then
    return
  end
  local verdict = meta:get(EXT_AUTHZ)
  if verdict == nil then
    return
  end
  local refused = verdict.{REFUSED} == true
  local ttl = refused and REFUSED_MS or math.min(tonumber(verdict.{CACHE_MS}) or 0, BOUND_MS)
  if ttl <= 0 or (not refused and type(verdict.{IDENTITY}) ~= "table") then
    return
  end
  local identity = {{}}
  for name, value in pairs(refused and {{}} or verdict.{IDENTITY}) do
    identity[name] = tostring(value)
  end
  if entries[mine.digest] == nil then
    if size >= MAX_ENTRIES then
      entries, size = {{}}, 0
    end
    size = size + 1
  end
  local asked = mine.asked_at
  entries[mine.digest] = {{
    expires = asked + ttl, filled = asked, identity = identity, refused = refused,
  }}
end
"""
)


def lua_filter() -> dict[str, Any]:
    """Builds the key-cache filter (between jwt_authn and ext_authz)."""
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_SOURCE},
        },
    }


def disabled() -> dict[str, Any]:
    """Per-route config that turns the filter off (public routes)."""
    return {
        FILTER_NAME: {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute",
            "disabled": True,
        }
    }


def jwt_check_enabled_metadata() -> dict[str, Any]:
    """The JWT key check's `filter_enabled_metadata`: runs when this filter asks for it."""
    return {
        "filter": NAMESPACE,
        "path": [{"key": JWT_CHECK}],
        "value": {"present_match": True},
    }


def ext_authz_enabled_metadata() -> dict[str, Any]:
    """ext_authz's `filter_enabled_metadata`: runs unless this filter authenticated the request."""
    return {
        "filter": NAMESPACE,
        "path": [{"key": AUTHENTICATED}],
        "value": {"present_match": True},
        "invert": True,
    }
