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

import functools

from google.protobuf.descriptor import Descriptor

from gateway import protos

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
# What a message type named in a transcoder message expects (enums: any of the
# API's, found in its stubs; any other message type: an object).
WELL_KNOWN: dict[str, str] = {
    "google.protobuf.Timestamp": "an RFC 3339 time, such as 2026-01-02T03:04:05Z",
    "google.protobuf.Duration": "a duration in seconds, such as 1.5s",
    "google.protobuf.Int32Value": EXPECTED["INT32"],
    "google.protobuf.Int64Value": EXPECTED["INT64"],
    "google.protobuf.UInt32Value": EXPECTED["UINT32"],
    "google.protobuf.UInt64Value": EXPECTED["UINT64"],
    "google.protobuf.FloatValue": EXPECTED["FLOAT"],
    "google.protobuf.DoubleValue": EXPECTED["DOUBLE"],
    "google.protobuf.BoolValue": EXPECTED["BOOL"],
    "google.protobuf.StringValue": EXPECTED["STRING"],
    "google.protobuf.BytesValue": EXPECTED["BYTES"],
}
NOT_A_VALUE = "(not one of the field's values)"


def api_enums() -> list[str]:
    """Returns the full names of every enum of the API's messages (its Python stubs)."""
    names: list[str] = []

    def walk(message: Descriptor) -> None:
        names.extend(enum.full_name for enum in message.enum_types)
        for nested in message.nested_types:
            walk(nested)

    for module in protos.stub_modules("*_pb2.py"):
        file = module.DESCRIPTOR
        names.extend(enum.full_name for enum in file.enum_types_by_name.values())
        for message in file.message_types_by_name.values():
            walk(message)
    return sorted(set(names))


def _lua_table(entries: dict[str, str]) -> str:
    return "".join(f'  ["{name}"] = "{words}",\n' for name, words in sorted(entries.items()))


@functools.cache
def lua_function() -> str:
    """A Lua function of the edge's response filter (gateway/edge_lua.py): it returns
    true when it replaced the body (the header object is stale then). Patterns run
    on the JSON text, where the message's quotes are escaped (\\")."""
    type_words = {name: f"(expected {words})" for name, words in WELL_KNOWN.items()}
    type_words.update({name: NOT_A_VALUE for name in api_enums()})
    return f"""
local EXPECTED = {{
{_lua_table(EXPECTED)}}}
local TYPE_WORDS = {{
{_lua_table(type_words)}}}

local function expected_type(kind)
  return "(expected " .. (EXPECTED[kind] or "another type") .. ")"
end

local function message_type_words(name)
  return TYPE_WORDS[name] or "(expected an object)"
end

-- "<path>: invalid value <what> for type <field>": the field, and what was wrong.
local function field_problem(path, what, field)
  if path == "" then path = field end
  return '"message":"' .. path .. ': ' .. what .. '"'
end

local function api_words(text)
  text = string.gsub(text, [[Could not find field \\"([^\\"]*)\\" in the type \\"[%w%._]*\\"%.]],
    [[unknown query parameter \\"%1\\"]])
  text = string.gsub(text, "for type TYPE_([%u%d]+)", expected_type)
  text = string.gsub(text, "for type type%.googleapis%.com/([%w%._]+)", message_type_words)
  -- [=[ ]=]: the pattern's own "]]" would end a [[ ]] string.
  text = string.gsub(text, [=["message":"([%w_%.%[%]]*): invalid value (.-) for type ([%w_]+)"]=],
    field_problem)
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
