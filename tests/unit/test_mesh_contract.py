"""The mesh contract: every RPC has a scope and a caller rule, one copy of each rule."""

from __future__ import annotations

import datetime
import os
import stat

import pytest

from gateway import edge_auth, envoy_config
from services.core import contract, identity, pki
from services.router import service as router_service
from tests import mtls

# Importing the servicers registers every service's descriptor.
from tokenmesh.auth.v1 import auth_service_pb2  # noqa: F401
from tokenmesh.inference.v1 import inference_service_pb2  # noqa: F401
from tokenmesh.inference.v2 import inference_service_pb2 as inference_v2_service_pb2  # noqa: F401
from tokenmesh.jobs.v1 import handover_service_pb2, jobs_service_pb2  # noqa: F401
from tokenmesh.openai.v1 import openai_batch_service_pb2, openai_service_pb2  # noqa: F401
from tokenmesh.router.v1 import router_service_pb2  # noqa: F401
from tokenmesh.usage.v1 import usage_service_pb2  # noqa: F401
from tokenmesh.usage.v2 import usage_service_pb2 as usage_v2_service_pb2  # noqa: F401

PUBLIC_SERVICES = [s for s in envoy_config.TRANSCODED_SERVICES]
INTERNAL_SERVICES = [
    "tokenmesh.inference.v1.InferenceAdminService",
    "tokenmesh.router.v1.WorkerRegistryService",
]


def test_every_public_rpc_has_an_edge_scope():
    missing = [
        m for m in identity.service_methods(PUBLIC_SERVICES) if m not in edge_auth.RPC_SCOPES
    ]
    assert missing == []


def test_every_rpc_has_a_caller_rule():
    methods = identity.service_methods([*PUBLIC_SERVICES, *INTERNAL_SERVICES])
    assert [m for m in methods if contract.caller_rule(m) is None] == []


def test_admin_rpcs_need_the_operator_or_an_admin_caller_at_the_edge():
    for method, scope in edge_auth.RPC_SCOPES.items():
        rule = contract.caller_rule(method)
        assert rule is not None
        if scope == "admin" and not method.startswith("/tokenmesh.auth.v1.AuthService/"):
            # The auth service checks the admin key itself; everything else by identity.
            assert rule.edge_for_admin and contract.EDGE not in rule.identities, method


def test_an_unknown_rpc_has_no_rule():
    assert contract.caller_rule("/tokenmesh.secret.v1.Backdoor/Open") is None


def test_the_edge_strips_every_identity_header_services_read():
    assert edge_auth.IDENTITY_HEADERS is contract.IDENTITY_HEADERS
    assert all(h.startswith(contract.EDGE_HEADER_PREFIX) for h in contract.IDENTITY_HEADERS)


def test_model_name_rules_refuse_path_tricks():
    for bad in ("..", ".", "a/b", "../../tmp/evil", "x\x00", "demo\n", "", "-x"):
        assert not contract.is_model_name(bad), repr(bad)
        assert not contract.is_model_version(bad), repr(bad)
    assert contract.is_model_name("demo-lm") and contract.is_model_version("1.2_rc-3")


def test_leaf_certificates_carry_the_spiffe_id_and_the_identity_name():
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(mtls.files("worker").cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://tokenmesh.local/worker"
    ]
    assert "worker.tokenmesh.local" in san.get_values_for_type(x509.DNSName)
    assert pki.identity_of("spiffe://tokenmesh.local/worker") == "worker"
    assert pki.identity_of("spiffe://evil.example/worker") is None
    assert pki.identity_of("spiffe://tokenmesh.local/a/b") is None


def test_keys_are_created_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        pki.ensure_local_pki(tmp_path / "pki", identities=("edge",))
    finally:
        os.umask(old)
    for name in ("ca-key.pem", "edge-key.pem"):
        mode = stat.S_IMODE((tmp_path / "pki" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700


def test_a_leaf_is_renewed_once_a_third_of_its_life_is_left(tmp_path):
    ca = pki.LocalCA(tmp_path / "pki")
    ca.ensure()
    files = ca.issue("edge", lifetime=datetime.timedelta(hours=24))
    now = datetime.datetime.now(datetime.UTC)
    assert not pki.needs_renewal(files.cert, now + datetime.timedelta(hours=15))
    assert pki.needs_renewal(files.cert, now + datetime.timedelta(hours=17))
    assert pki.needs_renewal(tmp_path / "missing.pem")
    before = files.cert.read_bytes()
    assert ca.renew_due(["edge"]) == []
    assert files.cert.read_bytes() == before


@pytest.mark.parametrize("identity_name", contract.IDENTITIES)
def test_every_identity_has_a_leaf_in_the_local_pki(identity_name):
    assert mtls.files(identity_name).cert.exists()


def test_no_module_spells_an_identity_header_itself():
    """Header names live in the contract: a private copy could drift from what the edge strips."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.joinpath("services").rglob("*.py"), *root.joinpath("gateway").rglob("*.py")]:
        if path.name == "contract.py":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {h}" for h in contract.IDENTITY_HEADERS if f'"{h}"' in text]
    assert offenders == []


def test_delegated_rpcs_need_the_scope_the_edge_requires_for_them():
    """The jobs identity acts for a job's owner only within what the edge would let the owner do."""
    delegated = {m: r for m, r in contract.CALLER_RULES.items() if r.delegates}
    assert set(delegated) == {
        f"/tokenmesh.inference.v2.InferenceService/{rpc}"
        for rpc in ("Generate", "Complete", "Embed")
    }
    for method, rule in delegated.items():
        assert rule.delegates == {contract.JOBS}
        assert rule.delegated_scope == edge_auth.RPC_SCOPES[method], method
        assert contract.EDGE in rule.identities and contract.JOBS in rule.identities


def test_reflection_lists_exactly_the_services_the_edge_serves_clients():
    assert set(router_service.PUBLIC_SERVICES) == set(envoy_config.TRANSCODED_SERVICES)
    assert set(router_service.PUBLIC_SERVICES).isdisjoint(INTERNAL_SERVICES)
