"""Renders the edge's Envoy bootstrap from the environment, and runs Envoy.

Used by the container image (`deploy/`) where upstreams are DNS names::

    python -m gateway render --out /tmp/envoy.yaml
    python -m gateway run            # render, then run Envoy (drained on SIGTERM)
    python -m gateway drain          # drain the running Envoy (the pod's preStop hook)

With `TOKENMESH_PKI_DIR` (the edge's identity: `ca.pem`, `edge.pem`,
`edge-key.pem`) it also writes Envoy's file-based SDS files (`--sds-dir`,
default `<out stem>-sds` next to the bootstrap): the edge then speaks mTLS to
every upstream and serves HTTPS / gRPC over TLS on `TOKENMESH_EDGE_TLS_PORT`.
Envoy watches the directories of the certificate files, so a renewed leaf
(local CA, cert-manager, SPIRE, an operator's `mv`) is picked up live.

`run` keeps Envoy as its child: on SIGTERM it drains Envoy gracefully (its
streams finish, for at most TOKENMESH_EDGE_DRAIN_SECONDS) before stopping it,
as `drain` does for a preStop hook, and at once when nothing is active. Envoy
gets SIGTERM when `run` dies, however it dies (gateway/drain.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway import admin, drain, envoy_config, protos
from gateway.edge_auth import DEFAULT_TOKEN_TTL_S, LONGEST_TOKEN_TTL_S, EdgeAuth
from gateway.envoy_config import EdgeConfig, EdgeTls, Endpoint
from services.core import contract, logs, pki
from services.core.settings import SettingsError, env, load, require

LOG = logging.getLogger("tokenmesh.edge")


@dataclass(frozen=True)
class EdgeSettings:
    """EdgeSettings configure a standalone edge (outside `make run`)."""

    listen_host: str = env(
        "TOKENMESH_EDGE_HOST",
        "127.0.0.1",
        "Address the plaintext listener binds; keep 127.0.0.1 wherever clients must use TLS.",
    )
    edge_port: int = env("TOKENMESH_EDGE_PORT", 8080, "The plaintext port (REST and gRPC).")
    pki_dir: Path | None = env(
        "TOKENMESH_PKI_DIR",
        None,
        "mTLS: directory with ca.pem, edge.pem and edge-key.pem (the edge's identity). "
        "Unset: plaintext upstreams and no TLS listener (development only).",
    )
    tls_port: int = env(
        "TOKENMESH_EDGE_TLS_PORT",
        8443,
        "HTTPS / gRPC-over-TLS port (needs TOKENMESH_PKI_DIR); 0 disables it.",
    )
    tls_host: str = env(
        "TOKENMESH_EDGE_TLS_HOST", "127.0.0.1", "Address the TLS listener binds (0.0.0.0 in a pod)."
    )
    tls_cert: Path | None = env(
        "TOKENMESH_EDGE_TLS_CERT",
        None,
        "Certificate chain (PEM) the TLS port serves; default: the edge's leaf from the "
        "mesh CA. Replacing the file is picked up without a restart.",
    )
    tls_key: Path | None = env(
        "TOKENMESH_EDGE_TLS_KEY", None, "The key of TOKENMESH_EDGE_TLS_CERT (PEM)."
    )
    admin_socket_setting: Path | None = env(
        "TOKENMESH_EDGE_ADMIN_SOCKET",
        None,
        "Envoy's admin API: a Unix socket (mode 0600), no TCP port: a web page could "
        "send a port's POSTs (debug logging, quit). Default: "
        "/tmp/tokenmesh-edge-<uid>/admin-<host>-<port>.sock (a directory of mode 0700). "
        "`python -m gateway drain` uses it.",
    )
    drain_s: float = env(
        "TOKENMESH_EDGE_DRAIN_SECONDS",
        100.0,
        "On SIGTERM (and `python -m gateway drain`, the preStop hook): how long the "
        "requests in flight may take to finish once Envoy drains (the longest stream).",
    )
    stats_port: int = env(
        "TOKENMESH_EDGE_STATS_PORT",
        0,
        "Port serving only GET /stats/prometheus (Envoy's statistics for Prometheus); 0: none.",
    )
    stats_host: str = env(
        "TOKENMESH_EDGE_STATS_HOST",
        "127.0.0.1",
        "Address the statistics port binds (0.0.0.0 in a pod).",
    )
    auth: str = env("TOKENMESH_AUTH_ADDR", "127.0.0.1:50051", "auth service host:port.")
    router: str = env(
        "TOKENMESH_ROUTER_ADDR",
        "127.0.0.1:50052",
        "router service host:port (its RPCs, and the xDS control plane).",
    )
    usage: str = env("TOKENMESH_USAGE_ADDR", "127.0.0.1:50053", "usage service host:port.")
    jobs: str = env("TOKENMESH_JOBS_ADDR", "127.0.0.1:50054", "jobs service host:port.")
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
    token_ttl_s: int = env(
        "TOKENMESH_AUTH_TOKEN_TTL_SECONDS",
        DEFAULT_TOKEN_TTL_S,
        "JWT lifetime (as the auth service): longer-lived tokens are refused.",
    )
    ratelimit_failure_mode_deny: bool = env(
        "TOKENMESH_RATELIMIT_FAILURE_MODE_DENY", False, "Refuse requests while the limiter is down."
    )
    otlp_endpoint: str | None = env(
        "OTEL_EXPORTER_OTLP_ENDPOINT", None, "OTLP/gRPC collector; unset disables tracing."
    )
    log_format: str = env(
        "TOKENMESH_LOG_FORMAT",
        "text",
        "text or json: Envoy's own log lines and this process's, as the services' "
        "(the access log is JSON either way).",
    )

    @property
    def admin_socket(self) -> Path:
        """Envoy's admin socket: the setting, else one per listen address in this user's
        own directory (`admin.private_dir`: two edges on one host each have theirs; a
        second Envoy takes over a socket path in use).

        Raises:
            SettingsError: that directory is not this user's alone.
        """
        if self.admin_socket_setting is not None:
            return self.admin_socket_setting
        try:
            own = admin.private_dir()
        except ValueError as exc:
            raise SettingsError(f"TOKENMESH_EDGE_ADMIN_SOCKET: {exc}") from None
        return own / f"admin-{self.listen_host}-{self.edge_port}.sock"

    def __post_init__(self) -> None:
        require(1 <= self.edge_port <= 65535, "TOKENMESH_EDGE_PORT", "must be 1-65535")
        require(0 <= self.tls_port <= 65535, "TOKENMESH_EDGE_TLS_PORT", "must be 0-65535")
        require(0 <= self.stats_port <= 65535, "TOKENMESH_EDGE_STATS_PORT", "must be 0-65535")
        require(
            self.admin_socket_setting is None
            or len(str(self.admin_socket_setting).encode()) <= admin.MAX_SOCKET_PATH_BYTES,
            "TOKENMESH_EDGE_ADMIN_SOCKET",
            f"must be at most {admin.MAX_SOCKET_PATH_BYTES} bytes (a Unix socket's path)",
        )
        require(self.log_format in {"text", "json"}, "TOKENMESH_LOG_FORMAT", "must be text or json")
        require(0 <= self.drain_s <= 3600, "TOKENMESH_EDGE_DRAIN_SECONDS", "must be 0-3600")
        require(
            60 <= self.token_ttl_s <= LONGEST_TOKEN_TTL_S,
            "TOKENMESH_AUTH_TOKEN_TTL_SECONDS",
            f"must be 60-{LONGEST_TOKEN_TTL_S} (as the auth service's)",
        )
        require(
            self.tls_port != self.edge_port,
            "TOKENMESH_EDGE_TLS_PORT",
            "must differ from TOKENMESH_EDGE_PORT",
        )
        require(
            (self.tls_cert is None) == (self.tls_key is None),
            "TOKENMESH_EDGE_TLS_CERT",
            "and TOKENMESH_EDGE_TLS_KEY must be set together",
        )
        require(
            self.tls_cert is None or self.pki_dir is not None,
            "TOKENMESH_EDGE_TLS_CERT",
            "needs TOKENMESH_PKI_DIR (the TLS listener's files are served through SDS)",
        )
        for variable, value in (
            ("TOKENMESH_AUTH_ADDR", self.auth),
            ("TOKENMESH_ROUTER_ADDR", self.router),
            ("TOKENMESH_USAGE_ADDR", self.usage),
            ("TOKENMESH_JOBS_ADDR", self.jobs),
        ):
            require(all(_parse(v) for v in value.split(",")), variable, "must be host:port[,...]")


def _parse(address: str) -> Endpoint | None:
    host, _, port = address.strip().rpartition(":")
    return Endpoint(host, int(port)) if host and port.isdigit() else None


def _endpoints(value: str) -> list[Endpoint]:
    return [e for e in map(_parse, value.split(",")) if e is not None]


def check_files(settings: EdgeSettings) -> None:
    """Raises SettingsError naming the variable whose certificate file is missing."""
    if settings.pki_dir is None:
        return
    files = pki.IdentityFiles.of(settings.pki_dir, contract.EDGE)
    for variable, path in (
        ("TOKENMESH_PKI_DIR", files.ca),
        ("TOKENMESH_PKI_DIR", files.cert),
        ("TOKENMESH_PKI_DIR", files.key),
        ("TOKENMESH_EDGE_TLS_CERT", settings.tls_cert),
        ("TOKENMESH_EDGE_TLS_KEY", settings.tls_key),
    ):
        require(path is None or path.is_file(), variable, f"{path} is not a file")


def write_sds_files(settings: EdgeSettings, sds_dir: Path) -> None:
    """Writes the SDS files naming the edge's certificate, the CA and the served certificate.

    Each file is replaced atomically, so a running Envoy never reads half of one.
    """
    if settings.pki_dir is None:
        raise ValueError("the SDS files need TOKENMESH_PKI_DIR")
    # NOTE: absolute(), never resolve(): in Kubernetes a Secret's files are
    # symlinks into a timestamped directory that a renewal swaps out, so a
    # resolved path would point at a directory that disappears.
    serving = (
        (settings.tls_cert.absolute(), settings.tls_key.absolute())
        if settings.tls_cert is not None and settings.tls_key is not None
        else None
    )
    sds_dir.mkdir(parents=True, exist_ok=True)
    files = envoy_config.sds_files(settings.pki_dir.absolute(), contract.EDGE, serving)
    for name, content in files.items():
        tmp = sds_dir / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(content, sort_keys=False))
        tmp.replace(sds_dir / name)


def edge_config(settings: EdgeSettings, sds_dir: Path | None = None) -> EdgeConfig:
    """Returns the edge configuration described by `settings`.

    Args:
        sds_dir: where `write_sds_files` wrote the SDS files; None (or no
            TOKENMESH_PKI_DIR): plaintext upstreams and no TLS listener.
    """
    secure = sds_dir is not None and settings.pki_dir is not None
    upstreams = {
        "auth": _endpoints(settings.auth),
        "router": _endpoints(settings.router),
        "usage": _endpoints(settings.usage),
        "jobs": _endpoints(settings.jobs),
    }
    otlp = _parse(settings.otlp_endpoint.split("://", 1)[-1]) if settings.otlp_endpoint else None
    return EdgeConfig(
        listen_host=settings.listen_host,
        listen_port=settings.edge_port,
        admin_socket=settings.admin_socket,
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
            token_ttl_s=settings.token_ttl_s,
        ),
        sds_dir=sds_dir.absolute() if secure and sds_dir is not None else None,
        tls=EdgeTls(settings.tls_port, settings.tls_host) if secure and settings.tls_port else None,
        stats=Endpoint(settings.stats_host, settings.stats_port) if settings.stats_port else None,
        # The image's edge is alone in its pod (compose: its container), so no second
        # process can share its ports: keep Envoy's SO_REUSEPORT, which balances the
        # few long-lived client connections across its worker threads more evenly.
        exclusive_ports=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Renders the bootstrap (and with `run`, runs Envoy with it); `drain` drains it."""
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("command", choices=["render", "run", "drain"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tokenmesh-envoy.yaml"))
    parser.add_argument(
        "--sds-dir",
        type=Path,
        default=None,
        help="where the SDS files go (with TOKENMESH_PKI_DIR); default: <out stem>-sds",
    )
    args = parser.parse_args(argv)
    try:
        settings = load(EdgeSettings, os.environ)
        logs.configure("INFO", settings.log_format, "edge")
        admin_socket = settings.admin_socket
        if args.command == "drain":
            # The preStop hook: never fails (the kubelet then sends SIGTERM anyway).
            drain.drain(admin_socket, settings.drain_s)
            return
        check_files(settings)
    except SettingsError as exc:
        print(f"tokenmesh-edge: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.descriptor.exists():
        protos.build_descriptor_set(settings.descriptor)
    sds_dir: Path | None = None
    if settings.pki_dir is None:
        LOG.warning(
            "TOKENMESH_PKI_DIR is unset: plaintext upstreams and no TLS listener (development only)"
        )
    else:
        sds_dir = args.sds_dir or args.out.with_name(f"{args.out.stem}-sds")
        write_sds_files(settings, sds_dir)
    args.out.write_text(
        yaml.safe_dump(envoy_config.bootstrap(edge_config(settings, sds_dir)), sort_keys=False)
    )
    if args.command == "run":
        from services.launcher.mesh import envoy_binary

        # A child, not exec: Envoy exits at once on SIGTERM, cutting every stream.
        binary = str(envoy_binary())
        argv = [
            binary,
            "-c",
            str(args.out),
            "--disable-hot-restart",
            *drain.envoy_args(),
            *envoy_config.log_args(settings.log_format),
        ]
        raise SystemExit(drain.supervise(argv, admin_socket, settings.drain_s))


if __name__ == "__main__":
    main()
