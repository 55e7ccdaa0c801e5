"""Validates bench/ghz/*.json against the descriptor set (ghz itself is not
installable here): each call must exist and each data object must parse into
the call's request message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from gateway import protos

GHZ_DIR = Path(__file__).resolve().parent / "ghz"
REQUIRED = ("call", "host", "data", "concurrency")


class ConfigError(ValueError):
    """ConfigError says what is wrong with one ghz config."""


def load_pool(descriptor_path: Path) -> descriptor_pool.DescriptorPool:
    """Returns a pool holding every file of a descriptor set."""
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes()).file
    for file in files:
        pool.Add(file)
    return pool


def validate(
    config: dict[str, Any], pool: descriptor_pool.DescriptorPool, source: str = "config"
) -> str:
    """Returns the full method name a ghz config calls; raises ConfigError when invalid."""
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    if "total" not in config and "duration" not in config:
        raise ConfigError(f"{source}: needs total or duration (bounded load)")
    if "protoset" not in config and "proto" not in config:
        raise ConfigError(f"{source}: needs protoset or proto")
    service_name, _, method_name = config["call"].replace("/", ".").rpartition(".")
    try:
        method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    except KeyError:
        raise ConfigError(
            f"{source}: call {config['call']!r} is not in the descriptor set"
        ) from None
    request_cls = message_factory.GetMessageClass(method.input_type)
    try:
        json_format.ParseDict(config["data"], request_cls())
    except json_format.ParseError as exc:
        raise ConfigError(
            f"{source}: data does not parse as {method.input_type.full_name}: {exc}"
        ) from None
    return f"{service_name}.{method_name}"


def validate_all(descriptor_path: Path | None = None) -> dict[str, str]:
    """Validates every config in bench/ghz; returns {file name: method}."""
    pool = load_pool(descriptor_path or protos.build_descriptor_set())
    return {
        path.name: validate(json.loads(path.read_text()), pool, path.name)
        for path in sorted(GHZ_DIR.glob("*.json"))
    }
