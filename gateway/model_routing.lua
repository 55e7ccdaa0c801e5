-- Copies an inference request's model and version into headers the routes match.
--
-- Runs after the transcoder, so REST and gRPC requests alike carry a gRPC
-- frame whose protobuf message has `model` as field 1 and `version` as
-- field 2 (GenerateRequest, CompleteRequest, EmbedRequest of inference v1
-- and v2, which kept v1's numbers for them). Only those fields, a
-- generation's `prompt` (field 3), a v2 chat's first message (field 4) and
-- a v2 `template` reference (field 5) are decoded; every other field is
-- skipped by its wire type. The hex of the template reference (requests
-- rendered by one template share its head, whatever their variables), else
-- of the prompt's (or first message's) first PREFIX_BYTES bytes goes into
-- x-tokenmesh-prefix, which the routes hash (bounded-load consistent
-- hashing) to pick the worker.

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
local PREFIX_BYTES = 64

-- Returns the varint at position i and the position after it (nil when malformed).
local function varint(s, i)
  local result, scale = 0, 1
  while true do
    local b = s:byte(i)
    if b == nil or scale > 2 ^ 56 then return nil, i end
    result = result + (b % 128) * scale
    i = i + 1
    if b < 128 then return result, i end
    scale = scale * 128
  end
end

-- Returns (model, version, head of field 3, head of the first field 4, head
-- of field 5) from one uncompressed gRPC frame, nil for what is absent.
local function model_fields(s)
  if #s < 5 or s:byte(1) ~= 0 then return nil, nil, nil, nil, nil end
  local stop = 5 + s:byte(2) * 16777216 + s:byte(3) * 65536 + s:byte(4) * 256 + s:byte(5)
  if stop > #s then stop = #s end
  local i, model, version, head, chat, template = 6, nil, nil, nil, nil, nil
  while i <= stop do
    local key, value
    key, i = varint(s, i)
    if key == nil then break end
    local field, wire = math.floor(key / 8), key % 8
    if wire == 0 then
      value, i = varint(s, i)
      if value == nil then break end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    elseif wire == 2 then
      value, i = varint(s, i)
      if value == nil then break end
      if field == 1 then
        model = s:sub(i, i + value - 1)
      elseif field == 2 then
        version = s:sub(i, i + value - 1)
      elseif field == 3 and head == nil then
        head = s:sub(i, i + math.min(value, PREFIX_BYTES) - 1)
      elseif field == 4 and chat == nil then
        chat = s:sub(i, i + math.min(value, PREFIX_BYTES) - 1)
      elseif field == 5 then
        template = s:sub(i, i + math.min(value, PREFIX_BYTES) - 1)
      end
      i = i + value
    else
      break
    end
  end
  return model, version, head, chat, template
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

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- Returns the version `pins` ("model=version,...") pins `model` to, or nil.
local function key_pin(pins, model)
  if pins == nil then return nil end
  for name, version in string.gmatch(pins, "([^,=]+)=([^,]+)") do
    if name == model then return version end
  end
  return nil
end

function envoy_on_request(handle)
  if not ROUTED[handle:headers():get(":path")] then return end
  local body = handle:body()
  if body == nil then return end
  local model, version, head, chat, template = model_fields(body:getBytes(0, body:length()))
  -- Header objects do not survive the body() yield: fetch them again.
  local headers = handle:headers()
  if not header_safe(model, 128) then model = nil end
  if not header_safe(version, 64) then version = nil end
  if model ~= nil then headers:replace("x-tokenmesh-model", model) end
  local path = headers:get(":path")
  if CHAT[path] then
    if template ~= nil and template ~= "" then
      head = template
    elseif head == nil or head == "" then
      head = chat
    end
  end
  if head ~= nil and head ~= "" and GENERATION[path] then
    headers:replace("x-tokenmesh-prefix", hex(head))
  end
  -- The request's version field wins over an x-model-version header, which
  -- wins over the caller's key pin ("model=version,..." set by the edge).
  if version ~= nil and version ~= "" then
    headers:replace("x-model-version", version)
  elseif model ~= nil and headers:get("x-model-version") == nil then
    local pinned = key_pin(headers:get("x-tokenmesh-pins"), model)
    if pinned ~= nil then headers:replace("x-model-version", pinned) end
  end
  handle:clearRouteCache()
end
