"""Writes the API reference (Markdown) from the protos' own comments.

    python -m gateway.apidocs > docs/api.md

A test regenerates it and fails when docs/api.md is stale.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from gateway import protos

FDP = descriptor_pb2.FieldDescriptorProto
_MESSAGE, _ENUM, _SERVICE, _FIELD, _METHOD, _VALUE = 4, 5, 6, 2, 2, 2
_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in FDP.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def _comments(source: descriptor_pb2.SourceCodeInfo) -> dict[tuple[int, ...], str]:
    """Returns each element's leading comment, minus buf's lint-ignore directives."""
    return {
        tuple(loc.path): " ".join(
            line.strip()
            for line in loc.leading_comments.strip().splitlines()
            if not line.strip().startswith("buf:lint:ignore")
        )
        for loc in source.location
        if loc.leading_comments
    }


def _field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    name = field.type_name.lstrip(".") if field.type_name else _SCALARS[field.type]
    if field.label == FDP.LABEL_REPEATED:
        return f"repeated {name}"
    return f"optional {name}" if field.proto3_optional else name


def _http(method: descriptor_pb2.MethodDescriptorProto) -> str:
    if not method.options.HasExtension(annotations_pb2.http):
        return "internal (not routed at the edge)"
    rule = method.options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    return f"`{verb.upper()} {getattr(rule, verb)}`"


def _services(
    file: descriptor_pb2.FileDescriptorProto, docs: dict[tuple[int, ...], str]
) -> Iterator[str]:
    for s, service in enumerate(file.service):
        yield f"### service `{file.package}.{service.name}`\n\n{docs.get((_SERVICE, s), '')}\n"
        yield "| RPC | request → response | REST | description |\n|---|---|---|---|"
        for m, method in enumerate(service.method):
            stream = "stream " if method.server_streaming else ""
            types = (
                f"`{method.input_type.lstrip('.')}` → {stream}`{method.output_type.lstrip('.')}`"
            )
            comment = docs.get((_SERVICE, s, _METHOD, m), "")
            yield f"| `{method.name}` | {types} | {_http(method)} | {comment} |"
        yield ""


def _messages(
    file: descriptor_pb2.FileDescriptorProto, docs: dict[tuple[int, ...], str]
) -> Iterator[str]:
    for i, message in enumerate(file.message_type):
        yield f"### message `{file.package}.{message.name}`\n\n{docs.get((_MESSAGE, i), '')}\n"
        if not message.field:
            yield "_No fields._\n"
            continue
        yield "| field | type | description |\n|---|---|---|"
        # A map is a repeated nested entry type with the map_entry option (a message
        # named "...Entry", e.g. AuditEntry, is not one).
        maps = {
            f".{file.package}.{message.name}.{nested.name}": nested
            for nested in message.nested_type
            if nested.options.map_entry
        }
        for f, field in enumerate(message.field):
            entry = maps.get(field.type_name)
            if entry is not None:
                key, value = (_field_type(part) for part in entry.field)
                kind = f"map<{key}, {value}>"
            else:
                kind = _field_type(field)
            yield f"| `{field.name}` | `{kind}` | {docs.get((_MESSAGE, i, _FIELD, f), '')} |"
        yield ""


def _enums(
    file: descriptor_pb2.FileDescriptorProto, docs: dict[tuple[int, ...], str]
) -> Iterator[str]:
    for e, enum in enumerate(file.enum_type):
        yield f"### enum `{file.package}.{enum.name}`\n\n{docs.get((_ENUM, e), '')}\n"
        yield "| value | number | description |\n|---|---|---|"
        for v, value in enumerate(enum.value):
            yield f"| `{value.name}` | {value.number} | {docs.get((_ENUM, e, _VALUE, v), '')} |"
        yield ""


def render() -> str:
    """Returns the API reference as Markdown."""
    with tempfile.TemporaryDirectory() as tmp:
        path = protos.build_descriptor_set(Path(tmp) / "api.pb")
        files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    lines = [
        "# tokenmesh API reference",
        "",
        "Generated from `proto/` by `make docs` (`python -m gateway.apidocs`); do not edit.",
        "REST paths are served by the Envoy edge (JSON bodies use the proto field names;",
        "`int64` fields are JSON strings). Errors carry `google.rpc` details.",
        "",
    ]
    for file in files:
        if not file.package.startswith("tokenmesh."):
            continue
        docs = _comments(file.source_code_info)
        lines += [f"## `{file.name}`", ""]
        lines += [*_services(file, docs), *_enums(file, docs), *_messages(file, docs)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
