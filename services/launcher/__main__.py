"""`make run`: starts the local mesh, prints how to use it, stops it on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.edge_auth import DEFAULT_TOKEN_TTL_S, LONGEST_TOKEN_TTL_S, EdgeAuth
from services.core.settings import SettingsError, env, load, require
from services.launcher.lock import StateDirBusy
from services.launcher.mesh import Mesh, MeshConfig, PortInUse, StatePathTooLong
from services.launcher.processes import Interrupted

logger = logging.getLogger("tokenmesh")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_STATE_DIR = Path(".tokenmesh")


@dataclass(frozen=True)
class LauncherSettings:
    """LauncherSettings configure `make run`."""

    state_dir: Path = env(
        "TOKENMESH_STATE_DIR", DEFAULT_STATE_DIR, "Local state: logs, Redis data, configs."
    )
    edge_port: int = env(
        "TOKENMESH_EDGE_PORT", 8080, "The edge's port on 127.0.0.1 (REST and gRPC)."
    )
    edge_tls_port: int = env(
        "TOKENMESH_EDGE_TLS_PORT", 8443, "The edge's HTTPS / gRPC-over-TLS port; 0 disables it."
    )
    edge_tls_cert: Path | None = env(
        "TOKENMESH_EDGE_TLS_CERT",
        None,
        "Certificate chain (PEM) the TLS port serves; default: one from the local CA. "
        "Replacing the file is picked up without a restart.",
    )
    edge_tls_key: Path | None = env(
        "TOKENMESH_EDGE_TLS_KEY", None, "The key of TOKENMESH_EDGE_TLS_CERT (PEM)."
    )
    workers: int = env("TOKENMESH_WORKERS", 2, "Inference workers to start.")
    redis_url: str | None = env(
        "REDIS_URL", None, "Use this Redis instead of starting the bundled one."
    )
    otlp_endpoint: str | None = env(
        "OTEL_EXPORTER_OTLP_ENDPOINT", None, "OTLP/gRPC collector for Envoy and every service."
    )
    ratelimit_failure_mode_deny: bool = env(
        "TOKENMESH_RATELIMIT_FAILURE_MODE_DENY", False, "Refuse requests while the limiter is down."
    )
    token_ttl_s: int = env(
        "TOKENMESH_AUTH_TOKEN_TTL_SECONDS",
        DEFAULT_TOKEN_TTL_S,
        "JWT lifetime (the auth service's; the edge refuses longer-lived tokens).",
    )

    def __post_init__(self) -> None:
        require(1 <= self.edge_port <= 65535, "TOKENMESH_EDGE_PORT", "must be 1-65535")
        require(1 <= self.workers <= 16, "TOKENMESH_WORKERS", "must be 1-16")
        require(
            60 <= self.token_ttl_s <= LONGEST_TOKEN_TTL_S,
            "TOKENMESH_AUTH_TOKEN_TTL_SECONDS",
            f"must be 60-{LONGEST_TOKEN_TTL_S} (as the auth service's)",
        )
        require(0 <= self.edge_tls_port <= 65535, "TOKENMESH_EDGE_TLS_PORT", "must be 0-65535")
        require(
            self.edge_tls_port != self.edge_port,
            "TOKENMESH_EDGE_TLS_PORT",
            f"must differ from TOKENMESH_EDGE_PORT ({self.edge_port})",
        )
        require(
            self.redis_url is None or self.redis_url.startswith(REDIS_SCHEMES),
            "REDIS_URL",
            f"must start with {', '.join(REDIS_SCHEMES)}",
        )
        require(
            (self.edge_tls_cert is None) == (self.edge_tls_key is None),
            "TOKENMESH_EDGE_TLS_CERT",
            "and TOKENMESH_EDGE_TLS_KEY must be set together",
        )
        for variable, path in (
            ("TOKENMESH_EDGE_TLS_CERT", self.edge_tls_cert),
            ("TOKENMESH_EDGE_TLS_KEY", self.edge_tls_key),
        ):
            require(path is None or path.is_file(), variable, f"{path} is not a file")


def usage_banner(mesh: Mesh) -> str:
    """Returns the copy-paste examples printed once the mesh is up."""
    url, addr = mesh.edge_url, mesh.edge_address
    tls = (
        f"  curl --cacert {mesh.ca_path} {mesh.edge_tls_url}/healthz   "
        "# HTTPS and gRPC over TLS (the local CA)\n"
        if mesh.edge_tls_port
        else ""
    )
    # The tokenmesh lines below read the local mesh from the state dir: name it when it
    # is not the default (they read the default's otherwise).
    state_dir = (
        f"  export TOKENMESH_STATE_DIR={mesh.state_dir}\n"
        if mesh.state_dir != DEFAULT_STATE_DIR.resolve()
        else ""
    )
    return f"""
tokenmesh is up: {url}   (state and logs: {mesh.state_dir})

dev admin API key (also in {mesh.dev_key_path}):
  {mesh.dev_api_key()}

{state_dir}  export TOKENMESH_API_KEY=$(cat {mesh.dev_key_path})
  curl {url}/healthz
{tls}
  curl -H "x-api-key: $TOKENMESH_API_KEY" {url}/v1/models
  curl -N -H "x-api-key: $TOKENMESH_API_KEY" {url}/v1/models/demo-lm:generate \\
       -d '{{"prompt": "And God said", "max_tokens": 32, "seed": 1}}'
  TOKEN=$(.venv/bin/tokenmesh token)
  curl -H "authorization: Bearer $TOKEN" {url}/v1/models/demo-lm:complete \\
       -d '{{"prompt": "Blessed are the", "max_tokens": 16}}'
  curl -H "authorization: Bearer $TOKEN" {url}/v1/models/all-minilm-l6-v2:embed \\
       -d '{{"inputs": ["kitten", "cat"]}}'
  .venv/bin/tokenmesh keys create --tenant acme --scopes inference:generate,models:read --json

canary: demo-lm versions 1 and 2 run on every worker, split 100/0. Try:
  .venv/bin/tokenmesh models split demo-lm 1=80 2=20
  .venv/bin/tokenmesh models list
  curl -si -H "x-api-key: $TOKENMESH_API_KEY" {url}/v1/models/demo-lm:complete \
       -d '{{"prompt": "In the beginning", "max_tokens": 8}}' | grep -i x-model-version

  .venv/bin/python - <<'PY'
import grpc
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
with grpc.insecure_channel("{addr}") as channel:
    stub = rpc.InferenceServiceStub(channel)
    request = pb.GenerateRequest(model="demo-lm", prompt="And God said", max_tokens=16)
    key = open("{mesh.dev_key_path}").read().strip()
    for msg in stub.Generate(request, metadata=[("x-api-key", key)]):
        print(msg.index, repr(msg.text), msg.finish_reason)
PY

Press Ctrl-C to stop everything.
"""


def main() -> None:
    """Runs the mesh until SIGINT or SIGTERM (also while it is still starting).

    Exits 2 when it refuses to start (invalid settings, another mesh on the
    state dir, an edge port in use) and 1 when a child does not come up; both
    end with one `tokenmesh: ...` line on stderr.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = load(LauncherSettings, os.environ)
    except SettingsError as exc:
        print(f"tokenmesh: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    mesh = Mesh(mesh_config(settings))
    # The handler only sets a flag (signal-safe): start() gives up at its next
    # wait, _serve_until returns, and the finally below stops what runs.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: mesh.interrupt())
    failure: tuple[str, int] | None = None
    try:
        failure = _start(mesh, settings)
        if failure is None and not mesh.interrupted:
            mesh.supervise()  # a child that dies is restarted, logged, counted in run/mesh.json
            print(usage_banner(mesh), flush=True)
            _serve_until(mesh)
        if failure is None:
            logger.info("stopping")
    finally:
        mesh.stop()
    if failure is not None:
        message, code = failure
        print(f"tokenmesh: {message}", file=sys.stderr)
        raise SystemExit(code)
    logger.info("stopped; no process left behind")


def mesh_config(settings: LauncherSettings) -> MeshConfig:
    """Returns what `make run` starts, from its settings."""
    return MeshConfig(
        state_dir=settings.state_dir,
        edge_port=settings.edge_port,
        edge_tls_port=settings.edge_tls_port or None,
        edge_tls_cert=settings.edge_tls_cert,
        edge_tls_key=settings.edge_tls_key,
        redis_url=settings.redis_url,
        workers=settings.workers,
        otlp_endpoint=settings.otlp_endpoint,
        edge_auth=EdgeAuth(
            ratelimit_failure_mode_deny=settings.ratelimit_failure_mode_deny,
            token_ttl_s=settings.token_ttl_s,
        ),
    )


def _start(mesh: Mesh, settings: LauncherSettings) -> tuple[str, int] | None:
    """Starts the mesh; returns (one-line message, exit code) when it cannot, None
    when it is up or was interrupted (Ctrl-C / SIGTERM)."""
    try:
        mesh.start()
    except StateDirBusy as exc:
        return f"{exc} (stop it first, or set TOKENMESH_STATE_DIR to another directory)", 2
    except StatePathTooLong as exc:
        return f"{exc}", 2
    except PortInUse as exc:
        variable = (
            "TOKENMESH_EDGE_PORT" if exc.port == settings.edge_port else "TOKENMESH_EDGE_TLS_PORT"
        )
        return f"{exc}: another tokenmesh or program listens there (set {variable})", 2
    except Interrupted:
        logger.info("interrupted while starting")
        return None
    except (RuntimeError, TimeoutError, OSError) as exc:
        if mesh.interrupted:  # Ctrl-C reaches the children too: they may exit first
            logger.info("interrupted while starting")
            return None
        first_line, _, log_tail = str(exc).partition("\n")
        summary = first_line.rstrip(":")
        if log_tail:
            logger.error("%s; its last log lines:\n%s", summary, log_tail)
        return f"could not start: {summary}", 1
    return None


#: How often the launcher looks for certificates due for renewal (a leaf is
#: re-issued once a third of its life is left: 8 h of a 24 h leaf).
RENEWAL_CHECK_INTERVAL_S = 60.0


#: How often the launcher looks at its stop flag and its supervisor.
POLL_INTERVAL_S = 0.2


def _serve_until(mesh: Mesh) -> None:
    """Renews certificates as they fall due until the mesh is interrupted.

    Raises SystemExit when supervision has ended: the mesh must not run on
    with nobody restarting what dies.
    """
    next_renewal = 0.0
    # NOTE: polls a flag rather than waiting on a threading.Event: the signal
    # handler sets it, and Event.set() in a handler can deadlock against an
    # Event.wait() the main thread was interrupted in (both take its lock).
    while not mesh.interrupted:
        if mesh.supervisor is None or not mesh.supervisor.alive():
            logger.error("the supervisor stopped; stopping the mesh")
            raise SystemExit(1)
        if time.monotonic() >= next_renewal:
            next_renewal = time.monotonic() + RENEWAL_CHECK_INTERVAL_S
            try:
                mesh.renew_certificates()
            except OSError as exc:
                logger.error(
                    "renewing certificates failed (retrying in %.0fs): %s",
                    RENEWAL_CHECK_INTERVAL_S,
                    exc,
                )
        time.sleep(POLL_INTERVAL_S)


if __name__ == "__main__":
    main()
