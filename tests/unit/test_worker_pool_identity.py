"""Worker pool identities (`worker-<pool>`): names, certificates and the caller rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from services.core import contract, pki
from services.core.identity import Authorizer
from services.core.settings import SettingsError, load
from services.inference.service import InferenceSettings


@pytest.mark.parametrize(
    ("identity", "pool"),
    [
        ("worker", ""),
        ("worker-gpu", "gpu"),
        ("worker-a100-80g", "a100-80g"),
        ("worker-", None),
        ("worker-GPU", None),
        ("worker--gpu", None),
        ("worker-gpu-", None),
        ("worker-" + "a" * 33, None),
        ("worker-a/b", None),
        ("edge", None),
        ("workers", None),
        (None, None),
    ],
)
def test_a_worker_pools_identity_names_its_pool(identity, pool):
    assert contract.worker_pool_of(identity) == pool
    assert contract.role_of(identity) == ("worker" if pool is not None else identity)


def test_a_pools_worker_may_call_what_a_worker_may():
    rule = contract.caller_rule("/tokenmesh.router.v1.WorkerRegistryService/RegisterWorker")
    assert rule is not None
    for caller, allowed in (("worker-gpu", True), ("worker", True), ("worker-", False)):
        assert Authorizer._allowed(rule, caller, context=None) is allowed


def test_a_pools_certificate_names_its_pool_and_answers_as_a_worker(tmp_path: Path):
    ca = pki.ensure_local_pki(tmp_path / "pki", ("worker-gpu",))
    cert = x509.load_pem_x509_certificate(ca.dir.joinpath("worker-gpu.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://tokenmesh.local/worker-gpu"
    ]
    # The jobs service reaches workers as "a worker" (the registry checked the pool).
    assert "worker.tokenmesh.local" in san.get_values_for_type(x509.DNSName)


def test_the_pki_command_issues_and_exports_pool_identities(tmp_path: Path, capsys):
    pki.main([str(tmp_path / "pki"), "--worker-pool", "gpu", "--export", str(tmp_path / "out")])
    assert (tmp_path / "pki" / "worker-gpu.pem").exists()
    assert (tmp_path / "out" / "worker-gpu" / "worker-gpu-key.pem").exists()
    assert not (tmp_path / "out" / "worker-gpu" / "ca-key.pem").exists()
    with pytest.raises(SystemExit):
        pki.main([str(tmp_path / "pki"), "--worker-pool", "GPU"])
    assert "--worker-pool 'GPU'" in capsys.readouterr().err


def test_a_worker_runs_as_a_pools_identity():
    assert load(InferenceSettings, {"TOKENMESH_IDENTITY": "worker-gpu"}).identity == "worker-gpu"
    with pytest.raises(SettingsError, match="TOKENMESH_IDENTITY"):
        load(InferenceSettings, {"TOKENMESH_IDENTITY": "worker-"})
