-- Copies an inference request's model and version into headers the routes match.
--
-- Runs after the transcoder, so REST and gRPC requests alike carry a gRPC
-- frame whose protobuf message has `model` as field 1 and `version` as
-- field 2 (GenerateRequest, CompleteRequest, EmbedRequest of inference v1
-- and v2, which kept v1's numbers for them). Only those fields, a
-- generation's `prompt` (field 3), a v2 chat's first message (field 4) and
-- a v2 `template` reference (field 5) are decoded; every other field is
-- skipped by its wire type. The walk reads a message as protobuf's parser
-- (upb, in the workers) does, or not at all: of a field given twice the last
-- counts (the first of a repeated one: a chat's first message), and a frame
-- the walk cannot read that way (a group, wire types 3 and 4, which upb skips
-- but a walk would have to match; wire types 6 and 7; a malformed varint, tag
-- or length; bytes past the frame) is refused with INVALID_ARGUMENT, as a
-- compressed one is: a crafted body whose model the edge misread took another
-- model's route and window while the worker served the one it parsed. The hex
-- of the template reference (requests
-- rendered by one template share its head, whatever their variables), else
-- of the prompt's (or first message's) first PREFIX_BYTES bytes goes into
-- x-tokenmesh-prefix, which the routes hash (bounded-load consistent
-- hashing) to pick the worker, unless the router pinned that head to a
-- worker (the route's metadata), or this Envoy thread has not seen the head
-- lately (then the route's next turn: see first_sighting).
-- OpenAI-surface requests carry JSON instead (see OPENAI below): their
-- top-level `model` is read the same way.

local ROUTED = {
  ["/tokenmesh.inference.v1.InferenceService/Generate"] = true,
  ["/tokenmesh.inference.v1.InferenceService/Complete"] = true,
  ["/tokenmesh.inference.v1.InferenceService/Embed"] = true,
  ["/tokenmesh.inference.v2.InferenceService/Generate"] = true,
  ["/tokenmesh.inference.v2.InferenceService/Complete"] = true,
  ["/tokenmesh.inference.v2.InferenceService/Embed"] = true,
}
-- Requests whose field 3 is a prompt (EmbedRequest's is its inputs).
local GENERATION = {
  ["/tokenmesh.inference.v1.InferenceService/Generate"] = true,
  ["/tokenmesh.inference.v1.InferenceService/Complete"] = true,
  ["/tokenmesh.inference.v2.InferenceService/Generate"] = true,
  ["/tokenmesh.inference.v2.InferenceService/Complete"] = true,
}
-- Requests whose field 4 is a conversation (v2 `messages`): without a prompt,
-- the head of the first message (its role and content, as encoded) is hashed.
-- Their field 5 is a template reference ("support@stable"), hashed first.
local CHAT = {
  ["/tokenmesh.inference.v2.InferenceService/Generate"] = true,
  ["/tokenmesh.inference.v2.InferenceService/Complete"] = true,
}
-- OpenAI-surface requests (tokenmesh.openai.v1) carry the client's JSON as a
-- google.api.HttpBody, whose field 2 is the raw body: `model` ("name", or
-- "name@version" to pin one) is read from its top-level members, and the head
-- of the member named here (`messages` or `prompt`, as the client wrote it)
-- is hashed like a prompt's; false: nothing to hash.
local OPENAI = {
  ["/tokenmesh.openai.v1.OpenAIService/CreateChatCompletion"] = "messages",
  ["/tokenmesh.openai.v1.OpenAIService/CreateCompletion"] = "prompt",
  ["/tokenmesh.openai.v1.OpenAIService/CreateEmbedding"] = false,
}
-- OpenAI model lookups (`GET /models/{id}`: field 1 of the request message,
-- "name" or "name@version"): routed like the model's requests, so an alias
-- resolves to its version as the routes resolve it (the worker knows no
-- aliases). Not the v1/v2 GetModel: it reports a version's state (LOADING,
-- FAILED), which the routes' healthy workers only would hide.
local MODEL_LOOKUPS = {
  ["/tokenmesh.openai.v1.OpenAIService/GetModel"] = true,
}
local PREFIX_BYTES = 64
-- COMPRESSED_REFUSAL and MALFORMED_REFUSAL (INVALID_ARGUMENT's message for a
-- compressed request message and for one the edge cannot read as the workers do)
-- and their *_DETAILS (grpc-status-details-bin) come first, from
-- gateway/model_routing.py.
-- The route metadata key of one cycle of weighted turns over the route's
-- workers (gateway/model_routing.py SPREAD_KEY; the pins' keys are hex, never this).
local SPREAD_KEY = "workers"
-- Heads this Envoy thread sent lately: two generations of up to SEEN_MAX heads
-- each (bounded memory; a head in use moves to the current one).
local SEEN_MAX = 4096
local seen, seen_before, seen_count = {}, {}, 0
-- Per model, the last turn an unseen head took.
local turns = {}

-- Returns true the first time this thread sees `prefix` (lately), and remembers it.
-- A head nobody sent is cached nowhere, so its place is a matter of load: the
-- route's turns (a round robin weighted by the workers' load-aware weights),
-- not where the hash points (a hash puts a handful of requests unevenly). Its
-- next requests follow the hash, which every thread and edge agrees on. The
-- cost: a head reused later whose first request went elsewhere misses the
-- cache once more, once per Envoy thread and edge.
local function first_sighting(prefix)
  if seen[prefix] then return false end
  local known = seen_before[prefix]
  if seen_count >= SEEN_MAX then
    seen_before, seen, seen_count = seen, {}, 0
  end
  seen[prefix] = true
  seen_count = seen_count + 1
  return not known
end

-- Returns the varint at position i (read up to position `stop`) and the position
-- after it; nil when malformed. Up to 10 bytes, as protobuf reads them: a uint64
-- at or past 2^63 and every negative int take 10 (a 9-byte cap stopped the walk
-- at a REST call's `"seed": "18446744073709551615"`, before the path's model,
-- which the transcoder writes last). Past 2^53 the value is approximate; only
-- tags and lengths (small) are used.
local function varint(s, i, stop)
  local result, scale = 0, 1
  while true do
    if i > stop or scale > 2 ^ 63 then return nil, i end
    local b = s:byte(i)
    result = result + (b % 128) * scale
    i = i + 1
    if b < 128 then return result, i end
    scale = scale * 128
  end
end

-- Calls visit(field, position, length) for each length-delimited field of the
-- message in `s`, which must be exactly one uncompressed gRPC frame; other fields
-- are skipped by their wire type. Returns false, having stopped, at anything
-- protobuf's parser (upb) would read otherwise or refuse: a tag of more than 5
-- bytes, past 2^32 or of field 0; a group (wire types 3 and 4: upb skips an
-- unknown one, and a model after it was read by the worker, not here); wire
-- types 6 and 7; a field past the frame's end; bytes after the frame (a unary
-- call has one message).
local function each_bytes_field(s, visit)
  if #s < 5 or s:byte(1) ~= 0 then return false end
  local stop = 5 + s:byte(2) * 16777216 + s:byte(3) * 65536 + s:byte(4) * 256 + s:byte(5)
  if stop ~= #s then return false end
  local i = 6
  while i <= stop do
    local key, value
    local start = i
    key, i = varint(s, i, stop)
    if key == nil or i - start > 5 or key >= 2 ^ 32 or key < 8 then return false end
    local field, wire = math.floor(key / 8), key % 8
    if wire == 0 then
      value, i = varint(s, i, stop)
      if value == nil then return false end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    elseif wire == 2 then
      value, i = varint(s, i, stop)
      if value == nil or value > stop + 1 - i then return false end
      visit(field, i, value)
      i = i + value
    else
      return false
    end
  end
  return i == stop + 1
end

-- Returns (model, version, head of field 3, head of the first field 4, head
-- of field 5) from one uncompressed gRPC frame, nil for what is absent; false
-- when the frame cannot be read as protobuf reads it. Of a field given twice
-- the last counts, as in protobuf (field 4, `messages`, is repeated: its first).
local function model_fields(s)
  local model, version, head, chat, template = nil, nil, nil, nil, nil
  local read = each_bytes_field(s, function(field, i, length)
    local head_end = i + math.min(length, PREFIX_BYTES) - 1
    if field == 1 then
      model = s:sub(i, i + length - 1)
    elseif field == 2 then
      version = s:sub(i, i + length - 1)
    elseif field == 3 then
      head = s:sub(i, head_end)
    elseif field == 4 and chat == nil then
      chat = s:sub(i, head_end)
    elseif field == 5 then
      template = s:sub(i, head_end)
    end
  end)
  if not read then return false end
  return model, version, head, chat, template
end

-- Returns the position of the first character after JSON whitespace from i.
local function skip_space(s, i)
  return s:find("[^ \t\r\n]", i) or (#s + 1)
end

-- Returns the position after the JSON string that starts at i, nil when unterminated.
local function string_end(s, i)
  local j = i + 1
  while true do
    local k = s:find('["\\]', j)
    if k == nil then return nil end
    if s:byte(k) == 34 then return k + 1 end
    j = k + 2
  end
end

-- Returns the position after the JSON value that starts at i, nil when malformed.
local function value_end(s, i)
  local c = s:byte(i)
  if c == 34 then return string_end(s, i) end
  if c ~= 123 and c ~= 91 then  -- a number, true, false or null
    return s:find("[,}%] \t\r\n]", i) or (#s + 1)
  end
  local depth, j = 0, i
  while true do
    local k = s:find('[{}%[%]"]', j)
    if k == nil then return nil end
    local b = s:byte(k)
    if b == 34 then
      j = string_end(s, k)
      if j == nil then return nil end
    else
      depth = depth + ((b == 123 or b == 91) and 1 or -1)
      j = k + 1
      if depth == 0 then return j end
    end
  end
end

-- JSON's one-character escapes (\u is decoded apart).
local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- Returns the body of a JSON string (between its quotes) with its escapes decoded,
-- as the worker's parser reads it; a \u escape of anything but ASCII becomes "?"
-- (no name has such characters, so none matches).
local function unescape(body)
  if not body:find("\\", 1, true) then return body end
  local parts, i = {}, 1
  while true do
    local k = body:find("\\", i, true)
    if k == nil then
      parts[#parts + 1] = body:sub(i)
      return table.concat(parts)
    end
    parts[#parts + 1] = body:sub(i, k - 1)
    local kind = body:sub(k + 1, k + 1)
    if kind == "u" then
      local digits = body:sub(k + 2, k + 5)
      local code = digits:match("^%x%x%x%x$") and tonumber(digits, 16) or 128
      parts[#parts + 1] = code < 128 and string.char(code) or "?"
      i = k + 6
    else
      parts[#parts + 1] = ESCAPES[kind] or "?"
      i = k + 2
    end
  end
end

-- Returns the raw JSON text of the wanted top-level members of a JSON object
-- ({name = text}), read as the worker's parser reads them: keys with their
-- escapes decoded, and of a key given twice the last; what follows a malformed
-- member is not read.
local function json_members(s, wanted)
  local found = {}
  local i = skip_space(s, 1)
  if s:byte(i) ~= 123 then return found end
  i = skip_space(s, i + 1)
  while s:byte(i) == 34 do
    local key_end = string_end(s, i)
    if key_end == nil then break end
    local key = unescape(s:sub(i + 1, key_end - 2))
    i = skip_space(s, key_end)
    if s:byte(i) ~= 58 then break end
    i = skip_space(s, i + 1)
    local stop = value_end(s, i)
    if stop == nil then break end
    if wanted[key] then found[key] = s:sub(i, stop - 1) end
    i = skip_space(s, stop)
    if s:byte(i) ~= 44 then break end
    i = skip_space(s, i + 1)
  end
  return found
end

-- Returns (model, version) of a model id: "name", or "name@version" (a version
-- number or an alias).
local function split_model_id(id)
  if id == nil then return nil, nil end
  local at = id:find("@", 1, true)
  if at == nil then return id, nil end
  return id:sub(1, at - 1), id:sub(at + 1)
end

-- Returns (model, version, head of the `input` member) of an OpenAI request:
-- the JSON in field 2 of its google.api.HttpBody frame (the last one, as protobuf
-- reads it: the first took one model's route and window, the worker served the
-- last's); false when the frame cannot be read as protobuf reads it.
local function openai_fields(s, input)
  local data = nil
  local read = each_bytes_field(s, function(field, i, length)
    if field == 2 then data = s:sub(i, i + length - 1) end
  end)
  if not read then return false end
  if data == nil then return nil, nil, nil end
  local members = json_members(data, { model = true, [input or "model"] = true })
  local model, version, head = nil, nil, nil
  local id = members.model
  -- A JSON string, its escapes decoded (the worker decodes them too: an escaped
  -- name left unread went past the routes and the per-model limits).
  if id ~= nil and id:byte(1) == 34 then
    model, version = split_model_id(unescape(id:sub(2, -2)))
  end
  if input and members[input] ~= nil then head = members[input]:sub(1, PREFIX_BYTES) end
  return model, version, head
end

-- Tells whether a model or version may travel in a header: a name's
-- characters ([A-Za-z0-9._-]) and length only. Anything else (control
-- characters, which Envoy refuses in headers with a 503, spaces, a huge
-- field) is left out of the headers: the request then takes the default
-- inference route and the worker rejects the field with INVALID_ARGUMENT.
local function header_safe(value, max_length)
  return value ~= nil and #value >= 1 and #value <= max_length
    and value:match("^[%w._-]+$") ~= nil
end

-- A table, not a function, as gsub's replacement: no Lua call and no
-- string.format per byte of every generation request's prompt head.
local HEX = {}
for byte = 0, 255 do HEX[string.char(byte)] = string.format("%02x", byte) end

local function hex(s)
  return (s:gsub(".", HEX))
end

-- Returns a request's prefix key: the hex of its head, after its tenant's name and
-- a zero byte when it has one (a tenant name has no zero byte). Per tenant, as the
-- workers' caches are: shared, the heads this thread saw, the router's pins and the
-- hash told one tenant (by the worker that answered) whether another had just sent
-- a head it guessed. Another tenant's head is no cache hit anyway, but on a model
-- whose caches are shared (TOKENMESH_CACHE_SHARED_MODELS): there a head common to
-- tenants reaches each tenant's worker once.
local function tenant_prefix(tenant, head)
  if tenant == nil or tenant == "" or not header_safe(tenant, 64) then return hex(head) end
  return hex(tenant) .. "00" .. hex(head)
end

-- Tells whether the caller's key may use `model`: `allowed` is the edge's
-- x-tokenmesh-models identity header ("a,b"; absent or blank: any model), read
-- as the workers read it (services/core/model_access.py).
local function key_allows(allowed, model)
  if allowed == nil then return true end
  local any = true
  for name in string.gmatch(allowed:match("^%s*(.-)%s*$"), "[^,]+") do
    if name == model then return true end
    any = false
  end
  return any
end

-- Returns the version `pins` ("model=version,...") pins `model` to, or nil.
local function key_pin(pins, model)
  if pins == nil then return nil end
  for name, version in string.gmatch(pins, "([^,=]+)=([^,]+)") do
    if name == model then return version end
  end
  return nil
end

-- Answers the request INVALID_ARGUMENT with `message` and its google.rpc details,
-- without sending it on.
local function refuse(handle, message, details)
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = "3",
    ["grpc-message"] = message,
    ["grpc-status-details-bin"] = details,
  }, nil)
end

function envoy_on_request(handle)
  local path = handle:headers():get(":path")
  local openai = OPENAI[path]
  if not ROUTED[path] and openai == nil and not MODEL_LOOKUPS[path] then return end
  local body = handle:body()
  if body == nil then return end
  local bytes = body:getBytes(0, body:length())
  -- A compressed message (the frame's flag; grpc-encoding gzip) cannot be read
  -- here: it went to any worker, past the routes and the per-model limits.
  if bytes:byte(1) == 1 then
    -- A compressed lookup is answered by any worker, as before it was routed.
    if MODEL_LOOKUPS[path] then return end
    refuse(handle, COMPRESSED_REFUSAL, COMPRESSED_DETAILS)
    return
  end
  local model, version, head
  if MODEL_LOOKUPS[path] then
    model = model_fields(bytes)
    if model ~= false then model, version = split_model_id(model) end
  elseif openai ~= nil then
    model, version, head = openai_fields(bytes, openai)
  else
    local chat, template
    model, version, head, chat, template = model_fields(bytes)
    if CHAT[path] then
      if template ~= nil and template ~= "" then
        head = template
      elseif head == nil or head == "" then
        head = chat
      end
    end
    if not GENERATION[path] then head = nil end
  end
  -- Read otherwise than the worker reads it, the model took one route and one
  -- model's window while the worker served another.
  if model == false then
    refuse(handle, MALFORMED_REFUSAL, MALFORMED_DETAILS)
    return
  end
  -- Header objects do not survive the body() yield: fetch them again.
  local headers = handle:headers()
  if not header_safe(model, 128) then model = nil end
  if not header_safe(version, 64) then version = nil end
  -- A model the caller's key may not use takes no model route: it goes, as an
  -- unknown model does, to any worker, which refuses it (MODEL_NOT_ALLOWED).
  -- Routed, its state leaked to a key that may not see it: no healthy worker
  -- (503), a sunset version (the route's 404), while a served one got 403.
  if model ~= nil and not key_allows(headers:get("x-tokenmesh-models"), model) then
    model = nil
  end
  if model ~= nil then headers:replace("x-tokenmesh-model", model) end
  local prefix = nil
  if head ~= nil and head ~= "" then
    prefix = tenant_prefix(headers:get("x-tokenmesh-tenant"), head)
    headers:replace("x-tokenmesh-prefix", prefix)
  end
  -- The request's version field wins over an x-model-version header, which
  -- wins over the caller's key pin ("model=version,..." set by the edge). An
  -- empty header names no version: left in, it matched the routes' "some other
  -- version" case and skipped the pin and the split.
  if headers:get("x-model-version") == "" then headers:remove("x-model-version") end
  if version ~= nil and version ~= "" then
    headers:replace("x-model-version", version)
  elseif model ~= nil and headers:get("x-model-version") == nil then
    local pinned = key_pin(headers:get("x-tokenmesh-pins"), model)
    if pinned ~= nil then headers:replace("x-model-version", pinned) end
  end
  handle:clearRouteCache()
  -- A hot head the router pinned to one worker (the matched route's metadata,
  -- services/router/prefix_pins.py) goes there while that worker is healthy,
  -- an unseen head to the route's next turn; not strict: a worker
  -- that is unhealthy, gone or outside the cluster the route picked leaves the
  -- choice to the hash.
  if prefix ~= nil then
    local placement = handle:metadata()
    local pinned = placement:get(prefix)
    local unseen = first_sighting(prefix)
    if pinned ~= nil then
      handle:setUpstreamOverrideHost(pinned, false)
    elseif unseen and model ~= nil then
      local workers = placement:get(SPREAD_KEY)
      if workers ~= nil and #workers > 1 then
        local turn = (turns[model] or 0) % #workers + 1
        turns[model] = turn
        handle:setUpstreamOverrideHost(workers[turn], false)
      end
    end
  end
end
