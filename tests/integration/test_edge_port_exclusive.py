"""Every listener of `make run`'s Envoys and of a bare backend owns its port: a second
binder fails instead of sharing.

Envoy 1.40 sets SO_REUSEPORT on listeners by default, so a second `make run`
(or any port-sharing process) bound 8080 too and the kernel split clients
between two meshes with different keys and catalogues. A deployed edge (alone
in its pod) keeps the default: its worker threads share connections more
evenly with it. Real Envoy, real sockets.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import __main__ as edge_main
from gateway import envoy_config, openai_backend, protos
from gateway.__main__ import EdgeSettings
from gateway.envoy_config import EdgeConfig, EdgeTls, Endpoint
from services.core import contract, pki
from services.core.settings import load
from services.launcher.mesh import envoy_binary
from services.launcher.processes import reserve_port
from tests.envoy_process import ready, running_envoy


def _edge(tmp_path: Path, port: int, admin: Path, **changes: Any) -> dict[str, Any]:
    config = EdgeConfig(
        listen_port=port,
        admin_socket=admin,
        descriptor_path=protos.build_descriptor_set(tmp_path / "d.pb"),
        upstreams={
            name: [Endpoint("127.0.0.1", reserve_port())] for name in envoy_config.HEALTH_SERVICE
        },
        auth=None,
        **changes,
    )
    return envoy_config.bootstrap(config)


def _sds_dir(tmp_path: Path) -> Path:
    """Writes the edge's SDS files from a fresh local CA; returns their directory."""
    pki.ensure_local_pki(tmp_path / "pki")
    sds_dir = tmp_path / "sds"
    sds_dir.mkdir()
    for name, content in envoy_config.sds_files(tmp_path / "pki", contract.EDGE).items():
        (sds_dir / name).write_text(yaml.safe_dump(content, sort_keys=False))
    return sds_dir


def _outcome(bootstrap: dict[str, Any], admin: Path, state: Path) -> tuple[int | None, str]:
    """Starts Envoy on `bootstrap` until it exits or is ready; returns (exit code or
    None when it came up, its log)."""
    (state / "second.yaml").write_text(yaml.safe_dump(bootstrap))
    log_path = state / "second.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(envoy_binary()), "-c", str(state / "second.yaml"), "--disable-hot-restart"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None and not ready(admin):
            assert time.monotonic() < deadline, "envoy neither failed nor came up"
            time.sleep(0.05)
        return process.poll(), log_path.read_text()
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def port_sharer() -> Iterator[int]:
    """A listener that allows port sharing (SO_REUSEPORT, as Envoy's default); its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_second_edge_on_the_same_port_fails(tmp_path):
    port = reserve_port()
    first_admin, second_admin = tmp_path / "first.sock", tmp_path / "second.sock"
    (tmp_path / "first").mkdir()
    with running_envoy(_edge(tmp_path, port, first_admin), first_admin, tmp_path / "first"):
        code, log = _outcome(_edge(tmp_path, port, second_admin), second_admin, tmp_path)
    assert code not in (None, 0), "a second edge bound the first one's port"
    assert f"cannot bind '127.0.0.1:{port}': Address already in use" in log


Build = Callable[[Path, int, Path], dict[str, Any]]
LISTENERS: dict[str, Build] = {
    "edge": lambda tmp, port, admin: _edge(tmp, port, admin),
    "edge_tls": lambda tmp, port, admin: _edge(
        tmp, reserve_port(), admin, tls=EdgeTls(port), sds_dir=_sds_dir(tmp)
    ),
    "stats": lambda tmp, port, admin: _edge(
        tmp, reserve_port(), admin, stats=Endpoint("127.0.0.1", port)
    ),
    "openai_backend": lambda tmp, port, admin: openai_backend.bootstrap(
        Endpoint("127.0.0.1", port),
        admin,
        protos.build_descriptor_set(tmp / "d.pb"),
        [Endpoint("127.0.0.1", reserve_port())],
        sds_dir=None,
    ),
}


@pytest.mark.parametrize("listener", sorted(LISTENERS))
def test_no_listener_shares_its_port(tmp_path, port_sharer, listener):
    admin = tmp_path / "admin.sock"
    code, log = _outcome(LISTENERS[listener](tmp_path, port_sharer, admin), admin, tmp_path)
    assert code not in (None, 0), f"the {listener} listener shared port {port_sharer}"
    assert f":{port_sharer}': Address already in use" in log


def test_a_deployed_edge_keeps_envoys_port_sharing(tmp_path, port_sharer):
    """Exclusive everywhere left a multi-worker edge in a pod (where nothing else can
    bind its port) accepting from one socket: connections spread unevenly across its
    worker threads. What `python -m gateway run` renders keeps SO_REUSEPORT."""
    settings = load(EdgeSettings, {})
    assert not edge_main.edge_config(settings).exclusive_ports  # the deploy path
    admin = tmp_path / "admin.sock"
    bootstrap = _edge(tmp_path, port_sharer, admin, exclusive_ports=False)
    code, log = _outcome(bootstrap, admin, tmp_path)
    assert code is None, f"the deployed edge refused a port it may share:\n{log}"
