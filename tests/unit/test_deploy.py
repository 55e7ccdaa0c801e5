"""deploy/: Kubernetes manifests validate offline against the API schemas.

cert-manager's resources are not in kubernetes-validate's schemas: their
shape is checked here (required fields, issuers that exist, lifetimes), and
so is what mTLS needs from every workload (an identity with a Certificate,
mounted where TOKENMESH_PKI_DIR points, probes that present it) and the
graph the NetworkPolicies allow.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import os
import re
import secrets
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway import drain
from gateway.__main__ import EdgeSettings
from services.core import contract, pki, redis_acl
from services.core.settings import ServerSettings, load
from services.inference.service import InferenceSettings
from services.launcher import mesh

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
CERT_MANAGER = "cert-manager.io/v1"


@functools.cache
def _documents() -> list[dict[str, Any]]:
    """Returns every manifest (parsed once: tests must not modify them)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _kubernetes_documents() -> list[dict[str, Any]]:
    return [d for d in _documents() if d["apiVersion"] != CERT_MANAGER]


@pytest.mark.parametrize(
    "doc", _kubernetes_documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
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
    command = container["readinessProbe"]["exec"]["command"]
    assert command[-2:] == ["--grpc-service", "tokenmesh.inference.v1.InferenceService"]


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_the_image_runs_every_service_by_name():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = (ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()
    for service in ("auth", "router", "usage", "jobs", "inference"):
        assert f"tokenmesh-{service}" in scripts
        assert service in entrypoint
    for deployment in ("auth", "router", "usage", "jobs", "inference", "edge"):
        args = _deployment(deployment)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args == [deployment]


# ---------------------------------------------------------------------------
# cert-manager: issuers and identities
# ---------------------------------------------------------------------------

ISSUER_TYPES = {"selfSigned", "ca", "acme", "vault", "venafi"}
PRIVATE_KEY = {"algorithm": "ECDSA", "size": 256}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _documents() if d["kind"] == kind]


def _hours(duration: str) -> float:
    """Parses a cert-manager (Go) duration made of h/m/s parts, e.g. "24h", "1h30m"."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def _identity_certificates() -> dict[str, dict[str, Any]]:
    """Returns identity -> the Certificate whose URI SAN is its SPIFFE id."""
    found: dict[str, dict[str, Any]] = {}
    for cert in _of_kind("Certificate"):
        for uri in cert["spec"].get("uris", []):
            identity = pki.identity_of(uri)
            assert identity is not None, f"{cert['metadata']['name']}: {uri} is no mesh SPIFFE id"
            assert identity not in found, f"two Certificates for {identity}"
            found[identity] = cert
    return found


def test_cert_manager_resources_have_their_required_fields():
    issuers = {d["metadata"]["name"]: d for d in _of_kind("Issuer")}
    assert issuers, "no cert-manager Issuer"
    for doc in _documents():
        if doc["apiVersion"] != CERT_MANAGER:
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["kind"] in {"Issuer", "Certificate"}, name
        assert doc["metadata"]["namespace"] == "tokenmesh", name
        if doc["kind"] == "Issuer":
            assert len(ISSUER_TYPES & set(doc["spec"])) == 1, f"{name}: one issuer type"
            continue
        spec = doc["spec"]
        assert spec["secretName"], name
        assert spec["issuerRef"]["name"] in issuers, f"{name}: unknown issuer"
        assert spec["issuerRef"].get("kind", "Issuer") == "Issuer", name
        assert any(spec.get(k) for k in ("commonName", "dnsNames", "uris")), name
        assert spec["privateKey"].items() >= PRIVATE_KEY.items(), f"{name}: ECDSA P-256"
        assert _hours(spec["renewBefore"]) < _hours(spec["duration"]), name


def test_the_ca_chain_is_self_signed_bootstrap_then_ca_issuer():
    issuers = {d["metadata"]["name"]: d["spec"] for d in _of_kind("Issuer")}
    ca_issuers = [spec["ca"]["secretName"] for spec in issuers.values() if "ca" in spec]
    assert len(ca_issuers) == 1
    ca_cert = next(c for c in _of_kind("Certificate") if c["spec"]["secretName"] == ca_issuers[0])[
        "spec"
    ]
    assert ca_cert["isCA"] is True
    assert "selfSigned" in issuers[ca_cert["issuerRef"]["name"]]
    # The CA keeps its key across renewals: leaves issued before still verify.
    assert ca_cert["privateKey"]["rotationPolicy"] == "Never"


def test_every_identity_certificate_is_short_lived_and_named_like_the_local_ca():
    certificates = _identity_certificates()
    ca_issuer = next(d["metadata"]["name"] for d in _of_kind("Issuer") if "ca" in d["spec"])
    assert set(certificates) <= set(contract.IDENTITIES)
    for identity, cert in certificates.items():
        spec = cert["spec"]
        assert spec["uris"] == [pki.spiffe_id(identity)]
        assert f"{identity}.{pki.TRUST_DOMAIN}" in spec["dnsNames"]
        assert _hours(spec["duration"]) == pki.LEAF_LIFETIME.total_seconds() / 3600
        assert _hours(spec["renewBefore"]) == _hours(spec["duration"]) * pki.RENEW_WHEN_LEFT
        assert spec["issuerRef"]["name"] == ca_issuer
        assert "client auth" in spec["usages"]
        assert spec["privateKey"]["rotationPolicy"] == "Always"


# ---------------------------------------------------------------------------
# Workloads: every one has its identity mounted, probes that present it
# ---------------------------------------------------------------------------


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _identity_of(deployment: dict[str, Any]) -> str:
    service = _container(deployment)["args"][0]
    explicit = _env(_container(deployment)).get("TOKENMESH_IDENTITY")
    return explicit or contract.SERVICE_IDENTITY.get(service, service)


def _pki_deployments() -> list[dict[str, Any]]:
    return [d for d in _of_kind("Deployment") if d["metadata"]["name"] != "redis-limits"]


@pytest.mark.parametrize("deployment", _pki_deployments(), ids=lambda d: d["metadata"]["name"])
def test_every_deployment_mounts_its_identity_where_tokenmesh_pki_dir_points(deployment):
    identity = _identity_of(deployment)
    certificate = _identity_certificates()[identity]
    container = _container(deployment)
    pki_dir = _env(container)["TOKENMESH_PKI_DIR"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == pki_dir)
    assert mount.get("readOnly") is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (source,) = volumes[mount["name"]]["projected"]["sources"]
    assert source["secret"]["name"] == certificate["spec"]["secretName"]
    items = {i["key"]: i["path"] for i in source["secret"]["items"]}
    files = pki.IdentityFiles.of(Path(pki_dir), identity)
    assert items == {"ca.crt": files.ca.name, "tls.crt": files.cert.name, "tls.key": files.key.name}
    # The files are readable by the service user only through the pod's fsGroup.
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


@pytest.mark.parametrize("deployment", _pki_deployments(), ids=lambda d: d["metadata"]["name"])
def test_no_probe_speaks_plaintext_grpc_to_an_mtls_server(deployment):
    container = _container(deployment)
    service = container["args"][0]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        assert "grpc" not in probe, f"{kind}: Kubernetes' grpc probe has no client certificate"
        if "exec" in probe:
            command = probe["exec"]["command"]
            assert command[:4] == ["python", "-m", "services.core.probe", service]


def test_every_public_identity_in_use_has_a_certificate():
    used = {_identity_of(d) for d in _pki_deployments()}
    assert used == {"edge", "auth", "router", "usage", "jobs", "worker"}
    assert used | {contract.OPERATOR} <= set(_identity_certificates())


# ---------------------------------------------------------------------------
# The edge: only TLS leaves the pod
# ---------------------------------------------------------------------------


def test_the_edge_service_exposes_only_the_tls_port():
    edge = _deployment("edge")
    container = _container(edge)
    env = _env(container)
    settings = load(EdgeSettings, env)
    assert settings.listen_host == "127.0.0.1", "the plaintext listener stays in the pod"
    assert settings.tls_host == "0.0.0.0"
    assert settings.pki_dir is not None
    # Besides TLS, the pod opens only Envoy's statistics (for Prometheus, not in the Service).
    assert [p["containerPort"] for p in container["ports"]] == [
        settings.tls_port,
        settings.stats_port,
    ]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = next(d for d in _of_kind("Service") if d["metadata"]["name"] == "edge")
    targets = [named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]]
    assert targets == [settings.tls_port]
    # The served certificate is mounted, from a Secret some Certificate fills.
    assert settings.tls_cert is not None and settings.tls_key is not None
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[str(settings.tls_cert.parent)]
    volumes = {v["name"]: v for v in edge["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[volume]["secret"]["secretName"]
    assert secret in {c["spec"]["secretName"] for c in _of_kind("Certificate")}
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


# ---------------------------------------------------------------------------
# NetworkPolicies: the graph they allow is exactly the intended one
# ---------------------------------------------------------------------------

GRPC, REDIS = 50051, 6379
#: (from, to, port) inside the namespace: everything else is refused.
INTENDED_EDGES = {
    ("edge", "auth", GRPC),
    ("edge", "router", GRPC),  # its RPCs and the xDS control plane
    ("edge", "usage", GRPC),
    ("edge", "inference", GRPC),
    ("inference", "router", GRPC),  # registration
    ("auth", "redis", REDIS),
    ("router", "redis", REDIS),
    ("usage", "redis", REDIS),
    ("inference", "redis", REDIS),
    ("usage", "redis-limits", REDIS),
    ("inference", "redis-limits", REDIS),
    ("edge", "jobs", GRPC),
    ("jobs", "inference", GRPC),  # a job's items, run as their owner
    ("jobs", "redis", REDIS),
}
ANYWHERE = "*"
DNS = "namespace:kube-system"
MONITORING = "namespace:monitoring"
#: Public addresses only: the jobs service's webhooks (an ipBlock without private ranges).
PUBLIC_INTERNET = "public:internet"
PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"}


def _workloads() -> dict[str, dict[str, str]]:
    """Returns workload name -> its pods' labels."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for kind in WORKLOAD_KINDS
        for d in _of_kind(kind)
    }


def _selected(selector: dict[str, Any]) -> set[str]:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked"
    wanted = selector.get("matchLabels", {}).items()
    return {name for name, labels in _workloads().items() if labels.items() >= wanted}


def _peers(rule: dict[str, Any], key: str) -> set[str]:
    if key not in rule:
        return {ANYWHERE}
    peers: set[str] = set()
    for peer in rule[key]:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            assert block["cidr"] == "0.0.0.0/0" and PRIVATE_RANGES <= set(block["except"])
            peers.add(PUBLIC_INTERNET)
        elif "namespaceSelector" in peer:
            labels = peer["namespaceSelector"]["matchLabels"]
            peers.add(f"namespace:{labels['kubernetes.io/metadata.name']}")
        else:
            peers |= _selected(peer["podSelector"])
    return peers


def _ports(rule: dict[str, Any]) -> set[int]:
    assert rule.get("ports"), "every rule names its ports"
    return {p["port"] for p in rule["ports"]}


def _allowed(direction: str) -> set[tuple[str, str, int]]:
    """Returns (pod, peer, port) that policies allow in `direction` (Ingress/Egress)."""
    key, peer_key = direction.lower(), "from" if direction == "Ingress" else "to"
    allowed: set[tuple[str, str, int]] = set()
    for policy in _of_kind("NetworkPolicy"):
        assert direction in policy["spec"]["policyTypes"] or key not in policy["spec"]
        for pod in _selected(policy["spec"]["podSelector"]):
            for rule in policy["spec"].get(key, []):
                for peer in _peers(rule, peer_key):
                    allowed |= {(pod, peer, port) for port in _ports(rule)}
    return allowed


def test_network_policies_deny_by_default():
    deny = [
        p
        for p in _of_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


def test_network_policies_allow_exactly_the_intended_graph():
    ingress, egress = _allowed("Ingress"), _allowed("Egress")
    workloads = set(_workloads())
    inside = {
        (source, target, port)
        for (target, source, port) in ingress
        if source in workloads and (source, target, port) in egress
    }
    assert inside == INTENDED_EDGES
    # Nothing is allowed one way only (a half-open rule hides a mistake).
    assert {(s, t, p) for (t, s, p) in ingress if s in workloads} == INTENDED_EDGES
    assert {e for e in egress if e[1] in workloads} == INTENDED_EDGES


def test_only_the_edge_tls_port_is_open_to_anyone():
    outside = {(pod, peer, port) for (pod, peer, port) in _allowed("Ingress") if ":" in peer}
    anyone = {(pod, port) for (pod, peer, port) in _allowed("Ingress") if peer == ANYWHERE}
    assert anyone == {("edge", 8443)}
    # Prometheus scrapes the services' metrics port from its namespace, nothing else.
    assert outside == {
        (w, MONITORING, 9090) for w in ("auth", "router", "usage", "jobs", "inference", "edge")
    }
    # And every pod resolves names; nothing else leaves the namespace.
    leaving = {(pod, peer, port) for (pod, peer, port) in _allowed("Egress") if ":" in peer}
    assert leaving == {(w, DNS, 53) for w in _workloads()} | {("jobs", PUBLIC_INTERNET, 443)}
    assert not [e for e in _allowed("Egress") if e[1] == ANYWHERE]


def test_network_policies_cover_every_workload_and_name_its_real_ports():
    workloads = _workloads()
    covered = {
        pod
        for policy in _of_kind("NetworkPolicy")
        if policy["spec"]["podSelector"]
        for pod in _selected(policy["spec"]["podSelector"])
    }
    assert covered == set(workloads)
    ports = {
        d["metadata"]["name"]: {p["containerPort"] for p in _container(d)["ports"]}
        for kind in WORKLOAD_KINDS
        for d in _of_kind(kind)
    }
    for pod, _peer, port in _allowed("Ingress"):
        assert port in ports[pod], f"{pod} does not listen on {port}"
    for _pod, peer, port in _allowed("Egress"):
        assert peer not in workloads or port in ports[peer], f"{peer} does not listen on {port}"


# ---------------------------------------------------------------------------
# compose: the same mTLS with a local CA, each process holding only its identity
# ---------------------------------------------------------------------------

COMPOSE_IMAGE_USER = 10001  # every container runs as this one uid (deploy/docker/Dockerfile)


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return compose


def _compose_identity(service: dict[str, Any]) -> str:
    command = service["command"][0]
    explicit = service["environment"].get("TOKENMESH_IDENTITY")
    return str(explicit or contract.SERVICE_IDENTITY.get(command, command))


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Returns a compose service's named volumes and where it mounts each."""
    return {
        spec.split(":")[0]: spec.split(":")[1]
        for spec in service.get("volumes", [])
        if not spec.startswith((".", "/"))
    }


def test_compose_keeps_the_workers_usage_spools_in_a_volume_of_their_own() -> None:
    # The spools lived in each container: a `down` or an image update made new
    # containers and the events not shipped yet were lost. A named volume keeps
    # them, where a live worker adopts a gone one's; no other service mounts it.
    services = _compose()["services"]
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    spool_dir = re.search(r"TOKENMESH_USAGE_SPOOL_DIR=(\S+)", dockerfile)
    assert spool_dir is not None
    assert _mounts(services["inference"])["usage-spools"] == spool_dir.group(1)
    assert "usage-spools" in _compose()["volumes"]
    others = [n for n, s in services.items() if n != "inference" and "usage-spools" in _mounts(s)]
    assert others == []


def _volume_files(tmp_path: Path) -> dict[str, set[str]]:
    """Runs the `pki` service's command (`python -m services.core.pki`, as the image's
    entrypoint does) with its container paths under `tmp_path`; returns the files each
    named volume it mounts then holds: what any other service mounting it can read."""
    service = _compose()["services"]["pki"]
    assert service["command"][0] == "pki"

    def here(path: str) -> Path:
        return tmp_path / path.lstrip("/")

    args = [str(here(a)) if a.startswith("/") else a for a in service["command"][1:]]
    pki.main([str(here(service["environment"]["TOKENMESH_PKI_DIR"])), *args])
    return {
        volume: {f.name for f in here(path).iterdir() if not f.name.startswith(".")}
        for volume, path in _mounts(service).items()
    }


def test_compose_runs_every_process_with_only_its_own_identity(tmp_path):
    # Every container runs as the same uid, so file modes protect nothing
    # between them: what a service mounts is what it can read. A shared
    # volume handed a worker (model code, untrusted prompts) the edge's key
    # (any identity header), the operator's (every admin RPC) and the CA's.
    services = _compose()["services"]
    held = _volume_files(tmp_path)
    everyone = {f"{i}{suffix}" for i in pki.IDENTITIES for suffix in (".pem", "-key.pem")}
    assert "ca-key.pem" in set().union(*held.values()), "the pki service keeps the CA's key"
    for name, service in services.items():
        if name == "pki" or "TOKENMESH_PKI_DIR" not in service.get("environment", {}):
            assert name == "pki" or not set(_mounts(service)) & set(held), name
            continue
        identity = _compose_identity(service)
        mounts = _mounts(service)
        readable = set().union(*(held.get(volume, set()) for volume in mounts))
        own = {"ca.pem", f"{identity}.pem", f"{identity}-key.pem"}
        assert readable == own, f"{name} can read {sorted(readable - own)}"
        assert not readable & (everyone - own) and "ca-key.pem" not in readable, name
        # ... and finds them where TOKENMESH_PKI_DIR points, read-only.
        pki_dir = service["environment"]["TOKENMESH_PKI_DIR"]
        (volume,) = [v for v, path in mounts.items() if path.startswith(pki_dir)]
        assert f"{volume}:{pki_dir}:ro" in service["volumes"], name
        assert held[volume] == own, name
        assert service["depends_on"]["pki"] == {"condition": "service_healthy"}, name
    # The CA's key, and every leaf's, stay in volumes no other service mounts.
    for volume, files in held.items():
        users = [n for n, s in services.items() if n != "pki" and volume in _mounts(s)]
        if "ca-key.pem" in files:
            assert users == [], volume
        keys = {f for f in files if f.endswith("-key.pem") and f != "ca-key.pem"}
        assert len(keys) <= 1 or users == [], volume
        assert all(_compose_identity(services[u]) + "-key.pem" in keys for u in users), volume


def test_compose_pki_reports_healthy_only_once_every_identity_is_exported(tmp_path):
    service = _compose()["services"]["pki"]
    _volume_files(tmp_path)
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "test", "-s"]
    # The file it waits for is the last one written (operator: the last identity).
    assert test[3] == f"/var/run/tokenmesh/identities/{pki.IDENTITIES[-1]}/{pki.IDENTITIES[-1]}.pem"
    assert (tmp_path / test[3].lstrip("/")).stat().st_size > 0
    # Each mount point exists in the image, owned by its user, so a fresh named
    # volume starts out writable by the `pki` process.
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert f"for identity in {' '.join(pki.IDENTITIES)};" in dockerfile
    assert 'mkdir -p "/var/run/tokenmesh/identities/$identity"' in dockerfile
    assert f"USER {COMPOSE_IMAGE_USER}" in dockerfile


def test_compose_workers_register_their_own_address_and_the_edge_only_serves_tls():
    services = _compose()["services"]
    # Each worker registers its own address on the route to the router (`auto`: the
    # router sees it connect from there, which the own-address check accepts); the
    # service's name was one address for every replica of `--scale inference=N`,
    # and the own-address check accepts no name.
    assert services["inference"]["environment"]["TOKENMESH_ADVERTISE_HOST"] == "auto"
    assert services["edge"]["ports"] == ["127.0.0.1:8443:8443"]
    assert "pki)" in (ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()


def test_exporting_again_rewrites_nothing(tmp_path):
    # The `pki` service re-runs hourly: an unchanged file keeps its mtime, so no
    # server or channel reloads (IdentityFiles.version) when nothing was renewed.
    issuer, out = tmp_path / "ca", tmp_path / "identities"
    pki.main([str(issuer), "--export", str(out)])
    stamps = {i: pki.IdentityFiles.of(out / i, i).version() for i in pki.IDENTITIES}
    pki.main([str(issuer), "--export", str(out)])
    assert {i: pki.IdentityFiles.of(out / i, i).version() for i in pki.IDENTITIES} == stamps
    pki.LocalCA(issuer).issue("worker")  # a renewal reaches the worker's copy only
    assert pki.export_identity(issuer, "worker", out / "worker")
    assert not pki.export_identity(issuer, "edge", out / "edge")
    assert (out / "worker" / "worker.pem").read_bytes() == (issuer / "worker.pem").read_bytes()
    assert (out / "worker" / "worker-key.pem").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------
# Autoscaling (deploy/k8s/autoscaling: KEDA, or an HPA with prometheus-adapter)
# and scale-down that drains
# ---------------------------------------------------------------------------

AUTOSCALING = K8S / "autoscaling"
KEDA = "keda.sh/v1alpha1"
RPC_TIMEOUTS_S = 10  # the preStop hook's DrainWorker and the worker's own, at most 5 s each


def _autoscaling(overlay: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((AUTOSCALING / overlay).glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _worker_env() -> dict[str, str]:
    container = _deployment("inference")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("overlay", ["keda", "hpa"])
def test_autoscaling_overlays_build_on_the_base_and_list_their_files(overlay):
    kustomization = yaml.safe_load((AUTOSCALING / overlay / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert "../.." in resources
    on_disk = {p.name for p in (AUTOSCALING / overlay).glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) - {"../.."} == on_disk


@pytest.mark.parametrize(
    "doc",
    [d for d in _autoscaling("hpa") + _autoscaling("keda") if d["apiVersion"] != KEDA],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_autoscaling_manifests_are_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_keda_scales_the_worker_deployment_on_queue_depth_and_ttft():
    (scaled,) = [d for d in _autoscaling("keda") if d["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == KEDA
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "inference")
    _deployment(target["name"])  # exists in the base
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"queue-depth", "ttft-p90"}
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] in {"AverageValue", "Value", "Utilization"}
        metadata = trigger["metadata"]
        assert metadata["serverAddress"].startswith("http")
        assert float(metadata["threshold"]) > 0
    assert "tokenmesh_queue_depth" in triggers["queue-depth"]["metadata"]["query"]
    ttft = triggers["ttft-p90"]["metadata"]["query"]
    assert "tokenmesh_time_to_first_token_seconds_bucket" in ttft
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300  # no flapping of GPU pods


def test_hpa_scales_the_worker_deployment_on_metrics_the_adapter_serves():
    docs = _autoscaling("hpa")
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    (adapter,) = [d for d in docs if d["kind"] == "ConfigMap"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "inference")
    _deployment(target["name"])
    served = {r["name"]["as"] for r in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]}
    asked = set()
    for metric in hpa["spec"]["metrics"]:
        source = metric[metric["type"].lower()]
        asked.add(source["metric"]["name"])
        if metric["type"] == "Object":
            described = source["describedObject"]
            assert any(
                d["kind"] == described["kind"] and d["metadata"]["name"] == described["name"]
                for d in _documents()
            ), described
    assert asked == served == {"tokenmesh_queue_depth", "tokenmesh_ttft_p90_seconds"}


def test_worker_scale_down_drains_before_sigterm_within_the_grace_period():
    spec = _deployment("inference")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["python", "-m", "services.inference.prestop"]
    assert importlib.util.find_spec("services.inference.prestop") is not None
    env = _worker_env()
    grace_s = float(env["TOKENMESH_GRACE_SECONDS"])  # the longest stream
    drain_s = float(env["TOKENMESH_DRAIN_DELAY_SECONDS"])
    health_wait_s = load(InferenceSettings, env).drain_health_wait_s
    # preStop: drain delay + wait for streams; then SIGTERM: drain delay (or, when
    # the router does not answer, the health-check wait) + grace again.
    worst_s = 2 * grace_s + drain_s + max(drain_s, health_wait_s) + RPC_TIMEOUTS_S
    assert spec["terminationGracePeriodSeconds"] >= worst_s


# ---------------------------------------------------------------------------
# Disruptions: a node drain or a stopping edge takes nothing down at once
# ---------------------------------------------------------------------------

HOSTNAME = "kubernetes.io/hostname"


def _replicated() -> list[dict[str, Any]]:
    return [d for d in _of_kind("Deployment") if d["spec"].get("replicas", 1) >= 2]


def _selects(selector: dict[str, Any], deployment: dict[str, Any]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return bool(labels.items() >= selector["matchLabels"].items())


def test_the_replicated_deployments_are_the_mesh_services():
    names = {d["metadata"]["name"] for d in _replicated()}
    assert names == {"edge", "auth", "router", "usage", "jobs", "inference"}


@pytest.mark.parametrize("deployment", _replicated(), ids=lambda d: d["metadata"]["name"])
def test_every_replicated_deployment_has_a_disruption_budget_and_spreads_over_nodes(
    deployment,
):
    # Without a budget, a node drain evicted every replica at once (both GPU workers:
    # every model version without a worker for the minutes one takes to load); without
    # spreading, both could sit on the node being drained.
    name, replicas = deployment["metadata"]["name"], deployment["spec"]["replicas"]
    budgets = [
        b for b in _of_kind("PodDisruptionBudget") if _selects(b["spec"]["selector"], deployment)
    ]
    assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets"
    (budget,) = budgets
    assert budget["apiVersion"] == "policy/v1"
    assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    spec = budget["spec"]
    # One replica at a time may go, never none (a drain would block) nor all.
    if "maxUnavailable" in spec:
        allowed = spec["maxUnavailable"]
    else:
        allowed = replicas - spec["minAvailable"]
    assert 1 <= allowed < replicas, f"{name}: {allowed} of {replicas} may go at once"
    spread = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
    by_host = [c for c in spread if c["topologyKey"] == HOSTNAME]
    assert by_host, f"{name}: no spreading over nodes"
    for constraint in by_host:
        assert constraint["maxSkew"] == 1
        assert _selects(constraint["labelSelector"], deployment)


def test_every_disruption_budget_protects_a_deployment():
    for budget in _of_kind("PodDisruptionBudget"):
        assert any(_selects(budget["spec"]["selector"], d) for d in _replicated()), budget


def test_a_stopping_edge_drains_its_streams_within_the_grace_period():
    # Envoy exits at once on SIGTERM: without the preStop drain every stream through
    # a stopping edge (rollout, scale-in, node drain) was cut mid-answer.
    spec = _deployment("edge")["spec"]["template"]["spec"]
    container = _container(_deployment("edge"))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["python", "-m", "gateway", "drain"]
    entrypoint = (ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()
    assert "edge) exec python -m gateway run " in entrypoint  # supervise: drains on SIGTERM
    settings = load(EdgeSettings, _env(container))
    # The edge waits for streams at least as long as a worker lets them run.
    assert settings.drain_s >= float(_worker_env()["TOKENMESH_GRACE_SECONDS"])
    # preStop: the listeners' drain time and the streams; SIGTERM: the same again at
    # worst (streams outliving the first wait); each admin call up to 2 s.
    admin_calls_s = 4 * 2.0
    worst_s = 2 * (drain.LISTENER_DRAIN_S + settings.drain_s + admin_calls_s)
    assert spec["terminationGracePeriodSeconds"] >= worst_s


def _compose_seconds(duration: str) -> float:
    """Returns a compose duration ("2m10s", "130s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts is not None and duration, duration
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_a_stopped_compose_edge_drains_its_streams_before_docker_kills_it():
    # No preStop hook in compose: `docker stop` sends SIGTERM (the supervisor drains)
    # and SIGKILL after stop_grace_period, Docker's 10 s by default, so any stream
    # longer than about 5 s was cut mid-drain.
    edge = _compose()["services"]["edge"]
    settings = load(EdgeSettings, edge["environment"])
    # The streams' bound, each admin call up to 2 s, then Envoy's exit after SIGTERM.
    admin_calls_s = 4 * 2.0
    worst_s = settings.drain_s + admin_calls_s + drain.EXIT_WAIT_S
    assert _compose_seconds(edge["stop_grace_period"]) >= worst_s


def test_a_stopped_compose_service_finishes_its_requests_before_docker_kills_it():
    # Docker's default, 10 s, cut a worker's streams that needed its 30 s grace.
    for name, service in _compose()["services"].items():
        if not str(service.get("image", "")).startswith("tokenmesh") or name == "pki":
            continue
        settings = load(ServerSettings, service.get("environment") or {})
        stop_s = _compose_seconds(service.get("stop_grace_period", "10s"))
        assert stop_s >= settings.grace_s + 10, (name, stop_s)


# Redis ACL users (services/core/redis_acl.py): one per component, `default` off.
REDIS_USERS_SECRET = "tokenmesh-redis-users"
REDIS_HOSTS = {
    "REDIS_URL": "redis.tokenmesh.svc.cluster.local",
    "TOKENMESH_RATELIMIT_REDIS_URL": "redis-limits.tokenmesh.svc.cluster.local",
}


def _redis_workloads() -> list[dict[str, Any]]:
    return [d for d in _documents() if d["metadata"]["name"] in ("redis", "redis-limits")]


def _redis_workload_kinds() -> list[dict[str, Any]]:
    return [d for d in _redis_workloads() if d["kind"] in WORKLOAD_KINDS]


def _service_workloads() -> dict[str, dict[str, Any]]:
    """Returns every workload that runs a service with a Redis user, by that user."""
    found = {}
    for doc in _documents():
        if doc["kind"] in WORKLOAD_KINDS and "args" in _container(doc):
            if _container(doc)["args"][0] in redis_acl.SERVICE_USERS:
                found[_container(doc)["args"][0]] = doc
    return found


def test_deploy_acl_rules_are_the_tables():
    """The rules Redis loads in Kubernetes and compose are the Python table's, rendered
    for Redis 7 (`python -m services.core.redis_acl` prints them)."""
    config = next(
        d for d in _documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "redis-acl"
    )
    assert config["data"]["users.acl"] == redis_acl.render_rules()
    assert _compose()["configs"]["redis-acl"]["content"] == redis_acl.render_rules()
    assert "user default off" in redis_acl.render_rules()


def test_no_service_user_may_write_auth_keys_or_the_registry():
    for user in ("inference", "jobs"):
        writable = [g.pattern for g in redis_acl.USERS[user].grants if g.write]
        for key in (
            "tm:auth:key:key_0",
            "tm:auth:signing:keys",
            "tokenmesh:router:workers",
            "tokenmesh:router:catalog",
        ):
            assert not any(fnmatch.fnmatchcase(key, p) for p in writable), (user, key)
    for name in redis_acl.SERVICE_USERS:
        user = redis_acl.USERS[name]
        assert all(g.pattern != "*" for g in user.grants), name
        assert "+@all" not in user.commands and {"-@admin", "-@dangerous"} <= set(user.commands)


@pytest.mark.parametrize("user", redis_acl.SERVICE_USERS)
def test_every_service_logs_in_to_redis_as_its_own_user(user):
    container = _container(_service_workloads()[user])
    env = {e["name"]: e for e in container["env"]}
    password = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (password["name"], password["key"]) == (REDIS_USERS_SECRET, user)
    for name, host in REDIS_HOSTS.items():
        if name in env or name == "REDIS_URL":
            assert env[name]["value"] == f"redis://{user}:$(REDIS_PASSWORD)@{host}:6379/0"
    # The shared ConfigMap holds no Redis URL (one without a user would be `default`'s).
    config = next(
        d for d in _documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tokenmesh"
    )
    assert not set(REDIS_HOSTS) & set(config["data"])
    service = _compose()["services"][user]
    secret = f"${{TOKENMESH_REDIS_PASSWORD_{user.upper()}}}"
    assert service["environment"]["REDIS_URL"] == f"redis://{user}:{secret}@redis:6379/0"
    if "TOKENMESH_RATELIMIT_REDIS_URL" in service["environment"]:
        assert service["environment"]["TOKENMESH_RATELIMIT_REDIS_URL"] == (
            f"redis://{user}:{secret}@redis-limits:6379/0"
        )


@pytest.mark.parametrize("workload", _redis_workload_kinds(), ids=lambda d: d["metadata"]["name"])
def test_redis_loads_the_acl_file_and_probes_as_a_user(workload):
    spec = workload["spec"]["template"]["spec"]
    container = _container(workload)
    assert container["args"][-2:] == ["--aclfile", "/acl/users.acl"]
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "--user admin" in probe  # `default` is off: an anonymous PING fails
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["passwords"]["secret"]["secretName"] == REDIS_USERS_SECRET
    assert volumes["acl-rules"]["configMap"]["name"] == "redis-acl"
    assert volumes["acl"]["emptyDir"] == {"medium": "Memory"}  # hashes only, never on disk


def _run_acl_script(
    script: str, root: Path, env: dict[str, str], password_files: dict[str, str]
) -> str:
    """Runs a deploy's ACL script with its paths under `root`; returns the ACL file."""
    for name in ("rules", "passwords", "acl"):
        (root / name).mkdir(parents=True)
        script = script.replace(f"/{name}/", f"{root}/{name}/").replace(
            f" /{name}\n", f" {root}/{name}\n"
        )
    (root / "rules" / "users.acl").write_text(redis_acl.render_rules())
    for name, password in password_files.items():
        (root / "passwords" / name).write_text(password + "\n")  # a trailing newline
    subprocess.run(["sh", "-c", script], check=True, env={"PATH": os.environ["PATH"], **env})
    return (root / "acl" / "users.acl").read_text()


def test_the_redis_init_scripts_write_the_tables_acl_file(tmp_path):
    """What Redis loads in Kubernetes and compose is exactly what the table renders
    (tests/integration/test_redis_acl.py loads that into a real Redis)."""
    passwords = {name: f"pw-{name}" for name in redis_acl.USERS}
    expected = redis_acl.render_acl_file(passwords, redis_acl.READ_ONLY_PATTERNS_SINCE)
    for workload in _redis_workload_kinds():
        (init,) = workload["spec"]["template"]["spec"]["initContainers"]
        root = tmp_path / workload["metadata"]["name"]
        assert _run_acl_script(init["command"][2], root, {}, passwords) == expected
    script = _compose()["services"]["redis"]["entrypoint"][2].replace("$$", "$")
    script = script.split("chown")[0]  # then it hands the file to Redis
    env = {f"REDIS_PASSWORD_{name}": password for name, password in passwords.items()}
    assert _run_acl_script(script, tmp_path / "compose", env, {}) == expected


# ---------------------------------------------------------------------------
# Redis persistence: every deployment keeps what `make run` keeps, where it lasts
# ---------------------------------------------------------------------------

PERSISTENCE_OPTIONS = ("appendonly", "appendfsync", "save")
REDIS_DATA_DIR = "/data"  # the redis image's WORKDIR: where redis-server writes without --dir


def _persistence(argv: list[str]) -> dict[str, str]:
    """Returns a redis-server command line's persistence options (name -> value)."""
    return {
        argv[i][2:]: argv[i + 1]
        for i in range(len(argv) - 1)
        if argv[i].startswith("--") and argv[i][2:] in PERSISTENCE_OPTIONS
    }


def _shipped_redis_args() -> dict[str, list[str]]:
    """Returns the command line of every Redis we ship, by "<deployment>/<redis>"."""
    services = _compose()["services"]
    args = {
        f"compose/{name}": service["command"]
        for name, service in services.items()
        if str(service.get("image", "")).startswith("redis:")
    }
    for workload in _redis_workload_kinds():
        args[f"k8s/{workload['metadata']['name']}"] = _container(workload)["args"]
    return args


def test_every_deployment_persists_each_redis_as_make_run_does(tmp_path):
    # compose and Kubernetes ran the durable Redis with `appendfsync everysec`
    # while every doc (and the usage spool, which forgets an event once Redis
    # acknowledged it) relied on `always`: a node crash could undo the last
    # second's key revocations, usage and budget charges.
    durable = _persistence(mesh.redis_argv(tmp_path, 6379, durable=True))
    volatile = _persistence(mesh.redis_argv(tmp_path, 6379, durable=False))
    assert durable == {"appendonly": "yes", "appendfsync": "always", "save": ""}
    assert volatile == {"appendonly": "no", "save": ""}
    shipped = _shipped_redis_args()
    assert set(shipped) == {
        f"{d}/{r}" for d in ("compose", "k8s") for r in ("redis", "redis-limits")
    }
    for name, argv in shipped.items():
        assert "--dir" not in argv, f"{name}: writes to {REDIS_DATA_DIR}, where its volume is"
        expected = volatile if name.endswith("/redis-limits") else durable
        assert _persistence(argv) == expected, name


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(f"--{name}") + 1]


def _megabytes(quantity: str) -> float:
    """Returns a Kubernetes memory quantity (Mi, Gi) or a Redis one (mb) in MiB."""
    units = {"Mi": 1, "Gi": 1024, "mb": 1}
    unit = next(u for u in units if quantity.endswith(u))
    return float(quantity[: -len(unit)]) * units[unit]


def test_every_shipped_redis_bounds_its_memory_under_its_containers_limit():
    # Neither had maxmemory: the response cache (the volatile Redis) or usage rows
    # (the durable one) grew into the container's limit, an OOM kill; the durable
    # one then replayed its AOF into the same limit.
    policies = {"redis": "noeviction", "redis-limits": "allkeys-lru"}
    for name, argv in _shipped_redis_args().items():
        redis = name.split("/", 1)[1]
        assert _option(argv, "maxmemory-policy") == policies[redis], name
        assert _megabytes(_option(argv, "maxmemory")) > 0, name
    for workload in _redis_workload_kinds():
        container = _container(workload)
        limit = _megabytes(container["resources"]["limits"]["memory"])
        bound = _megabytes(_option(container["args"], "maxmemory"))
        assert bound <= 0.75 * limit, workload["metadata"]["name"]  # fork and buffers


def test_the_durable_redis_keeps_its_data_in_a_volume_that_outlives_its_container():
    compose = _compose()
    services = compose["services"]
    # A named volume: the image's anonymous /data volume is not reattached by
    # `docker compose down` then `up`, so Redis came back empty (every API key,
    # signing key, usage total, budget and job gone).
    durable = _mounts(services["redis"])
    assert list(durable.values()) == [REDIS_DATA_DIR], durable
    assert set(durable) <= set(compose["volumes"]), "declared top-level: a named volume"
    # The volatile one is disposable by design: nothing on disk, no volume.
    assert not _mounts(services["redis-limits"])
    assert services["redis-limits"]["tmpfs"] == [REDIS_DATA_DIR]
    (redis,) = [w for w in _redis_workload_kinds() if w["metadata"]["name"] == "redis"]
    assert redis["kind"] == "StatefulSet"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in _container(redis)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == REDIS_DATA_DIR
    (limits,) = [w for w in _redis_workload_kinds() if w["metadata"]["name"] == "redis-limits"]
    assert "volumeClaimTemplates" not in limits["spec"]
    assert REDIS_DATA_DIR not in {m["mountPath"] for m in _container(limits)["volumeMounts"]}


# What each image command runs, by its settings (deploy/docker/entrypoint.sh).
def _settings_classes() -> dict[str, type]:
    from services.auth.service import AuthSettings
    from services.jobs.service import JobsSettings
    from services.router.service import RouterSettings
    from services.usage.service import UsageSettings

    return {
        "auth": AuthSettings,
        "router": RouterSettings,
        "usage": UsageSettings,
        "jobs": JobsSettings,
        "inference": InferenceSettings,
        "edge": EdgeSettings,
    }


def _image_env() -> dict[str, str]:
    """The Dockerfile's ENV (KEY=VALUE pairs of its ENV instructions)."""
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    return dict(
        pair.split("=", 1)
        for line in text.splitlines()
        if line.startswith("ENV ")
        for pair in line.split()[1:]
    )


def _interpolated(value: Any) -> str:
    """A compose value with ${VAR...} from .env replaced by what the recipe writes."""

    def dummy(match: re.Match[str]) -> str:
        name = match.group(1)
        # The recipe's `openssl rand -hex 24` (a chosen-looking key is refused).
        return "tm_" + secrets.token_hex(24) if name.endswith("BOOTSTRAP_KEY") else "0" * 64

    return re.sub(r"\$\{(\w+)[^}]*\}", dummy, str(value))


def test_every_compose_service_starts_with_its_own_settings():
    # Compose's auth had no server secret: it exited 2, and no request authenticated.
    classes = _settings_classes()
    for service in _compose()["services"].values():
        command = (service.get("command") or [""])[0]
        if command not in classes:
            continue
        environment = {k: _interpolated(v) for k, v in (service.get("environment") or {}).items()}
        load(classes[command], {**_image_env(), **environment})  # raises SettingsError
    # Unsealed, a Redis dump or backup could sign webhook events.
    jobs = _compose()["services"]["jobs"]["environment"]
    assert "TOKENMESH_WEBHOOK_SECRETS_KEY" in jobs


def _tokenmesh_deployments() -> list[dict[str, Any]]:
    return [
        d
        for d in _of_kind("Deployment")
        if any(c["image"].startswith("tokenmesh") for c in _pod(d)["containers"])
    ]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def test_every_tokenmesh_pod_meets_pod_security_restricted():
    # The edge (facing the internet) and the workers (running models) kept a writable
    # root filesystem; no pod dropped its capabilities or set a seccomp profile.
    for deployment in _tokenmesh_deployments():
        name = deployment["metadata"]["name"]
        pod = _pod(deployment)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
    # The edge writes its rendered config, SDS files and admin socket under /tmp.
    edge = _container(_deployment("edge"))
    assert {"name": "tmp", "mountPath": "/tmp"} in edge["volumeMounts"]


def test_the_edges_upstream_services_are_headless_and_keep_serving_while_leaving():
    # A ClusterIP gave each Envoy one host per service (the VIP): balanced per
    # connection, health-checked on another connection than the requests'.
    services = {d["metadata"]["name"]: d for d in _of_kind("Service")}
    for name in ("auth", "router", "usage", "jobs"):
        assert services[name]["spec"].get("clusterIP") == "None", name
        lifecycle = _container(_deployment(name)).get("lifecycle", {})
        assert lifecycle.get("preStop", {}).get("exec", {}).get("command", [""])[0] == "sleep"
    # The client's own address reaches the edge (auth limits failures per source).
    assert services["edge"]["spec"]["externalTrafficPolicy"] == "Local"


def test_every_scraped_pod_names_its_metrics_port_metrics():
    # docs/observability.md's relabelling keeps the container port named `metrics`:
    # every other port of a pod (the mTLS gRPC ones) read as a target that is down.
    for workload in [*_of_kind("Deployment"), *_of_kind("StatefulSet")]:
        template = workload["spec"]["template"]
        if template["metadata"].get("annotations", {}).get("prometheus.io/scrape") != "true":
            continue
        wanted = int(template["metadata"]["annotations"]["prometheus.io/port"])
        named = {
            port["containerPort"]
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
            if port.get("name") == "metrics"
        }
        assert named == {wanted}, workload["metadata"]["name"]
