"""`python -m gateway render`: the standalone edge's bootstrap and SDS files from env."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import __main__ as edge_main
from gateway import admin, envoy_config
from gateway.edge_auth import EdgeAuth
from services.core import pki
from services.core.settings import SettingsError, load

CLUSTER_ENV = {
    "TOKENMESH_AUTH_ADDR": "auth.tokenmesh.svc.cluster.local:50051",
    "TOKENMESH_ROUTER_ADDR": "router.tokenmesh.svc.cluster.local:50051",
    "TOKENMESH_USAGE_ADDR": "usage.tokenmesh.svc.cluster.local:50051",
    "TOKENMESH_EDGE_TLS_HOST": "0.0.0.0",
}


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("edge") / "pki"
    pki.ensure_local_pki(path, ("edge",))
    return path


@pytest.fixture
def descriptor(tmp_path: Path) -> Path:
    path = tmp_path / "tokenmesh.pb"
    path.write_bytes(b"")  # render only names it; Envoy's validation is a separate check
    return path


def _render(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "envoy.yaml"
    edge_main.main(["render", "--out", str(out)])
    return yaml.safe_load(out.read_text())


def _listener(bootstrap: Any, name: str) -> dict[str, Any]:
    listeners = bootstrap["static_resources"]["listeners"]
    return next(item for item in listeners if item["name"] == name)


def _address(listener: dict[str, Any]) -> tuple[str, int]:
    socket = listener["address"]["socket_address"]
    return socket["address"], socket["port_value"]


def test_with_a_pki_the_edge_serves_tls_and_speaks_mtls_upstream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki_dir: Path, descriptor: Path
) -> None:
    env = {
        **CLUSTER_ENV,
        "TOKENMESH_PKI_DIR": str(pki_dir),
        "TOKENMESH_DESCRIPTOR": str(descriptor),
    }
    bootstrap = _render(monkeypatch, tmp_path, env)

    sds_dir = tmp_path / "envoy-sds"
    assert sorted(p.name for p in sds_dir.iterdir()) == [
        f"{envoy_config.CA_SECRET}.yaml",
        f"{envoy_config.SERVING_SECRET}.yaml",
        f"{envoy_config.IDENTITY_SECRET}.yaml",
    ]
    identity = yaml.safe_load((sds_dir / f"{envoy_config.IDENTITY_SECRET}.yaml").read_text())
    certificate = identity["resources"][0]["tls_certificate"]
    assert certificate["certificate_chain"]["filename"] == str(pki_dir / "edge.pem")
    assert certificate["watched_directory"]["path"] == str(pki_dir)

    # The plaintext listener stays on loopback; TLS listens where it was told.
    assert _address(_listener(bootstrap, "edge")) == ("127.0.0.1", 8080)
    assert _address(_listener(bootstrap, "edge_tls")) == ("0.0.0.0", 8443)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    for name, peer in (
        ("auth", "auth"),
        ("router", "router"),
        ("usage", "usage"),
        ("xds", "router"),
    ):
        tls = clusters[name]["transport_socket"]["typed_config"]
        matcher = tls["common_tls_context"]["combined_validation_context"]
        assert pki.spiffe_id(peer) in str(matcher), name
    assert bootstrap["node"]["metadata"]["tokenmesh_sds_dir"] == str(sds_dir)


def test_an_operator_certificate_is_served_from_its_own_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki_dir: Path, descriptor: Path
) -> None:
    tls_dir = tmp_path / "edge-tls"
    tls_dir.mkdir()
    (tls_dir / "tls.crt").write_bytes((pki_dir / "edge.pem").read_bytes())
    (tls_dir / "tls.key").write_bytes((pki_dir / "edge-key.pem").read_bytes())
    env = {
        **CLUSTER_ENV,
        "TOKENMESH_PKI_DIR": str(pki_dir),
        "TOKENMESH_DESCRIPTOR": str(descriptor),
        "TOKENMESH_EDGE_TLS_CERT": str(tls_dir / "tls.crt"),
        "TOKENMESH_EDGE_TLS_KEY": str(tls_dir / "tls.key"),
    }
    sds = tmp_path / "sds"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    edge_main.main(["render", "--out", str(tmp_path / "envoy.yaml"), "--sds-dir", str(sds)])

    served = yaml.safe_load((sds / f"{envoy_config.SERVING_SECRET}.yaml").read_text())
    certificate = served["resources"][0]["tls_certificate"]
    assert certificate["certificate_chain"]["filename"] == str(tls_dir / "tls.crt")
    assert certificate["watched_directory"]["path"] == str(tls_dir)


def test_without_a_pki_the_edge_is_plaintext_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, descriptor: Path
) -> None:
    monkeypatch.delenv("TOKENMESH_PKI_DIR", raising=False)
    bootstrap = _render(monkeypatch, tmp_path, {"TOKENMESH_DESCRIPTOR": str(descriptor)})

    names = [item["name"] for item in bootstrap["static_resources"]["listeners"]]
    assert names == ["edge"]
    assert not (tmp_path / "envoy-sds").exists()
    assert all("transport_socket" not in c for c in bootstrap["static_resources"]["clusters"])


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TOKENMESH_EDGE_TLS_CERT": "/x.pem"}, "TOKENMESH_EDGE_TLS_CERT"),
        (
            {"TOKENMESH_EDGE_TLS_CERT": "/x.pem", "TOKENMESH_EDGE_TLS_KEY": "/x-key.pem"},
            "TOKENMESH_EDGE_TLS_CERT",
        ),
        ({"TOKENMESH_EDGE_TLS_PORT": "8080"}, "TOKENMESH_EDGE_TLS_PORT"),
        ({"TOKENMESH_EDGE_TLS_PORT": "70000"}, "TOKENMESH_EDGE_TLS_PORT"),
    ],
)
def test_invalid_tls_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load(edge_main.EdgeSettings, env)


def test_missing_certificate_files_name_their_variable(tmp_path: Path) -> None:
    settings = load(edge_main.EdgeSettings, {"TOKENMESH_PKI_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="TOKENMESH_PKI_DIR"):
        edge_main.check_files(settings)


def test_an_edge_bound_to_one_address_fetches_its_jwks_there(tmp_path: Path) -> None:
    # It dialled 127.0.0.1, where nothing listens: no JWKS, every JWT refused.
    config = envoy_config.EdgeConfig(
        listen_host="10.0.0.5",
        listen_port=18080,
        admin_socket=Path("/tmp/envoy-admin.sock"),
        descriptor_path=tmp_path / "d.pb",
        upstreams={"inference": [envoy_config.Endpoint("127.0.0.1", 10000)]},
        auth=EdgeAuth(),
    )
    clusters = {
        c["name"]: c for c in envoy_config.bootstrap(config)["static_resources"]["clusters"]
    }
    (endpoint,) = clusters["jwks"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["address"] == "10.0.0.5"


def test_the_deployed_edge_keeps_envoys_reuse_port_and_make_runs_does_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki_dir: Path, descriptor: Path
) -> None:
    # A deployed edge is alone in its pod: SO_REUSEPORT (Envoy's default) spreads its
    # connections across worker threads; exclusive_ports (make run: the default) binds alone.
    env = {
        **CLUSTER_ENV,
        "TOKENMESH_PKI_DIR": str(pki_dir),
        "TOKENMESH_DESCRIPTOR": str(descriptor),
        "TOKENMESH_EDGE_STATS_PORT": "9102",
    }
    listeners = _render(monkeypatch, tmp_path, env)["static_resources"]["listeners"]
    assert {item["name"] for item in listeners} == {"edge", "edge_tls", "edge_stats"}
    assert all("enable_reuse_port" not in item for item in listeners)
    settings = load(edge_main.EdgeSettings, env)
    local = replace(edge_main.edge_config(settings, tmp_path / "sds"), exclusive_ports=True)
    assert all(item["enable_reuse_port"] is False for item in envoy_config.listeners(local))


def test_the_admin_api_is_a_unix_socket_of_its_own_per_edge_port():
    # A TCP admin (127.0.0.1:9901) took any web page's POSTs; one socket path for every
    # edge on a host would let a second Envoy take over the first one's.
    first = load(edge_main.EdgeSettings, {"TOKENMESH_EDGE_PORT": "8080"})
    second = load(edge_main.EdgeSettings, {"TOKENMESH_EDGE_PORT": "9080"})
    assert first.admin_socket != second.admin_socket
    # In this user's own directory: a path straight under /tmp, any user could take first.
    own = first.admin_socket.parent
    assert own.stat().st_uid == os.getuid() and own.stat().st_mode & 0o777 == 0o700
    bootstrap = envoy_config.bootstrap(edge_main.edge_config(first, None))
    assert bootstrap["admin"]["address"] == {
        "pipe": {"path": str(first.admin_socket), "mode": 0o600}
    }
    given = load(edge_main.EdgeSettings, {"TOKENMESH_EDGE_ADMIN_SOCKET": "/run/edge/admin.sock"})
    assert given.admin_socket == Path("/run/edge/admin.sock")
    with pytest.raises(SettingsError, match="TOKENMESH_EDGE_ADMIN_SOCKET"):
        load(edge_main.EdgeSettings, {"TOKENMESH_EDGE_ADMIN_SOCKET": "/" + "x" * 120})


def test_a_socket_directory_others_may_open_is_refused(tmp_path):
    squatted = tmp_path / f"tokenmesh-edge-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    squatted.chmod(0o777)  # as another user's, or a world-writable one
    with pytest.raises(ValueError, match="mode 0700"):
        admin.private_dir(tmp_path)
    (tmp_path / "fresh").mkdir()
    assert admin.private_dir(tmp_path / "fresh").stat().st_mode & 0o777 == 0o700
