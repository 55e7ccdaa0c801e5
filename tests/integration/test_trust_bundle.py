"""A trust bundle (ca.pem) that gains a new CA is used without a restart, by servers
and by Python clients, though no leaf changed: CA rotation with a two-CA bundle
(deploy/k8s/pki.yaml, trust-manager) replaces ca.pem alone, and the leaves come
from the new CA only later."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2

from services.core import identity, pki
from services.core.server import serving
from services.router.service import RouterService, RouterSettings

HEALTH = health_pb2.HealthCheckRequest()
SERVING = health_pb2.HealthCheckResponse.SERVING


def _authority(directory: Path) -> pki.LocalCA:
    """A CA of its own with every identity's leaf, in `directory`."""
    return pki.ensure_local_pki(directory)


def _identity_dir(ca: pki.LocalCA, name: str, out: Path) -> pki.IdentityFiles:
    """Copies `name`'s files (its leaf and `ca`'s bundle) into `out`, as a pod mounts them."""
    out.mkdir()
    for path in (ca.cert_path, ca.dir / f"{name}.pem", ca.dir / f"{name}-key.pem"):
        shutil.copy(path, out / path.name)
    return pki.IdentityFiles.of(out, name)


def _replace(path: Path, data: bytes) -> None:
    """Replaces `path` by an atomic rename, as trust-manager or the local CA does."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(data)
    tmp.replace(path)


async def _health(channel: grpc.aio.Channel) -> str:
    # NOTE: the method by hand: the grpc_health stubs do not type HealthStub's methods.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        reply = await check(HEALTH, timeout=5)
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@pytest.fixture
def authorities(tmp_path: Path) -> tuple[pki.LocalCA, pki.LocalCA, bytes]:
    """The old CA, the next one, and the bundle that trusts both."""
    old, new = _authority(tmp_path / "old"), _authority(tmp_path / "new")
    return old, new, old.cert_path.read_bytes() + new.cert_path.read_bytes()


async def test_a_server_trusts_a_new_ca_once_only_its_bundle_holds_it(
    redis_url: str, tmp_path: Path, authorities: tuple[pki.LocalCA, pki.LocalCA, bytes]
):
    old, new, bundle = authorities
    served = _identity_dir(old, "router", tmp_path / "router")
    caller = _identity_dir(new, "worker", tmp_path / "worker")  # a leaf of the next CA
    _replace(caller.ca, bundle)
    settings = RouterSettings(
        pki_dir=served.ca.parent, metrics_port=-1, grace_s=0.5, redis_url=redis_url
    )
    async with serving(RouterService(settings), settings) as running:
        target = f"127.0.0.1:{running.port}"
        async with identity.secure_channel(target, caller, "router") as before:
            assert await _health(before) == "UNAVAILABLE"  # the server trusts the old CA only
        _replace(served.ca, bundle)  # the router's leaf stays as it was
        async with identity.secure_channel(target, caller, "router") as after:
            assert await _health(after) == "SERVING"


async def test_a_client_channel_trusts_a_new_ca_once_only_its_bundle_holds_it(
    redis_url: str, tmp_path: Path, authorities: tuple[pki.LocalCA, pki.LocalCA, bytes]
):
    old, new, bundle = authorities
    served = _identity_dir(new, "router", tmp_path / "router")  # renewed by the next CA
    _replace(served.ca, bundle)
    caller = _identity_dir(old, "worker", tmp_path / "worker")
    settings = RouterSettings(
        pki_dir=served.ca.parent, metrics_port=-1, grace_s=0.5, redis_url=redis_url
    )
    async with serving(RouterService(settings), settings) as running:
        channel = identity.ClientChannel(f"127.0.0.1:{running.port}", caller, "router")
        try:
            assert await _health(channel.get()) == "UNAVAILABLE"  # it trusts the old CA only
            _replace(caller.ca, bundle)  # the worker's leaf stays as it was
            assert await _health(channel.get()) == "SERVING"
        finally:
            await channel.close()
