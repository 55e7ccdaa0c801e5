"""A stopping edge lets its streams finish: Envoy drained through its admin API.

A real Envoy (run by `gateway.drain.supervise`, as `python -m gateway run` runs
it in the container) proxies a streaming upstream whose chunks the test
releases. Envoy alone exits at once on SIGTERM and cuts every stream through it
(curl: a partial transfer): each edge rollout, scale-in or node drain did.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import admin as envoy_admin
from gateway import drain
from services.launcher.mesh import envoy_binary
from services.launcher.processes import reserve_port
from tests.envoy_process import ready

CHUNKS = 4
LISTENER_DRAIN_S = 1.0  # Envoy's --drain-time-s for these tests (5 s in the image)
DEADLINE_S = 20.0  # every wait below ends well before this


@dataclass
class Upstream:
    """A streaming HTTP upstream: the first chunk at once, the rest once `finish` is set."""

    port: int
    finish: threading.Event = field(default_factory=threading.Event)
    requests: int = 0


def _handler(upstream: Upstream) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            upstream.requests += 1
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for index in range(CHUNKS):
                    if index == 1:
                        upstream.finish.wait(DEADLINE_S)
                    data = f"token {index}\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the edge cut the stream (past its drain bound)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    state = Upstream(reserve_port())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", state.port), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.finish.set()
    server.shutdown()
    server.server_close()


def _bootstrap(listen: int, admin: Path, upstream: int) -> dict[str, Any]:
    """One HTTP listener in front of `upstream`, with a /healthz health-check filter
    (the edge's readiness path)."""
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    return {
        "admin": {"address": envoy_admin.address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": f"{hcm}.HttpConnectionManager",
                                        "stat_prefix": "edge",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {
                                                                "cluster": "up",
                                                                "timeout": "0s",
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.health_check",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.health_check.v3."
                                                    "HealthCheck",
                                                    "pass_through_mode": False,
                                                    "headers": [
                                                        {
                                                            "name": ":path",
                                                            "string_match": {"exact": "/healthz"},
                                                        }
                                                    ],
                                                },
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "up",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "up",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


@dataclass
class Edge:
    """The supervisor process (Envoy is its child) and Envoy's ports."""

    process: subprocess.Popen[bytes]
    listen: int
    admin: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"


@contextlib.contextmanager
def _edge(
    tmp_path: Path, upstream: Upstream, drain_s: float, listener_drain_s: float = LISTENER_DRAIN_S
) -> Iterator[Edge]:
    listen, admin = reserve_port(), tmp_path / "admin.sock"
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(_bootstrap(listen, admin, upstream.port)))
    argv = [
        str(envoy_binary()),
        "-c",
        str(config),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        *drain.envoy_args(listener_drain_s),
    ]
    # What `python -m gateway run` runs after rendering the edge's bootstrap.
    code = (
        "import sys; from pathlib import Path; from gateway import drain; "
        f"sys.exit(drain.supervise({argv!r}, Path({str(admin)!r}), {drain_s}))"
    )
    with (tmp_path / "edge.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
        try:
            _until(lambda: ready(admin), "Envoy to be ready", process)
            yield Edge(process, listen, admin)
        finally:
            upstream.finish.set()
            if process.poll() is None:  # the test failed: Envoy goes too (SIGTERM)
                process.terminate()
            process.wait(DEADLINE_S)


def _until(condition: Any, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert process is None or process.poll() is None, f"exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class Stream:
    """One streaming GET through the edge, read in a thread of its own."""

    def __init__(self, url: str) -> None:
        self.chunks: list[str] = []
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()
        assert self.first.wait(DEADLINE_S), "the stream's first chunk never came"

    def _read(self, url: str) -> None:
        try:
            with httpx.stream("GET", url, timeout=DEADLINE_S) as reply:
                for line in reply.iter_lines():
                    self.chunks.append(line)
                    self.first.set()
        except httpx.HTTPError as exc:
            self.error = exc
            self.first.set()

    def result(self) -> tuple[list[str], BaseException | None]:
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive()
        return self.chunks, self.error


def _whole() -> list[str]:
    return [f"token {i}" for i in range(CHUNKS)]


def test_sigterm_drains_an_in_flight_stream_and_refuses_new_connections(
    tmp_path: Path, upstream: Upstream
) -> None:
    with _edge(tmp_path, upstream, drain_s=DEADLINE_S) as edge:
        stream = Stream(f"{edge.url}/generate")
        edge.process.send_signal(signal.SIGTERM)
        # The listeners close after their drain time; the stream keeps going.
        _until(lambda: _refused(edge.listen), "new connections to be refused", edge.process)
        assert edge.process.poll() is None, "Envoy stopped with a stream in flight"
        upstream.finish.set()
        assert stream.result() == (_whole(), None)
        assert edge.process.wait(DEADLINE_S) == 0


def test_the_prestop_drain_waits_for_the_stream_then_sigterm_stops_at_once(
    tmp_path: Path, upstream: Upstream
) -> None:
    with _edge(tmp_path, upstream, drain_s=DEADLINE_S) as edge:
        stream = Stream(f"{edge.url}/generate")
        env = {
            **os.environ,
            "TOKENMESH_EDGE_ADMIN_SOCKET": str(edge.admin),
            "TOKENMESH_EDGE_DRAIN_SECONDS": str(DEADLINE_S),
        }
        hook = subprocess.Popen([sys.executable, "-m", "gateway", "drain"], env=env)
        try:
            # Readiness fails from the start of the drain (the kubelet's probe).
            _until(lambda: drain.draining(edge.admin), "the drain to begin", hook)
            assert httpx.get(f"{edge.url}/healthz", timeout=5).status_code == 503
            _until(lambda: _refused(edge.listen), "new connections to be refused", hook)
            assert hook.poll() is None, "the preStop hook returned with a stream in flight"
            upstream.finish.set()
            assert hook.wait(DEADLINE_S) == 0
        finally:
            if hook.poll() is None:
                hook.kill()
            hook.wait(DEADLINE_S)
        assert stream.result() == (_whole(), None)
        # SIGTERM after the hook: nothing is active, Envoy stops at once.
        edge.process.send_signal(signal.SIGTERM)
        assert edge.process.wait(DEADLINE_S) == 0


def test_a_stream_longer_than_the_drain_bound_is_cut_and_the_edge_stops(
    tmp_path: Path, upstream: Upstream
) -> None:
    bound_s = 2.0
    with _edge(tmp_path, upstream, drain_s=bound_s) as edge:
        stream = Stream(f"{edge.url}/generate")
        started = time.monotonic()
        edge.process.send_signal(signal.SIGTERM)
        assert edge.process.wait(DEADLINE_S) == 0
        assert time.monotonic() - started >= bound_s  # it waited for the stream that long
        chunks, error = stream.result()
        assert chunks == _whole()[:1] and error is not None


def test_an_idle_edge_stops_at_once_without_waiting_out_the_listeners(
    tmp_path: Path, upstream: Upstream
) -> None:
    # Nothing in flight: every `docker stop` (and Ctrl-C) waited the listeners' whole
    # drain time (5 s in the image; a minute here, far past the wait below).
    with _edge(tmp_path, upstream, drain_s=DEADLINE_S, listener_drain_s=60) as edge:
        edge.process.send_signal(signal.SIGTERM)
        assert edge.process.wait(DEADLINE_S) == 0


def test_the_prestop_drain_waits_for_the_listeners_even_when_idle(
    tmp_path: Path, upstream: Upstream
) -> None:
    # The hook runs while Kubernetes takes the pod out of its endpoints: clients that
    # resolved it before are answered until the listeners close, idle or not.
    with _edge(tmp_path, upstream, drain_s=DEADLINE_S) as edge:
        env = {**os.environ, "TOKENMESH_EDGE_ADMIN_SOCKET": str(edge.admin)}
        hook = subprocess.run(
            [sys.executable, "-m", "gateway", "drain"], env=env, timeout=DEADLINE_S
        )
        assert hook.returncode == 0
        assert _refused(edge.listen), "the hook returned before the listeners closed"


def _children(pid: int) -> list[int]:
    """Returns the ids of `pid`'s child processes (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Tells whether `pid` is a live process (not gone, not a zombie nobody reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_envoy_stops_when_its_supervisor_is_killed(tmp_path: Path, upstream: Upstream) -> None:
    # Outside a container nothing else stops Envoy: it ran on, holding the edge's ports.
    with _edge(tmp_path, upstream, drain_s=DEADLINE_S) as edge:
        (envoy,) = _children(edge.process.pid)
        try:
            edge.process.kill()
            edge.process.wait(DEADLINE_S)
            _until(lambda: not _running(envoy), "Envoy to exit after its supervisor")
            assert envoy_admin.request(edge.admin, "/ready") is None and _refused(edge.listen)
        finally:
            if _running(envoy):  # the old code's orphan: not left behind for other tests
                os.kill(envoy, signal.SIGKILL)
