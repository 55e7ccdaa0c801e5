"""`python -m services.core.probe`: the exec probe Kubernetes runs against an mTLS server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.core import identity, pki, probe
from tests import mtls

SERVICE = "tokenmesh.auth.v1.AuthService"


@pytest.fixture
def auth_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A server presenting the auth identity that requires a mesh client certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", identity.server_credentials(mtls.files("auth")))
    server.start()
    yield port, servicer
    server.stop(None)


def _run(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str) -> int:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        probe.main(list(argv))
        raise SystemExit(0)
    return int(exited.value.code or 0)


def test_serving_is_0_and_not_serving_is_1(monkeypatch, auth_server, capsys) -> None:
    port, servicer = auth_server
    env = {"TOKENMESH_PKI_DIR": str(mtls.pki_dir()), "TOKENMESH_GRPC_PORT": str(port)}
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert _run(monkeypatch, env, "auth", "--grpc-service", SERVICE) == 0

    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _run(monkeypatch, env, "auth", "--grpc-service", SERVICE) == 1
    assert "NOT_SERVING" in capsys.readouterr().out


def test_a_server_with_another_identity_is_refused(monkeypatch, auth_server, capsys) -> None:
    port, _ = auth_server
    # The router's probe expects router.tokenmesh.local: the auth server is not it.
    env = {"TOKENMESH_PKI_DIR": str(mtls.pki_dir()), "TOKENMESH_GRPC_PORT": str(port)}
    assert _run(monkeypatch, env, "router", "--timeout", "2") == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_certificate_from_another_ca_is_refused(
    monkeypatch, auth_server, tmp_path: Path, capsys
) -> None:
    port, _ = auth_server
    pki.ensure_local_pki(tmp_path / "pki", ("auth",))
    env = {"TOKENMESH_PKI_DIR": str(tmp_path / "pki"), "TOKENMESH_GRPC_PORT": str(port)}
    assert _run(monkeypatch, env, "auth", "--timeout", "2") == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_missing_identity_files_are_1(monkeypatch, auth_server, tmp_path: Path, capsys) -> None:
    port, _ = auth_server
    env = {"TOKENMESH_PKI_DIR": str(tmp_path), "TOKENMESH_GRPC_PORT": str(port)}
    assert _run(monkeypatch, env, "auth") == 1
    assert "ca.pem" in capsys.readouterr().err


def test_without_a_port_the_probe_says_what_is_missing(monkeypatch, capsys) -> None:
    monkeypatch.delenv("TOKENMESH_GRPC_PORT", raising=False)
    assert _run(monkeypatch, {}, "auth") == 2
    assert "TOKENMESH_GRPC_PORT" in capsys.readouterr().err


def test_the_identity_follows_the_service_like_the_server() -> None:
    from services.core.server import identity_files
    from services.core.settings import ServerSettings

    for name in ("auth", "router", "usage", "inference"):
        settings = ServerSettings(pki_dir=Path("/pki"))
        expected = identity_files(name, settings)
        assert expected is not None
        assert expected.cert.name == f"{probe.peer_identity(name, settings)}.pem"
