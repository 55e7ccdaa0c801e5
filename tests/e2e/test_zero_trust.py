"""The mesh as a stranger on the same machine sees it, and the edge's TLS listener.

Inside: every service requires a mesh certificate, so a process without one
reaches nothing, forged identity headers included. Outside: the edge serves
HTTPS and gRPC over TLS with the local CA's certificate (or an operator's,
reloaded without a restart), and sheds a connection flood instead of dying.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.envoy_config import EdgeLimits
from services.core import pki
from services.launcher.mesh import Mesh
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as usage_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as usage_rpc

FORGED = [("x-tokenmesh-scopes", "admin"), ("x-tokenmesh-tenant", "victim")]


def _internal_calls(channel):
    """One call of each kind a stranger would try first: data, registry, admin, health."""
    register = router_pb.RegisterWorkerRequest(
        worker_id="rogue",
        address="127.0.0.1:1",
        models=[types_pb2.ModelRef(name="demo-lm", version="1")],
    )
    return [
        lambda: rpc.InferenceServiceStub(channel).Complete(
            pb.CompleteRequest(model="demo-lm", prompt="x", max_tokens=1), metadata=FORGED
        ),
        lambda: usage_rpc.UsageServiceStub(channel).GetUsage(
            usage_pb.GetUsageRequest(), metadata=FORGED
        ),
        lambda: router_rpc.WorkerRegistryServiceStub(channel).RegisterWorker(register),
        lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()),
    ]


def test_a_process_without_mesh_certificates_reaches_no_service(mesh: Mesh):
    services = ["auth", "router", "usage", "inference-0", "inference-1"]
    for name in services:
        for credentials in (
            None,  # plaintext
            grpc.ssl_channel_credentials(mesh.ca_path.read_bytes()),  # TLS, no client cert
        ):
            channel = (
                grpc.insecure_channel(mesh.address(name))
                if credentials is None
                else grpc.secure_channel(
                    mesh.address(name),
                    credentials,
                    [("grpc.ssl_target_name_override", "localhost")],
                )
            )
            with channel:
                for call in _internal_calls(channel):
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, info.value)


def test_the_operator_certificate_still_runs_the_cli(mesh: Mesh):
    import os
    import sys

    env = {**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)}
    listing = subprocess.run(
        [sys.executable, "-m", "services.cli", "workers", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode == 0, listing.stderr
    workers = {w["id"]: w for w in json.loads(listing.stdout)["workers"]}
    # Each of the mesh's workers registered with the lease token from its file.
    assert {i: workers[i]["lease_token_held"] for i in ("inference-0", "inference-1")} == {
        "inference-0": True,
        "inference-1": True,
    }


def test_https_healthz_with_the_local_ca(mesh: Mesh):
    result = subprocess.run(
        ["curl", "-sS", "-i", "--cacert", str(mesh.ca_path), f"{mesh.edge_tls_url}/healthz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/2 200"), result.stdout
    assert "strict-transport-security: max-age=31536000" in result.stdout.lower()
    untrusted = subprocess.run(
        ["curl", "-sS", f"{mesh.edge_tls_url}/healthz"], capture_output=True, timeout=30
    )
    assert untrusted.returncode == 60  # the peer's certificate could not be verified


def test_rest_over_https_and_old_tls_is_refused(mesh: Mesh, admin_key: str):
    trusted = ssl.create_default_context(cafile=str(mesh.ca_path))
    with httpx.Client(verify=trusted, timeout=10) as client:
        reply = client.get(f"{mesh.edge_tls_url}/v1/models", headers={"x-api-key": admin_key})
    assert reply.status_code == 200 and reply.json()["models"]
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(mesh.ca_path)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", mesh.edge_tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")


def test_grpc_over_tls_through_the_edge_and_health_without_a_credential(mesh, admin_key):
    credentials = grpc.ssl_channel_credentials(mesh.ca_path.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{mesh.edge_tls_port}", credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = rpc.InferenceServiceStub(channel).Generate(
            pb.GenerateRequest(model="demo-lm", prompt="And God said", max_tokens=4),
            metadata=[("x-api-key", admin_key)],
            timeout=30,
        )
        messages = list(stream)
    assert messages[-1].finish_reason == "length"
    assert messages[-1].usage.completion_tokens == 4


def _served_certificate(port: int) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_an_operator_certificate_is_reloaded_without_a_restart(mesh: Mesh, tmp_path: Path):
    """The TLS port serves TOKENMESH_EDGE_TLS_CERT; replacing the file takes effect live."""
    from cryptography import x509

    first, second = pki.LocalCA(tmp_path / "a"), pki.LocalCA(tmp_path / "b")
    for ca in (first, second):
        ca.ensure()
        ca.issue("edge")
    served = tmp_path / "served"
    served.mkdir()
    for name in ("edge.pem", "edge-key.pem"):
        (served / name).write_bytes((tmp_path / "a" / name).read_bytes())
    envoy_pid = mesh._child("envoy").pid
    before = x509.load_der_x509_certificate(_served_certificate(mesh.edge_tls_port))
    # This edge serves the local CA's leaf; point its serving secret at the operator's files.
    mesh.use_edge_certificate(served / "edge.pem", served / "edge-key.pem")
    expected = x509.load_pem_x509_certificate((served / "edge.pem").read_bytes())
    _wait_served(mesh.edge_tls_port, expected.serial_number, not_serial=before.serial_number)
    # Now the operator renews it: a new file moved into place.
    for name in ("edge.pem", "edge-key.pem"):
        tmp = served / f".{name}.new"
        tmp.write_bytes((tmp_path / "b" / name).read_bytes())
        tmp.replace(served / name)
    renewed = x509.load_pem_x509_certificate((served / "edge.pem").read_bytes())
    _wait_served(mesh.edge_tls_port, renewed.serial_number)
    assert mesh._child("envoy").pid == envoy_pid and mesh._child("envoy").alive()
    mesh.use_edge_certificate(None, None)  # back to the local CA's leaf for other tests
    _wait_served(mesh.edge_tls_port, before.serial_number)


def _wait_served(port: int, serial: int, not_serial: int | None = None) -> None:
    from cryptography import x509

    deadline = time.monotonic() + 20
    seen = None
    while time.monotonic() < deadline:
        seen = x509.load_der_x509_certificate(_served_certificate(port)).serial_number
        if seen == serial:
            return
        time.sleep(0.1)
    raise AssertionError(f"the edge still serves {seen}, not {serial} (before: {not_serial})")


def _accepted(host: str, port: int, held: list[socket.socket]) -> bool:
    """Opens a connection and asks for /healthz; keeps it open when it was served."""
    sock = socket.create_connection((host, port), timeout=2)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\n\r\n")
        answer = sock.recv(64)
    except OSError:  # reset, or no answer within the timeout
        answer = b""
    if answer.startswith(b"HTTP/1.1 200"):
        held.append(sock)
        return True
    sock.close()
    return False


def test_a_connection_flood_is_shed_and_the_edge_lives(mesh: Mesh):
    address = mesh.start_extra_edge("flood-edge", limits=EdgeLimits(max_connections=40))
    host, port = address.split(":")
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(120):  # bounded: 3x the limit
            if _accepted(host, int(port), held):
                continue
            refused += 1  # reset or closed at once: over the connection limit
        assert len(held) <= 40 < 120 == len(held) + refused
        assert refused >= 80
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{address}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the edge did not serve again after the flood")
    assert mesh._child("flood-edge").alive()
