"""deploy/: Kubernetes manifests validate offline against the API schemas."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_an_invalid_manifest_is_rejected():
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "two"},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def _deployment(name: str) -> dict[str, Any]:
    return next(
        d for d in _documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == name
    )


def test_inference_workers_request_a_gpu_and_use_grpc_readiness():
    container = _deployment("inference")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        container["readinessProbe"]["grpc"]["service"] == "tokenmesh.inference.v1.InferenceService"
    )


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_the_image_runs_every_service_by_name():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = (ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()
    for service in ("auth", "router", "usage", "inference"):
        assert f"tokenmesh-{service}" in scripts
        assert service in entrypoint
    for deployment in ("auth", "router", "usage", "inference", "edge"):
        args = _deployment(deployment)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args == [deployment]
