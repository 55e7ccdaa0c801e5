"""`tokenmesh --edge-tls / --edge-ca` through the edge's real TLS listener.

The edge commands (models, prompts, jobs, webhooks) opened a plaintext channel
whatever the address, and deployments publish only the TLS port (8443): every
one of them failed UNAVAILABLE there. They now speak TLS when asked, verifying
the edge's certificate as the SDK does (grpc.ssl_channel_credentials).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.__main__ import main
from services.core.pki import LocalCA
from services.launcher.mesh import Mesh


def _tls_address(mesh: Mesh) -> str:
    return mesh.edge_tls_url.removeprefix("https://")


@pytest.fixture
def local_mesh(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> Mesh:
    """The session mesh as the CLI's local mesh (run/mesh.json), no TLS setting inherited."""
    monkeypatch.setenv("TOKENMESH_STATE_DIR", str(mesh.state_dir))
    for name in ("TOKENMESH_EDGE_ADDR", "TOKENMESH_EDGE_TLS", "TOKENMESH_EDGE_CA"):
        monkeypatch.delenv(name, raising=False)
    return mesh


@pytest.mark.parametrize("command", [["models", "list"], ["jobs", "list"]], ids=" ".join)
def test_edge_commands_speak_tls_with_the_given_ca(
    local_mesh: Mesh, admin_key: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--edge-address", _tls_address(local_mesh), "--edge-ca", str(local_mesh.ca_path)]
    code = main([*argv, "--api-key", admin_key, *command, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    json.loads(captured.out)


def test_models_list_over_tls_reads_the_catalogue(
    local_mesh: Mesh, admin_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--edge-tls", "--edge-address", _tls_address(local_mesh)]
    argv += ["--edge-ca", str(local_mesh.ca_path), "--api-key", admin_key]
    assert main([*argv, "models", "list", "--json"]) == 0
    names = {model["name"] for model in json.loads(capsys.readouterr().out)["models"]}
    assert "deterministic-test" in names


def test_edge_tls_finds_the_local_meshs_tls_listener_and_ca(
    local_mesh: Mesh, admin_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No address, no CA: the manifest's edge_tls_url, verified with its CA.
    assert main(["--edge-tls", "--api-key", admin_key, "models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"]


def test_the_environment_turns_tls_on(
    local_mesh: Mesh,
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TOKENMESH_EDGE_ADDR", _tls_address(local_mesh))
    monkeypatch.setenv("TOKENMESH_EDGE_CA", str(local_mesh.ca_path))
    assert main(["--api-key", admin_key, "models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"]


def test_an_edge_signed_by_another_ca_is_refused(
    local_mesh: Mesh, admin_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = LocalCA(tmp_path / "other-pki")
    stranger.ensure()
    argv = ["--edge-address", _tls_address(local_mesh), "--edge-ca", str(stranger.cert_path)]
    assert main([*argv, "--api-key", admin_key, "models", "list"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_missing_ca_file_is_named(
    local_mesh: Mesh, admin_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pem"
    argv = ["--edge-address", _tls_address(local_mesh), "--edge-ca", str(missing)]
    assert main([*argv, "--api-key", admin_key, "models", "list"]) == 2  # bad input
    assert "nope.pem" in capsys.readouterr().err


def test_plaintext_to_the_tls_listener_still_fails_unavailable(
    local_mesh: Mesh, admin_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What every edge command did against a deployment's 8443 before --edge-tls."""
    argv = ["--edge-address", _tls_address(local_mesh), "--api-key", admin_key]
    assert main([*argv, "models", "list"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
