"""Typed settings read once from environment variables.

Each service declares a frozen dataclass whose fields carry their variable
name, default and help via `env()`. `load()` parses and validates it once, in
the service's `__main__`; nothing below `__main__` reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from services.core import api_versions, contract

T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """SettingsError names the variable whose value is invalid."""


class StartupError(RuntimeError):
    """StartupError is a reason a service cannot start that only starting finds (another
    process holds its usage spool): `main` prints it on one line and exits 1."""


def env(name: str, default: Any, help: str) -> Any:
    """Declares a settings field read from the variable `name`."""
    return dataclasses.field(default=default, metadata={"env": name, "help": help})


def _parse(name: str, raw: str, kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [k for k in typing.get_args(kind) if k is not type(None)]
        return None if raw == "" else _parse(name, raw, inner[0])
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError("expected true/false")
            return lowered in _TRUE
        if kind is float:
            return _finite(raw)
        if kind in (int, str):
            return kind(raw)
        if kind is Path:
            return Path(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is invalid: {exc}") from None
    raise TypeError(f"unsupported settings type {kind!r} for {name}")


def _finite(raw: str) -> float:
    """Parses a float setting; refuses nan and infinities ("inf", "1e999").

    A non-finite value slips past every declared bound (nan compares false
    with everything; inf passes `>= 0`) and then quietly breaks the service:
    TOKENMESH_USAGE_CLAIM_IDLE_SECONDS=inf never claims a dead consumer's events.
    """
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def load(cls: type[T], environ: Mapping[str, str]) -> T:
    """Builds `cls` from `environ`; raises SettingsError naming the variable."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = field.metadata.get("env")
        if name is not None and name in environ:
            values[field.name] = _parse(name, environ[name], hints[field.name])
    return cls(**values)


def describe(cls: type[Any]) -> list[tuple[str, str, str]]:
    """Returns (variable, default, help) rows, for docs and --help."""
    rows = []
    for field in dataclasses.fields(cls):
        if "env" in field.metadata:
            default = field.default
            shown = ",".join(default) if isinstance(default, tuple) else str(default)
            rows.append(
                (field.metadata["env"], "" if default is None else shown, field.metadata["help"])
            )
    return rows


def require(condition: bool, variable: str, message: str) -> None:
    """Raises SettingsError for `variable` unless `condition` holds."""
    if not condition:
        raise SettingsError(f"{variable}: {message}")


@dataclass(frozen=True)
class ServerSettings:
    """ServerSettings are shared by every tokenmesh gRPC service."""

    host: str = env("TOKENMESH_HOST", "127.0.0.1", "Address the gRPC server binds.")
    port: int = env("TOKENMESH_GRPC_PORT", 0, "gRPC port; 0 picks a free one.")
    metrics_port: int = env(
        "TOKENMESH_METRICS_PORT", 0, "Prometheus /metrics port; 0 picks one, -1 disables."
    )
    grace_s: float = env(
        "TOKENMESH_GRACE_SECONDS", 30.0, "On SIGTERM, how long in-flight RPCs may finish."
    )
    log_level: str = env("TOKENMESH_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_format: str = env("TOKENMESH_LOG_FORMAT", "text", "text or json.")
    otlp_endpoint: str | None = env(
        "OTEL_EXPORTER_OTLP_ENDPOINT", None, "OTLP/gRPC collector; unset disables tracing."
    )
    ready_file: Path | None = env(
        "TOKENMESH_READY_FILE", None, "Where to write bound ports as JSON once serving."
    )
    pki_dir: Path | None = env(
        "TOKENMESH_PKI_DIR",
        None,
        "mTLS: directory with ca.pem, <identity>.pem and <identity>-key.pem. "
        "Unset serves plaintext (development only).",
    )
    identity: str = env(
        "TOKENMESH_IDENTITY",
        "",
        "This component's identity (its certificate's name); default: worker for "
        "inference, else the service's name. A worker of a pool: worker-<pool>.",
    )
    insecure_peer_identity: str | None = env(
        "TOKENMESH_INSECURE_PEER_IDENTITY",
        None,
        "Plaintext only (benchmarks): the identity every caller is given. "
        "Unset: plaintext callers have none and reach only health.",
    )
    api_deprecations: tuple[str, ...] = env(
        "TOKENMESH_API_DEPRECATIONS",
        (),
        "Deprecated API versions and their sunset dates, e.g. v1=2027-06-30 "
        "(or v1=DEPRECATED/SUNSET): their responses carry Deprecation, Sunset and Link "
        "until the sunset, then they answer UNIMPLEMENTED (REST 410).",
    )
    api_docs_url: str = env(
        "TOKENMESH_API_DOCS_URL",
        "https://tokenmesh.dev/docs",
        "Where the docs/ folder is published: deprecated versions link to "
        "<this>/migration/<old>-to-<new>.md.",
    )

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "TOKENMESH_GRPC_PORT", "must be 0-65535")
        require(-1 <= self.metrics_port <= 65535, "TOKENMESH_METRICS_PORT", "must be -1-65535")
        require(self.grace_s >= 0, "TOKENMESH_GRACE_SECONDS", "must be >= 0")
        require(
            self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
            "TOKENMESH_LOG_LEVEL",
            "must be DEBUG, INFO, WARNING or ERROR",
        )
        require(self.log_format in {"text", "json"}, "TOKENMESH_LOG_FORMAT", "must be text or json")
        require(
            self.identity == "" or contract.is_identity(self.identity),
            "TOKENMESH_IDENTITY",
            f"must be one of {', '.join(contract.IDENTITIES)}, or worker-<pool> (pool: "
            f"{contract.WORKER_POOL_RULE})",
        )
        require(
            self.insecure_peer_identity in (None, *contract.IDENTITIES),
            "TOKENMESH_INSECURE_PEER_IDENTITY",
            f"must be one of {', '.join(contract.IDENTITIES)}",
        )
        require(
            self.pki_dir is None or self.insecure_peer_identity is None,
            "TOKENMESH_INSECURE_PEER_IDENTITY",
            "must be unset when TOKENMESH_PKI_DIR is set (callers prove their identity)",
        )
        try:
            self.deprecation_schedule()
        except ValueError as exc:
            raise SettingsError(f"TOKENMESH_API_DEPRECATIONS: {exc}") from None
        require(
            self.api_docs_url.startswith(("https://", "http://")),
            "TOKENMESH_API_DOCS_URL",
            "must be an http(s) URL",
        )

    def deprecation_schedule(self) -> api_versions.DeprecationSchedule:
        """Returns the API versions' deprecation schedule (TOKENMESH_API_DEPRECATIONS)."""
        return api_versions.DeprecationSchedule.parse(self.api_deprecations, self.api_docs_url)


@dataclass(frozen=True)
class RedisSettings(ServerSettings):
    """RedisSettings add a Redis connection to the server settings."""

    redis_url: str = env(
        "REDIS_URL", "redis://127.0.0.1:6379/0", "Redis the service keeps its state in."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "REDIS_URL",
            "must start with redis://, rediss:// or unix://",
        )
