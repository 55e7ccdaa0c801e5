"""A supervised mesh restarts what dies, the way Kubernetes would, and only that:
children stopped on purpose stay stopped."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from services.launcher.mesh import Mesh, MeshConfig
from services.launcher.processes import pid_alive
from tests.conftest import TEST_SERVICE_ENV


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = MeshConfig(
        state_dir=tmp_path_factory.mktemp("supervised"),
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env={**TEST_SERVICE_ENV, "TOKENMESH_MODELS": ""},
    )
    with Mesh(config) as mesh:
        mesh.supervise()
        yield mesh


def _manifest(mesh: Mesh) -> dict[str, Any]:
    return dict(json.loads((mesh.run_dir / "mesh.json").read_text()))


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _completes(http: httpx.Client) -> bool:
    body = {"prompt": "are you there", "max_tokens": 2}
    try:
        return http.post("/v1/models/deterministic-test:complete", json=body).status_code == 200
    except httpx.TransportError:
        return False


def test_a_worker_killed_with_9_is_restarted_and_the_edge_serves_through_it(supervised):
    mesh = supervised
    old_pid = mesh.pid("inference-0")
    headers = {"x-api-key": mesh.dev_api_key()}
    with httpx.Client(base_url=mesh.edge_url, headers=headers, timeout=10) as http:
        assert _completes(http)
        mesh.send_signal("inference-0", signal.SIGKILL)
        _wait(
            lambda: (
                _manifest(mesh)["children"]["inference-0"]["state"] == "running"
                and mesh.restarts("inference-0") == 1
            ),
            60,
            "inference-0 to be restarted",
        )
        record = _manifest(mesh)["children"]["inference-0"]
        assert record == {
            "pid": mesh.pid("inference-0"),
            "restarts": 1,
            "last_exit_code": -signal.SIGKILL,
            "state": "running",
        }
        assert mesh.pid("inference-0") != old_pid
        assert not pid_alive(old_pid)
        # One worker: a request that succeeds went through the restarted one.
        _wait(lambda: _completes(http), 30, "the edge to serve through the new worker")
    manifest = _manifest(mesh)
    assert manifest["pids"]["inference-0"] == mesh.pid("inference-0")
    assert all(c["restarts"] == 0 for n, c in manifest["children"].items() if n != "inference-0")


def test_children_stopped_on_purpose_stay_stopped(supervised):
    mesh = supervised
    mesh.kill("usage")
    mesh.terminate("auth")
    assert mesh.wait_exit("auth") == 0
    # A crash after the deliberate stops: once the supervisor has handled it,
    # it has seen the stopped children too, and left them alone.
    restarts = mesh.restarts("inference-0")
    mesh.send_signal("inference-0", signal.SIGKILL)
    _wait(lambda: mesh.restarts("inference-0") == restarts + 1, 60, "inference-0's restart")
    assert {c.name for c in mesh.children}.isdisjoint({"usage", "auth"})
    assert mesh.restarts("usage") == mesh.restarts("auth") == 0
    # The tests' own restarts work as before, and the children are supervised again.
    mesh.restart_service("usage", "usage")
    mesh.restart_service("auth", "auth")
    assert set(_manifest(mesh)["pids"]) >= {"usage", "auth", "inference-0"}
    mesh.send_signal("usage", signal.SIGKILL)
    _wait(lambda: mesh.restarts("usage") == 1, 60, "usage's restart")
