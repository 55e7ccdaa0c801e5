"""The transcoder's own 400 messages, in the API's words rather than protobuf's.

The gRPC-JSON transcoder refuses a REST or OpenAI request it cannot turn into
a gRPC message with a local 400 whose text names protobuf internals: an
unknown query parameter (an Azure-style client's `?api-version=`) read
`Could not find field "api-version" in the type
"tokenmesh.openai.v1.ListModelsRequest".`, a bad integer `page_size: invalid
value "abc" for type TYPE_INT32`, a bad enum name `... for type
type.googleapis.com/tokenmesh.inference.v1.Priority`, an object where a string
belongs `: invalid value Starting an object on a scalar field for type
prompt`, a list where one value belongs `: Proto field is not repeating, cannot
start list.`. A function of the edge's response Lua (it runs before the
transcoder, so it sees its replies as they leave) rewrites those phrases in a
400's JSON body: `unknown query parameter "api-version"`, `page_size: invalid
value "abc" (expected an integer)`, `priority: invalid value "NOPE" (not one of
the field's values)`, `prompt: Starting an object on a scalar field`, `a list
where one value belongs`. Other
400s (a worker's INVALID_ARGUMENT) pass unchanged; other statuses are not read.
"""

from __future__ import annotations

# What a protobuf field type expects, in JSON terms.
EXPECTED: dict[str, str] = {
    **{
        kind: "an integer"
        for kind in (
            "INT32",
            "INT64",
            "UINT32",
            "UINT64",
            "SINT32",
            "SINT64",
            "FIXED32",
            "FIXED64",
            "SFIXED32",
            "SFIXED64",
        )
    },
    "FLOAT": "a number",
    "DOUBLE": "a number",
    "BOOL": "true or false",
    "STRING": "a string",
    "BYTES": "base64",
}
_EXPECTED_TABLE = "".join(f'  ["{kind}"] = "{what}",\n' for kind, what in EXPECTED.items())

# A Lua function of the edge's response filter (gateway/edge_lua.py). It returns
# true when it replaced the body (the header object is stale then). Patterns run on
# the JSON text, where the message's quotes are escaped (\").
LUA_FUNCTION = f"""
local EXPECTED = {{
{_EXPECTED_TABLE}}}

local function expected_type(kind)
  return "(expected " .. (EXPECTED[kind] or "another type") .. ")"
end

local function api_words(text)
  text = string.gsub(text, [[Could not find field \\"([^\\"]*)\\" in the type \\"[%w%._]*\\"%.]],
    [[unknown query parameter \\"%1\\"]])
  text = string.gsub(text, "for type TYPE_([%u%d]+)", expected_type)
  text = string.gsub(text, "for type type%.googleapis%.com/[%w%._]+",
    "(not one of the field's values)")
  text = string.gsub(text, [["message":": invalid value (.-) for type ([%w_]+)"]],
    [["message":"%2: %1"]])
  text = string.gsub(text, "Proto field is not repeating, cannot start list%.",
    "a list where one value belongs")
  -- A message about the body as a whole names no field: no ": " before it.
  text = string.gsub(text, [["message":": ]], [["message":"]])
  return text
end

local function transcoder_message_in_api_words(handle, headers)
  if headers:get(":status") ~= "400" then
    return false
  end
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/json", 1, true) ~= 1 then
    return false
  end
  local body = handle:body()
  if body == nil then
    return false
  end
  local text = body:getBytes(0, body:length())
  local worded = api_words(text)
  if worded == text then
    return false
  end
  body:setBytes(worded)
  return true
end
"""
