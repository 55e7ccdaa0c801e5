"""Writes docs/openapi.yaml: an OpenAPI 3.1 description of every REST route the edge serves.

    python -m gateway.openapi --out docs/openapi.yaml     # `make docs`

The routes and schemas come from the descriptor set (the same one the edge's
transcoder loads) and the `google.api.http` annotations of every service the
edge transcodes, so a new service or field appears on the next `make docs`.
Schemas mirror the transcoder's JSON exactly (`envoy_config.transcoder_filter`):
proto field names, every field without presence printed (so responses list
them as required), enums as value names, 64-bit integers as strings, the
well-known types in their proto3 JSON forms, server streams as Server-Sent
Events (`data: <message JSON>` and a blank line per message).

What the protos cannot say is kept by hand next to this module:
`openapi_httpbody.yaml` describes the routes whose RPCs carry raw
`google.api.HttpBody` (the OpenAI-compatible surface, the JWKS): an operation
there replaces the generated one of the same method and path, and is left
out while no served RPC has that route. `openapi_examples.yaml` holds
request and response examples by operationId. A test regenerates the
document and fails when docs/openapi.yaml is stale.

The error bodies are described here, as the edge sends them: `Error` (our
google.rpc shape) and `openai.Error`. Envoy's replies sent before it read a
request's headers (openai_edge.BEFORE_HEADERS_STATUSES) answer any route in
both shapes at once, so every operation lists them and `Error` has OpenAI's
`error` member (envoy_config.before_request_mappers).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from gateway import (
    edge_auth,
    envoy_config,
    handover,
    openai_edge,
    protos,
    request_body,
    static_site,
)

DOCUMENT_PATH = static_site.OPENAPI_DOCUMENT
HTTPBODY_FRAGMENT = Path(__file__).with_name("openapi_httpbody.yaml")
EXAMPLES = Path(__file__).with_name("openapi_examples.yaml")
SERVED_PATH = "/openapi.yaml"

FDP = descriptor_pb2.FieldDescriptorProto
Schema = dict[str, Any]
# Proto3 JSON prints 64-bit integers as strings and reads numbers too (the edge
# takes `"seed": 7`): a schema of strings only refused the docs' own examples.
_INT64 = {"type": ["string", "integer"], "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": ["string", "integer"], "pattern": "^[0-9]+$", "minimum": 0}
_SCALARS: Mapping[int, Schema] = {
    FDP.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FDP.TYPE_FLOAT: {"type": "number", "format": "float"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 4294967295},
    FDP.TYPE_FIXED32: {"type": "integer", "minimum": 0, "maximum": 4294967295},
    FDP.TYPE_INT64: {**_INT64, "format": "int64"},
    FDP.TYPE_SINT64: {**_INT64, "format": "int64"},
    FDP.TYPE_SFIXED64: {**_INT64, "format": "int64"},
    FDP.TYPE_UINT64: {**_UINT64, "format": "uint64"},
    FDP.TYPE_FIXED64: {**_UINT64, "format": "uint64"},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
# Well-known types print as their proto3 JSON forms, not as objects of their fields.
_WELL_KNOWN: Mapping[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": _SCALARS[FDP.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[FDP.TYPE_FLOAT],
    "google.protobuf.Int64Value": _SCALARS[FDP.TYPE_INT64],
    "google.protobuf.UInt64Value": _SCALARS[FDP.TYPE_UINT64],
    "google.protobuf.Int32Value": _SCALARS[FDP.TYPE_INT32],
    "google.protobuf.UInt32Value": _SCALARS[FDP.TYPE_UINT32],
    "google.protobuf.BoolValue": _SCALARS[FDP.TYPE_BOOL],
    "google.protobuf.StringValue": _SCALARS[FDP.TYPE_STRING],
    "google.protobuf.BytesValue": _SCALARS[FDP.TYPE_BYTES],
}
# Well-known types the transcoder also reads from one query parameter.
_QUERY_WELL_KNOWN = frozenset(_WELL_KNOWN) - {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Empty",
    "google.protobuf.Any",
}
HTTP_BODY = "google.api.HttpBody"
_VERBS = ("get", "put", "post", "delete", "patch")
_TEMPLATE_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")
_MAX_QUERY_DEPTH = 3


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _comment(text: str) -> str:
    """Returns a proto comment as one paragraph, minus buf's lint directives."""
    lines = (line.strip() for line in text.strip().splitlines())
    return " ".join(line for line in lines if not line.startswith("buf:lint:ignore"))


def _described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description} if description else schema


@dataclass
class Protos:
    """Protos indexes the messages, enums, services and comments of a descriptor set."""

    messages: dict[str, descriptor_pb2.DescriptorProto] = field(default_factory=dict)
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = field(default_factory=dict)
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Protos:
        index = cls()
        for file in files:
            docs = {
                tuple(loc.path): _comment(loc.leading_comments)
                for loc in file.source_code_info.location
                if loc.leading_comments
            }
            index._add_file(file, docs)
        return index

    def _add_file(
        self, file: descriptor_pb2.FileDescriptorProto, docs: Mapping[tuple[int, ...], str]
    ) -> None:
        for i, message in enumerate(file.message_type):
            self._add_message(message, file.package, (4, i), docs)
        for i, enum in enumerate(file.enum_type):
            self._add_enum(enum, file.package, (5, i), docs)
        for s, service in enumerate(file.service):
            name = f"{file.package}.{service.name}"
            self.services[name] = service
            self.comments[name] = docs.get((6, s), "")
            for m, method in enumerate(service.method):
                self.comments[f"{name}.{method.name}"] = docs.get((6, s, 2, m), "")

    def _add_message(
        self,
        message: descriptor_pb2.DescriptorProto,
        scope: str,
        path: tuple[int, ...],
        docs: Mapping[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = message
        self.comments[name] = docs.get(path, "")
        for i, item in enumerate(message.field):
            self.comments[f"{name}.{item.name}"] = docs.get((*path, 2, i), "")
        for i, nested in enumerate(message.nested_type):
            self._add_message(nested, name, (*path, 3, i), docs)
        for i, enum in enumerate(message.enum_type):
            self._add_enum(enum, name, (*path, 4, i), docs)

    def _add_enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        scope: str,
        path: tuple[int, ...],
        docs: Mapping[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{enum.name}"
        self.enums[name] = enum
        self.comments[name] = docs.get(path, "")
        for i, value in enumerate(enum.value):
            self.comments[f"{name}.{value.name}"] = docs.get((*path, 2, i), "")

    def message_of(self, item: FDP) -> descriptor_pb2.DescriptorProto | None:
        """Returns the message type of a field (None for scalars and enums)."""
        if item.type != FDP.TYPE_MESSAGE:
            return None
        return self.messages[item.type_name.lstrip(".")]

    def is_map(self, item: FDP) -> bool:
        message = self.message_of(item)
        return message is not None and message.options.map_entry


def has_presence(item: FDP) -> bool:
    """Whether the transcoder leaves the field out when unset (messages, optional, oneofs)."""
    if item.label == FDP.LABEL_REPEATED:
        return False
    return item.type == FDP.TYPE_MESSAGE or item.HasField("oneof_index")


@dataclass(frozen=True)
class Binding:
    """Binding is one REST route of an RPC (its rule or one of its additional bindings)."""

    service: str
    method: descriptor_pb2.MethodDescriptorProto
    verb: str
    template: str
    body: str
    response_body: str
    index: int  # 0 for the rule itself, 1.. for additional bindings

    @property
    def rpc_path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def path(self) -> str:
        """The OpenAPI path: `{field}` for every variable, whatever its pattern."""
        return _TEMPLATE_VARIABLE.sub(lambda m: "{" + m.group(1) + "}", self.template)

    @property
    def variables(self) -> list[tuple[str, str]]:
        """(field path, pattern) per path variable; the pattern is "*" when not given."""
        return [(m.group(1), m.group(2) or "*") for m in _TEMPLATE_VARIABLE.finditer(self.template)]

    @property
    def operation_id(self) -> str:
        suffix = f".{self.index}" if self.index else ""
        return f"{self.service}.{self.method.name}{suffix}"


def bindings(index: Protos, services: Sequence[str]) -> list[Binding]:
    """Returns every REST route of the given services, in declaration order."""
    result = []
    for name in services:
        service = index.services.get(name)
        if service is None:
            continue
        for method in service.method:
            if not method.options.HasExtension(annotations_pb2.http):
                continue
            rule = method.options.Extensions[annotations_pb2.http]
            for i, each in enumerate([rule, *rule.additional_bindings]):
                result.append(_binding(name, method, each, i))
    return result


def _binding(
    service: str, method: descriptor_pb2.MethodDescriptorProto, rule: http_pb2.HttpRule, i: int
) -> Binding:
    verb = rule.WhichOneof("pattern")
    if verb == "custom":
        verb, template = rule.custom.kind.lower(), rule.custom.path
    else:
        template = getattr(rule, str(verb))
    return Binding(service, method, str(verb), template, rule.body, rule.response_body, i)


@dataclass
class _Components:
    """_Components collects the schemas the operations refer to, with each one's direction."""

    index: Protos
    requests: set[str] = field(default_factory=set)
    responses: set[str] = field(default_factory=set)

    def ref(self, name: str, response: bool) -> Schema:
        """Returns the schema of a message or enum by full name, noting where it is used."""
        if name in _WELL_KNOWN:
            return copy.deepcopy(_WELL_KNOWN[name])
        used = self.responses if response else self.requests
        if name not in used:
            used.add(name)
            for item in self.index.messages.get(name, descriptor_pb2.DescriptorProto()).field:
                if item.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
                    self.ref(item.type_name.lstrip("."), response)
        return _ref("schemas", name)

    def field_schema(self, item: FDP, response: bool) -> Schema:
        """Returns a field's JSON schema (a value, a list of them, or a map), undescribed."""
        if self.index.is_map(item):
            entry = self.index.message_of(item)
            assert entry is not None
            schema: Schema = {
                "type": "object",
                "additionalProperties": self.value_schema(entry.field[1], response),
            }
        elif item.label == FDP.LABEL_REPEATED:
            schema = {"type": "array", "items": self.value_schema(item, response)}
        else:
            schema = self.value_schema(item, response)
        return schema

    def value_schema(self, item: FDP, response: bool) -> Schema:
        if item.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
            return self.ref(item.type_name.lstrip("."), response)
        return copy.deepcopy(dict(_SCALARS[item.type]))

    def properties(self, name: str, response: bool, skip: Iterable[str] = ()) -> Schema:
        """Returns the properties of a message's schema (minus `skip`)."""
        message = self.index.messages[name]
        skipped = set(skip)
        return {
            item.name: _described(
                self.field_schema(item, response),
                self.index.comments.get(f"{name}.{item.name}", ""),
            )
            for item in message.field
            if item.name not in skipped
        }

    def schemas(self) -> dict[str, Schema]:
        """Returns every referenced message and enum schema, sorted by name."""
        result: dict[str, Schema] = {}
        for name in sorted(self.requests | self.responses):
            if name in self.index.enums:
                result[name] = self._enum_schema(name)
            else:
                response_only = name not in self.requests
                result[name] = self._message_schema(name, response_only)
        return result

    def _enum_schema(self, name: str) -> Schema:
        enum = self.index.enums[name]
        values = "; ".join(
            f"`{v.name}`: {self.index.comments.get(f'{name}.{v.name}', '')}".rstrip(": ")
            for v in enum.value
        )
        description = " ".join(filter(None, [self.index.comments.get(name, ""), values]))
        return _described(
            {"type": "string", "enum": list(dict.fromkeys(v.name for v in enum.value))},
            description,
        )

    def _message_schema(self, name: str, response_only: bool) -> Schema:
        message = self.index.messages[name]
        schema: Schema = {"type": "object"}
        schema = _described(schema, self.index.comments.get(name, ""))
        schema["properties"] = self.properties(name, response=response_only)
        if response_only:
            # The transcoder prints every field without presence, zeros included.
            required = [item.name for item in message.field if not has_presence(item)]
            if required:
                schema["required"] = required
        exclusive = _oneof_groups(message)
        if exclusive:
            schema["not"] = {
                "anyOf": [
                    {"required": [a, b]}
                    for group in exclusive
                    for i, a in enumerate(group)
                    for b in group[i + 1 :]
                ]
            }
        return schema


def _oneof_groups(message: descriptor_pb2.DescriptorProto) -> list[list[str]]:
    """Returns the field names of each real oneof (not proto3 `optional`'s synthetic ones)."""
    groups: dict[int, list[str]] = {}
    for item in message.field:
        if item.HasField("oneof_index") and not item.proto3_optional:
            groups.setdefault(item.oneof_index, []).append(item.name)
    return [names for names in groups.values() if len(names) > 1]


class _Operations:
    """_Operations turns each binding into an OpenAPI operation."""

    def __init__(self, index: Protos, components: _Components) -> None:
        self.index = index
        self.components = components

    def operation(self, binding: Binding) -> Schema:
        method = binding.method
        scope = edge_auth.RPC_SCOPES.get(binding.rpc_path, "admin")
        public = scope == edge_auth.PUBLIC
        comment = self.index.comments.get(f"{binding.service}.{method.name}", "")
        needs = "No credential needed." if public else f"Needs the `{scope}` scope."
        operation: Schema = {
            "operationId": binding.operation_id,
            "tags": [binding.service],
            "summary": f"{binding.service.rsplit('.', 1)[-1]}.{method.name}",
            "description": f"{comment} {needs} gRPC: `{binding.rpc_path}`.".strip(),
        }
        if not public:
            operation["x-tokenmesh-scope"] = scope
        parameters = self._path_parameters(binding) + self._query_parameters(binding)
        if parameters:
            operation["parameters"] = parameters
        if binding.body:
            operation["requestBody"] = self._request_body(binding)
        json_body = bool(binding.body) and self._request_type(binding) != HTTP_BODY
        operation["responses"] = {
            "200": self._success(binding, public),
            **_error_responses(binding.verb, public, json_body),
        }
        if binding.verb == "post" and re.match(handover.COMPLETE_PATHS, binding.path):
            self._add_respond_async(operation)
        if public:
            operation["security"] = []
        return operation

    def _add_respond_async(self, operation: Schema) -> None:
        """A REST Complete with `Prefer: respond-async` is answered by the jobs service
        (gateway/handover.py): 202 with the job, or the answer itself within `wait`."""
        prefer = copy.deepcopy(_PREFER_PARAMETER)
        operation["parameters"] = [*operation.get("parameters", []), prefer]
        operation["responses"]["202"] = {
            "description": "Accepted (`Prefer: respond-async`): the Complete became a job of "
            "one item. The body is the job as `GET /v1/jobs/{id}` answers it; poll `Location` "
            "(or list its results) for the Complete's answer.",
            "headers": {
                "location": {
                    "description": "The job: `/v1/jobs/{id}`.",
                    "required": True,
                    "schema": {"type": "string"},
                },
                "preference-applied": {
                    "description": "`respond-async` (RFC 7240).",
                    "required": True,
                    "schema": {"type": "string", "const": "respond-async"},
                },
                **{name: _ref("headers", name) for name in _RATE_LIMIT_HEADERS},
            },
            "content": {"application/json": {"schema": self.components.ref(_JOB, response=True)}},
        }
        operation["responses"] = dict(sorted(operation["responses"].items()))

    def _request_type(self, binding: Binding) -> str:
        return binding.method.input_type.lstrip(".")

    def _field(self, message: str, path: str) -> tuple[str, FDP]:
        """Returns (owner message, field) of a dotted field path."""
        owner, item = message, None
        for part in path.split("."):
            if item is not None:
                owner = item.type_name.lstrip(".")
            fields = {f.name: f for f in self.index.messages[owner].field}
            item = fields[part]
        assert item is not None
        return owner, item

    def _path_parameters(self, binding: Binding) -> list[Schema]:
        request = self._request_type(binding)
        result = []
        for path, pattern in binding.variables:
            owner, item = self._field(request, path)
            schema = self.components.field_schema(item, response=False)
            description = self.index.comments.get(f"{owner}.{item.name}", "")
            if pattern != "*":
                description += f" (pattern `{pattern}`: the value may contain `/`)"
            result.append(
                {
                    "name": path,
                    "in": "path",
                    "required": True,
                    "description": description.strip(),
                    "schema": schema,
                }
            )
        return result

    def _query_parameters(self, binding: Binding) -> list[Schema]:
        """Every field not bound by the path or the body is a query parameter."""
        if binding.body == "*" or self._request_type(binding) == HTTP_BODY:
            return []
        bound = {path for path, _ in binding.variables} | ({binding.body} - {""})
        return list(self._query_fields(self._request_type(binding), "", bound, 0))

    def _query_fields(
        self, message: str, prefix: str, bound: set[str], depth: int
    ) -> Iterator[Schema]:
        for item in self.index.messages[message].field:
            name = prefix + item.name
            if name in bound or self.index.is_map(item):
                continue
            type_name = item.type_name.lstrip(".")
            nested = item.type == FDP.TYPE_MESSAGE and type_name not in _QUERY_WELL_KNOWN
            if nested and item.label != FDP.LABEL_REPEATED and depth < _MAX_QUERY_DEPTH:
                yield from self._query_fields(type_name, f"{name}.", bound, depth + 1)
            elif not nested:
                yield self._query_parameter(message, item, name)

    def _query_parameter(self, message: str, item: FDP, name: str) -> Schema:
        schema = self.components.field_schema(item, response=False)
        parameter: Schema = {"name": name, "in": "query", "schema": schema}
        description = self.index.comments.get(f"{message}.{item.name}", "")
        if description:
            parameter["description"] = description
        if item.label == FDP.LABEL_REPEATED:
            parameter.update(style="form", explode=True)
        return parameter

    def _request_body(self, binding: Binding) -> Schema:
        request = self._request_type(binding)
        if request == HTTP_BODY:
            return {"required": True, "content": {"*/*": {"schema": {}}}}
        if binding.body == "*":
            skip = {path.split(".")[0] for path, _ in binding.variables}
            schema: Schema = {
                "type": "object",
                "properties": self.components.properties(request, response=False, skip=skip),
            }
            schema = _described(schema, self.index.comments.get(request, ""))
        else:
            owner, item = self._field(request, binding.body)
            schema = _described(
                self.components.field_schema(item, response=False),
                self.index.comments.get(f"{owner}.{item.name}", ""),
            )
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    def _success(self, binding: Binding, public: bool) -> Schema:
        response = binding.method.output_type.lstrip(".")
        headers = {} if public else _RATE_LIMIT_HEADERS
        if response == HTTP_BODY:
            content: Schema = {"*/*": {"schema": {}}}
            description = "The raw response body (google.api.HttpBody)."
        elif binding.method.server_streaming:
            content = {"text/event-stream": _event_stream(self.components.ref(response, True))}
            description = (
                f"A Server-Sent Events stream: one `data: <{response} JSON>` event per "
                f"message. {_STREAM_ENDS}"
            )
            fields = {item.name for item in self.index.messages[response].field}
            if _FINAL_MESSAGE_FIELDS <= fields:
                description += f" {_GENERATION_STREAM_ENDS}"
        else:
            schema = self.components.ref(response, True)
            if binding.response_body:
                _, item = self._field(response, binding.response_body)
                schema = self.components.field_schema(item, response=True)
            content = {"application/json": {"schema": schema}}
            description = f"`{response}` as JSON."
        result: Schema = {"description": description, "content": content}
        if headers:
            result["headers"] = {name: _ref("headers", name) for name in headers}
        return result


def _event_stream(message: Schema) -> Schema:
    """Describes one Server-Sent Event (OpenAPI 3.1: `schema` is per event) of a server stream."""
    return {
        "schema": {
            "type": "object",
            "description": "One event: `data: <JSON>` and a blank line (no `event:` lines).",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": message,
                },
                "event": {"const": "message"},
            },
        }
    }


# How a REST stream ends, and how a client tells a failed or cut one from a whole one
# (docs/reliability.md, "Cut streams"; the playground shows each).
_STREAM_ENDS = (
    "An error after the stream started ends it with that status as gRPC trailers "
    "(`grpc-status`, `grpc-message`; HTTP/2, or HTTP/1.1 chunked trailers), which browsers "
    "and most SSE clients never see. A stream cut short (its server or the edge killed "
    "with -9) ends with no trailers at all: over HTTP/1.1 the chunked body ends without "
    "its last chunk (httpx: RemoteProtocolError, curl: exit code 18, fetch(): a network "
    "error), over HTTP/2 the stream is reset. Treat either as a failure."
)
# A generation stream says both in-band, in its messages (a response message with
# these fields: v2's and v1's Generate).
_FINAL_MESSAGE_FIELDS = frozenset({"finish_reason", "error"})
_GENERATION_STREAM_ENDS = (
    "A whole stream ends after every choice's final message: the one with `finish_reason` "
    "set (and `usage`, `model`, `timing`). If the request fails after the stream started, "
    "every choice still running first gets a final message whose `finish_reason` is the "
    "error one (`FINISH_REASON_ERROR`; v1: `error`) and whose `error` says why (code and "
    "message): a client that cannot read trailers reads that. A stream that ends before "
    "every choice's final message was cut (no trailers either, see above): its text is "
    "incomplete; retry with a new `request_id`."
)
# What a REST Complete answers with `Prefer: respond-async` (gateway/handover.py).
_JOB = "tokenmesh.jobs.v1.Job"
_PREFER_PARAMETER: Schema = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "RFC 7240. `respond-async` hands the Complete to the jobs service as a job "
    "of one item (the key needs the "
    f"`{edge_auth.RPC_SCOPES[f'/{handover.SERVICE}/CompleteV2']}` scope as well): the answer is "
    "202 with the job. "
    "With `wait=N` too (`respond-async, wait=5`; N at most 60), an item finished within N "
    "seconds is answered inline: 200 with this operation's JSON (or its error), with "
    "`x-request-id` and `x-model-version` but no `x-tokenmesh-worker`. Without "
    "`respond-async` the header changes nothing.",
    "schema": {"type": "string"},
}
# Responses every authenticated answer may carry (the edge's rate limiter, draft 03).
_RATE_LIMIT_HEADERS: Mapping[str, Schema] = {
    "x-ratelimit-limit": {
        "description": "The key's request limit and its window, e.g. "
        '`100, 100;w=60;name="requests_per_minute"`.',
        "schema": {"type": "string"},
    },
    "x-ratelimit-remaining": {
        "description": "Requests left in the current window.",
        "schema": {"type": "integer"},
    },
    "x-ratelimit-reset": {
        "description": "Seconds until the window resets.",
        "schema": {"type": "integer"},
    },
}
_RETRY_AFTER: Schema = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer"},
}
# HTTP status -> (component name, description). gRPC codes map as the transcoder maps them.
_ERRORS: Mapping[str, tuple[str, str]] = {
    "400": (
        "BadRequest",
        "INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE: a bad field (google.rpc.BadRequest "
        "names it), JSON the transcoder cannot parse, or an unknown query parameter. Also a "
        "request Envoy refused before reading its headers (malformed, a header name with `_`): "
        "then `error` is set.",
    ),
    "401": (
        "Unauthenticated",
        "UNAUTHENTICATED: a missing, unknown, revoked or expired credential.",
    ),
    "403": ("PermissionDenied", "PERMISSION_DENIED: the key lacks the scope, or the model."),
    "404": ("NotFound", "NOT_FOUND: an unknown resource, or no route for the path."),
    "408": (
        "RequestTimeout",
        "DEADLINE_EXCEEDED: the request did not arrive whole within the edge's "
        "`request_timeout`, or its headers within `request_headers_timeout` (then `error` is set).",
    ),
    "409": ("Conflict", "ALREADY_EXISTS or ABORTED."),
    "410": ("Gone", "An API version past its sunset date."),
    "413": (
        "PayloadTooLarge",
        "RESOURCE_EXHAUSTED: a request body over the edge's limit "
        f"({request_body.MAX_BODY_BYTES >> 20} MiB), refused by Envoy itself "
        "(`http_status` 413) before any service saw it, whoever the caller: a body whose "
        "`Content-Length` declares it is refused before the credential is checked and before "
        "any of it is read; one of undeclared size (chunked) once it passes the limit.",
    ),
    "429": (
        "ResourceExhausted",
        "RESOURCE_EXHAUSTED: over a rate limit, token budget or the failed-authentication limit.",
    ),
    "431": (
        "RequestHeaderFieldsTooLarge",
        "RESOURCE_EXHAUSTED: headers over the edge's size or count limit, refused before they "
        "were read (`error` is set). Over HTTP/2 the stream is reset instead.",
    ),
    "500": ("Internal", "INTERNAL or UNKNOWN: a server bug (the message is generic)."),
    "501": ("Unimplemented", "UNIMPLEMENTED."),
    "503": ("Unavailable", "UNAVAILABLE: no healthy upstream; try again (retry-after)."),
    "504": ("DeadlineExceeded", "DEADLINE_EXCEEDED: the upstream did not answer in time."),
}
_BEFORE_HEADERS = ", ".join(map(str, openai_edge.BEFORE_HEADERS_STATUSES))
# What each status of openai_edge.BEFORE_HEADERS_STATUSES is on /openai/ paths.
_OPENAI_BEFORE_HEADERS: Mapping[int, str] = {
    400: "A bad or unsupported parameter (`param` names it), JSON that cannot be read, or a "
    "request Envoy refused before reading its headers (malformed, a header name with `_`).",
    408: "The request did not arrive whole within the edge's `request_timeout`, or its headers "
    "within `request_headers_timeout` (the SDKs retry it).",
    431: "Headers over the edge's size or count limit, refused before they were read (over "
    "HTTP/2 the stream is reset instead).",
}
# A public RPC may still check a credential it is given (IssueToken: 401).
_PUBLIC_ERRORS = ("400", "401", "404", "429", "500", "503", "504")


def _error_responses(verb: str, public: bool, json_body: bool) -> dict[str, Schema]:
    """The errors an operation may answer; 413 only where a JSON body is read (any such
    route, public ones included: Envoy refuses the body before anything else)."""
    statuses = _PUBLIC_ERRORS if public else tuple(s for s in _ERRORS if s != "413")
    if verb == "get":
        statuses = tuple(s for s in statuses if s != "409")
    if json_body:
        statuses = (*statuses, "413")
    ordered = sorted(statuses, key=int)
    return {status: _ref("responses", _ERRORS[status][0]) for status in ordered}


def _error_components() -> tuple[dict[str, Schema], dict[str, Schema]]:
    """Returns the error schemas (ours and OpenAI's) and one response per mapped HTTP status."""
    error: Schema = {
        "type": "object",
        "description": (
            "A google.rpc.Status as the edge renders it: from a service (the transcoder), or "
            "from Envoy itself (`http_status` set, `details` empty). `code` is the gRPC code. "
            "A reply Envoy sent before it read the request's headers also has `error`."
        ),
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "integer", "description": "The gRPC status code, e.g. 3."},
            "message": {"type": "string", "description": "What went wrong (at most 1024 chars)."},
            "details": {
                "type": "array",
                "description": "google.rpc details: ErrorInfo (reason), BadRequest "
                "(field_violations), QuotaFailure, RetryInfo, ...",
                "items": _ref("schemas", "google.protobuf.Any"),
            },
            "http_status": {
                "type": "integer",
                "description": "The HTTP status (only on replies Envoy generates itself).",
            },
            "error": {
                **_ref("schemas", "openai.ErrorObject"),
                "description": "Only on replies Envoy sent before it read the request's "
                f"headers (HTTP/1.1: {_BEFORE_HEADERS}): nothing tells an /openai/ request from "
                "ours then, so one body carries both error shapes; OpenAI's SDKs read this member.",
            },
        },
    }
    responses = {}
    for status, (name, description) in _ERRORS.items():
        response: Schema = {
            "description": description,
            "content": {"application/json": {"schema": _ref("schemas", "Error")}},
        }
        if status in ("429", "503"):
            response["headers"] = {"retry-after": _ref("headers", "retry-after")}
        responses[name] = response
    responses.update(_openai_before_headers_responses())
    schemas = {
        "Error": error,
        "google.protobuf.Any": dict(_WELL_KNOWN["google.protobuf.Any"]),
        **_openai_error_schemas(),
    }
    return schemas, responses


def _openai_error_schemas() -> dict[str, Schema]:
    """OpenAI's error body, as the workers (`shapes.error`) and the edge's local replies
    (openai_edge) write it: all four members, `param` and `code` possibly null."""
    error_object: Schema = {
        "type": "object",
        "description": "OpenAI's error object.",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "description": "e.g. invalid_request_error, server_error."},
            "param": {"type": ["string", "null"], "description": "The request parameter at fault."},
            "code": {
                "type": ["string", "null"],
                "description": "e.g. model_not_found, invalid_api_key, request_timeout.",
            },
        },
    }
    body: Schema = {
        "type": "object",
        "description": "OpenAI's error body (`error` is the first key).",
        "required": ["error"],
        "properties": {"error": _ref("schemas", "openai.ErrorObject")},
    }
    return {"openai.Error": body, "openai.ErrorObject": error_object}


def _openai_before_headers_responses() -> dict[str, Schema]:
    """One response per status of Envoy's before-headers replies, for /openai/ paths."""
    responses = {}
    for status in openai_edge.BEFORE_HEADERS_STATUSES:
        what = _OPENAI_BEFORE_HEADERS[status]
        kind, code = openai_edge.LOCAL_ERRORS[status]
        # Sent before the headers were read, the body is both shapes: `Error` with `error`.
        schema = {"anyOf": [_ref("schemas", "openai.Error"), _ref("schemas", "Error")]}
        responses[_openai_response_name(status)] = {
            "description": f"`{kind}` (`code` `{code}` from the edge itself). {what} A reply "
            "sent before the headers were read carries both shapes: an `Error` with `error`.",
            "content": {"application/json": {"schema": schema}},
        }
    return responses


def _openai_response_name(status: int) -> str:
    return f"OpenAI{_ERRORS[str(status)][0]}"


def _add_before_headers_replies(paths: Mapping[str, Mapping[str, Schema]]) -> None:
    """Lists Envoy's before-headers replies (openai_edge.BEFORE_HEADERS_STATUSES) on every
    operation: they answer any path, in both error shapes. An operation's own response
    for such a status is kept (its schema is the path's error shape, which the body has)."""
    for path, operations in paths.items():
        openai = path.startswith(openai_edge.PATH_PREFIX)
        for operation in operations.values():
            responses = operation["responses"]
            for status in openai_edge.BEFORE_HEADERS_STATUSES:
                name = _openai_response_name(status) if openai else _ERRORS[str(status)][0]
                responses.setdefault(str(status), _ref("responses", name))
            operation["responses"] = dict(sorted(responses.items()))


def _edge_paths() -> dict[str, Schema]:
    """The routes Envoy answers itself."""
    return {
        "/healthz": {
            "get": {
                "operationId": "edge.Healthz",
                "tags": ["edge"],
                "summary": "Health",
                "description": "200 while every service and a worker have a healthy host, "
                "else 503. Answered by Envoy; no credential needed.",
                "security": [],
                "responses": {
                    "200": {"description": "Healthy (empty body)."},
                    "503": {"description": "An upstream has no healthy host."},
                },
            }
        },
        **{file.path: {"get": _static_operation(file)} for file in static_site.STATIC_FILES},
    }


def _static_operation(file: static_site.StaticFile) -> Schema:
    name = "OpenApi" if file.path == SERVED_PATH else file.path.strip("/").replace("/", ".")
    what = "This OpenAPI description (docs/openapi.yaml)" if file.path == SERVED_PATH else "A file"
    media_type = file.content_type.split(";")[0]
    structured = "object" if media_type.endswith(("yaml", "json")) else None
    return {
        "operationId": f"edge.Get.{name}",
        "tags": ["edge"],
        "summary": file.path,
        "description": f"{what}, served by Envoy itself (GET and HEAD); no credential needed.",
        "security": [],
        "responses": {
            "200": {
                "description": file.content_type,
                "content": {media_type: {"schema": {"type": structured or "string"}}},
            }
        },
    }


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}


def _version() -> str:
    with (protos.ROOT / "pyproject.toml").open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def build(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
    services: Sequence[str] = envoy_config.TRANSCODED_SERVICES,
    examples: Mapping[str, Any] | None = None,
) -> Schema:
    """Returns the OpenAPI document (as plain data) for the REST routes of `services`.

    Args:
        examples: by operationId (default: openapi_examples.yaml's); an
            unknown operationId fails.
    """
    index = Protos.of(files)
    components = _Components(index)
    operations = _Operations(index, components)
    fragment = _load_yaml(HTTPBODY_FRAGMENT) or {}
    hand_kept: Mapping[str, Mapping[str, Schema]] = fragment.get("paths", {})
    paths: dict[str, dict[str, Schema]] = {}
    for binding in bindings(index, services):
        manual = hand_kept.get(binding.path, {}).get(binding.verb)
        if manual is not None:
            operation = {**copy.deepcopy(manual), "operationId": binding.operation_id}
            operation.setdefault("tags", [binding.service])
        else:
            operation = operations.operation(binding)
        paths.setdefault(binding.path, {})[binding.verb] = operation
    paths.update(_edge_paths())
    _add_before_headers_replies(paths)
    _add_examples(paths, (_load_yaml(EXAMPLES) or {}) if examples is None else examples)
    schemas, responses = _error_components()
    schemas.update(components.schemas())
    hand_kept_components = fragment.get("components", {})
    schemas.update(hand_kept_components.get("schemas", {}))
    responses.update(hand_kept_components.get("responses", {}))
    used_tags = sorted({tag for ops in paths.values() for op in ops.values() for tag in op["tags"]})
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenmesh edge REST API",
            "version": _version(),
            "description": _INFO,
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "`make run`"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "tags": [{"name": t, "description": index.comments.get(t, "")} for t in used_tags],
        "paths": {path: _ordered(paths[path]) for path in sorted(paths)},
        "components": {
            "securitySchemes": _SECURITY_SCHEMES,
            "headers": {**_RATE_LIMIT_HEADERS, "retry-after": _RETRY_AFTER},
            "responses": responses,
            "schemas": dict(sorted(schemas.items())),
        },
    }
    _prune(document)
    return document


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _prune(document: Schema) -> None:
    """Drops the components no operation reaches (hand-kept ones of routes not served)."""
    components = document["components"]
    reached: set[str] = set()
    pending = list(_refs(document["paths"]))
    while pending:
        ref = pending.pop()
        if ref in reached:
            continue
        reached.add(ref)
        _, _, kind, name = ref.split("/", 3)
        pending.extend(_refs(components[kind][name]))
    for kind in ("schemas", "responses", "headers"):
        components[kind] = {
            name: value
            for name, value in components[kind].items()
            if f"#/components/{kind}/{name}" in reached
        }


def _ordered(operations: Mapping[str, Schema]) -> dict[str, Schema]:
    return {verb: operations[verb] for verb in _VERBS if verb in operations}


def _add_examples(paths: Mapping[str, Mapping[str, Schema]], examples: Mapping[str, Any]) -> None:
    """Attaches the hand-kept examples to their operations; an unknown operationId fails."""
    by_id = {op["operationId"]: op for ops in paths.values() for op in ops.values()}
    for operation_id, example in examples.items():
        operation = by_id.get(operation_id)
        if operation is None:
            raise SystemExit(f"{EXAMPLES.name}: no operation {operation_id!r}")
        for parameter in operation.get("parameters", []):
            if parameter["name"] in example.get("parameters", {}):
                parameter["example"] = example["parameters"][parameter["name"]]
        if "request" in example:
            for media in operation["requestBody"]["content"].values():
                media["example"] = example["request"]
        if "response" in example:
            for media_type, media in operation["responses"]["200"]["content"].items():
                if media_type == "text/event-stream":  # an example of one event's data
                    data = media["schema"]["properties"]["data"]["contentSchema"]
                    data["examples"] = [example["response"]]
                else:
                    media["example"] = example["response"]


_INFO = """\
Every REST route of the tokenmesh edge (Envoy). Generated from the protos' \
`google.api.http` annotations by `make docs` (`python -m gateway.openapi`); do not edit.

JSON follows the edge's transcoder: proto field names (snake_case); every field \
without presence is printed, zeros included; enums print their value names; \
64-bit integers are JSON strings; Timestamps are RFC 3339 strings and Durations \
strings like `"3.5s"`. Server-streaming RPCs answer `text/event-stream`: \
`data: <message JSON>` and a blank line per message. Errors are JSON \
google.rpc.Status (`code`, `message`, `details`) with the mapped HTTP status; \
the OpenAI-compatible routes (/openai/v1) answer OpenAI's `{"error": {...}}`. \
Replies Envoy sends before it has read the request's headers (HTTP/1.1: \
{before_headers}) cannot tell the two apart and carry both: google.rpc.Status's \
members and OpenAI's `error`. \
The same API over gRPC: the same paths as `/package.Service/Method` on the same port.
""".replace("{before_headers}", _BEFORE_HEADERS)
_SECURITY_SCHEMES: Mapping[str, Schema] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <API key or JWT>`: an API key (`tm_...`), or a "
        "JWT from `POST /v1/auth/token` (verified by Envoy itself).",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "An API key (`tm_...`). Takes precedence over Authorization.",
    },
}


def admin_operation_ids(document: Mapping[str, Any]) -> list[str]:
    """Returns the operationIds that need the admin scope."""
    return [
        operation["operationId"]
        for operations in document["paths"].values()
        for operation in operations.values()
        if operation.get("x-tokenmesh-scope") == "admin"
    ]


def descriptor_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Builds a fresh descriptor set from proto/ and returns its files."""
    with tempfile.TemporaryDirectory() as tmp:
        path = protos.build_descriptor_set(Path(tmp) / "api.pb")
        return list(descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file)


def render(files: Iterable[descriptor_pb2.FileDescriptorProto] | None = None) -> str:
    """Returns docs/openapi.yaml's text, from `files` or a fresh descriptor set."""
    document = build(descriptor_files() if files is None else files)
    header = "# Generated by `make docs` (python -m gateway.openapi) from proto/; do not edit.\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.openapi")
    parser.add_argument("--out", type=Path, help="write here (default: stdout)")
    args = parser.parse_args(argv)
    text = render()
    if args.out is None:
        sys.stdout.write(text)
    else:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
