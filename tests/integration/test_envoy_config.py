"""The generated Envoy bootstrap is accepted by the real Envoy binary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway import envoy_config, protos
from gateway.envoy_config import EdgeConfig, Endpoint
from services.launcher.mesh import envoy_binary

ENVOY_VERSION_FILE = Path(__file__).resolve().parents[2] / "gateway" / "ENVOY_VERSION"


def _validate(tmp_path: Path, config: EdgeConfig) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config.bootstrap(config)))
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(tmp_path: Path, **overrides) -> EdgeConfig:
    upstreams = {
        name: [Endpoint("127.0.0.1", 10000 + i)]
        for i, name in enumerate(envoy_config.HEALTH_SERVICE)
    }
    values: dict[str, Any] = dict(
        listen_port=18080,
        admin_socket=Path("/tmp/envoy-admin.sock"),
        descriptor_path=protos.build_descriptor_set(tmp_path / "d.pb"),
        upstreams=upstreams,
    )
    values.update(overrides)
    return EdgeConfig(**values)


def test_bootstrap_validates(tmp_path):
    result = _validate(tmp_path, _config(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_bootstrap_with_tracing_validates(tmp_path):
    result = _validate(tmp_path, _config(tmp_path, otlp_endpoint=Endpoint("127.0.0.1", 4317)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_version_is_the_pinned_one():
    result = subprocess.run(
        [str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30
    )
    assert f"/{ENVOY_VERSION_FILE.read_text().strip()}/" in result.stdout


def test_standalone_render_with_dns_names_validates(tmp_path):
    out = tmp_path / "edge.yaml"
    env = {
        **os.environ,
        "TOKENMESH_ROUTER_ADDR": "localhost:50052",
        "TOKENMESH_DESCRIPTOR": str(tmp_path / "d.pb"),
    }
    subprocess.run(
        [sys.executable, "-m", "gateway", "render", "--out", str(out)],
        env=env,
        check=True,
        timeout=60,
    )
    bootstrap = yaml.safe_load(out.read_text())
    clusters = {c["name"]: c["type"] for c in bootstrap["static_resources"]["clusters"]}
    # Workers come from the router's xDS; the router itself is found by DNS.
    assert clusters["xds"] == "STRICT_DNS" and "inference" not in clusters
    assert bootstrap["dynamic_resources"]["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
