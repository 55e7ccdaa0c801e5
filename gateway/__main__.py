"""Renders the edge's Envoy bootstrap from the environment, and runs Envoy.

Used by the container image (`deploy/`) where upstreams are DNS names::

    python -m gateway render --out /tmp/envoy.yaml
    python -m gateway run            # render, then exec Envoy
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway import envoy_config, protos
from gateway.edge_auth import EdgeAuth
from gateway.envoy_config import EdgeConfig, Endpoint
from services.core.settings import SettingsError, env, load, require


@dataclass(frozen=True)
class EdgeSettings:
    """EdgeSettings configure a standalone edge (outside `make run`)."""

    listen_host: str = env("TOKENMESH_EDGE_HOST", "127.0.0.1", "Address the edge listens on.")
    edge_port: int = env("TOKENMESH_EDGE_PORT", 8080, "The edge's port (REST and gRPC).")
    admin_port: int = env("TOKENMESH_EDGE_ADMIN_PORT", 9901, "Envoy admin port (127.0.0.1 only).")
    auth: str = env("TOKENMESH_AUTH_ADDR", "127.0.0.1:50051", "auth service host:port.")
    router: str = env(
        "TOKENMESH_ROUTER_ADDR",
        "127.0.0.1:50052",
        "router service host:port (its RPCs, and the xDS control plane).",
    )
    usage: str = env("TOKENMESH_USAGE_ADDR", "127.0.0.1:50053", "usage service host:port.")
    node_id: str = env(
        "TOKENMESH_EDGE_NODE_ID", socket.gethostname(), "This edge's xDS node id (unique)."
    )
    descriptor: Path = env(
        "TOKENMESH_DESCRIPTOR", protos.DESCRIPTOR_PATH, "Descriptor set for the transcoder."
    )
    issuer: str = env(
        "TOKENMESH_AUTH_ISSUER", "https://tokenmesh.local/auth", "JWT iss (as the auth service)."
    )
    audience: str = env("TOKENMESH_AUTH_AUDIENCE", "tokenmesh", "JWT aud (as the auth service).")
    jwks_cache_s: float = env(
        "TOKENMESH_AUTH_JWKS_CACHE_SECONDS", 300.0, "How long the JWKS is cached."
    )
    ratelimit_failure_mode_deny: bool = env(
        "TOKENMESH_RATELIMIT_FAILURE_MODE_DENY", False, "Refuse requests while the limiter is down."
    )
    otlp_endpoint: str | None = env(
        "OTEL_EXPORTER_OTLP_ENDPOINT", None, "OTLP/gRPC collector; unset disables tracing."
    )

    def __post_init__(self) -> None:
        require(1 <= self.edge_port <= 65535, "TOKENMESH_EDGE_PORT", "must be 1-65535")
        for variable, value in (
            ("TOKENMESH_AUTH_ADDR", self.auth),
            ("TOKENMESH_ROUTER_ADDR", self.router),
            ("TOKENMESH_USAGE_ADDR", self.usage),
        ):
            require(all(_parse(v) for v in value.split(",")), variable, "must be host:port[,...]")


def _parse(address: str) -> Endpoint | None:
    host, _, port = address.strip().rpartition(":")
    return Endpoint(host, int(port)) if host and port.isdigit() else None


def _endpoints(value: str) -> list[Endpoint]:
    return [e for e in map(_parse, value.split(",")) if e is not None]


def edge_config(settings: EdgeSettings) -> EdgeConfig:
    """Returns the edge configuration described by `settings`."""
    upstreams = {
        "auth": _endpoints(settings.auth),
        "router": _endpoints(settings.router),
        "usage": _endpoints(settings.usage),
    }
    otlp = _parse(settings.otlp_endpoint.split("://", 1)[-1]) if settings.otlp_endpoint else None
    return EdgeConfig(
        listen_host=settings.listen_host,
        listen_port=settings.edge_port,
        admin_port=settings.admin_port,
        descriptor_path=settings.descriptor,
        upstreams=upstreams,
        otlp_endpoint=otlp,
        # Workers, model clusters and routes come from the router's ADS.
        xds=_endpoints(settings.router)[0],
        node_id=settings.node_id,
        auth=EdgeAuth(
            issuer=settings.issuer,
            audience=settings.audience,
            jwks_cache_s=settings.jwks_cache_s,
            ratelimit_failure_mode_deny=settings.ratelimit_failure_mode_deny,
        ),
    )


def main(argv: list[str] | None = None) -> None:
    """Renders the bootstrap (and with `run`, execs Envoy with it)."""
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("command", choices=["render", "run"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tokenmesh-envoy.yaml"))
    args = parser.parse_args(argv)
    try:
        settings = load(EdgeSettings, os.environ)
    except SettingsError as exc:
        print(f"tokenmesh-edge: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.descriptor.exists():
        protos.build_descriptor_set(settings.descriptor)
    args.out.write_text(
        yaml.safe_dump(envoy_config.bootstrap(edge_config(settings)), sort_keys=False)
    )
    if args.command == "run":
        from services.launcher.mesh import envoy_binary

        binary = str(envoy_binary())
        os.execv(binary, [binary, "-c", str(args.out), "--disable-hot-restart"])


if __name__ == "__main__":
    main()
