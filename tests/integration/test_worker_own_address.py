"""A worker may register, renew and drain only at its own IP: the connection's source
address, never a name its certificate carries (deploy/k8s/pki.yaml: every worker pod
shares one leaf naming the workers' headless Service, which resolves to other pods).

A real router and real mTLS handshakes, with a worker leaf shaped like pki.yaml's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core import identity, pki
from services.core.errors import PermissionDenied
from services.core.server import RunningServer, serving
from services.router.registry import WorkerRegistry
from services.router.service import RouterService, RouterSettings
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc
from tokenmesh.type.v1 import types_pb2

# The names deploy/k8s/pki.yaml puts on the one worker certificate every pod shares.
SHARED_NAMES = ("inference.tokenmesh.svc", "inference.tokenmesh.svc.cluster.local")
MODELS = [types_pb2.ModelRef(name="m", version="1")]


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    ca = pki.ensure_local_pki(tmp_path / "pki")
    ca.issue("worker", dns_names=SHARED_NAMES)
    return ca.dir


@pytest.fixture
async def router(registry_url: str, pki_dir: Path) -> AsyncIterator[RunningServer]:
    settings = RouterSettings(pki_dir=pki_dir, metrics_port=-1, grace_s=0.5, redis_url=registry_url)
    async with serving(RouterService(settings), settings) as running:
        yield running


def _worker_channel(router: RunningServer, pki_dir: Path) -> grpc.aio.Channel:
    files = pki.IdentityFiles.of(pki_dir, "worker")
    return identity.secure_channel(f"127.0.0.1:{router.port}", files, "router")


async def _reason(call: grpc.aio.UnaryUnaryCall) -> str:  # type: ignore[type-arg]
    """Awaits `call`, expects PERMISSION_DENIED; returns its ErrorInfo reason."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    error_info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error_info)
    return str(error_info.reason)


async def test_a_worker_registers_only_its_connections_ip_not_a_name_of_its_certificate(
    router, pki_dir
):
    # Every one of these is a name the worker's certificate carries (or its
    # SPIFFE id's host), and none is where this connection comes from.
    names = [
        *SHARED_NAMES,
        identity.server_name("worker"),  # worker.tokenmesh.local
        "localhost",  # every local leaf names it
    ]
    async with _worker_channel(router, pki_dir) as channel:
        registry = router_rpc.WorkerRegistryServiceStub(channel)
        for number, host in enumerate(names):
            request = router_pb.RegisterWorkerRequest(
                worker_id=f"w-name-{number}", address=f"{host}:50051", models=MODELS
            )
            assert await _reason(registry.RegisterWorker(request)) == "NOT_OWN_ADDRESS", host
        # Its own address, the connection's source, it may register.
        own = router_pb.RegisterWorkerRequest(
            worker_id="w-own", address="127.0.0.1:50051", models=MODELS
        )
        await registry.RegisterWorker(own)


async def test_a_worker_cannot_renew_or_drain_a_registration_at_a_shared_name(
    router, pki_dir, registry_url
):
    # An operator (or a worker of before) registered the Service name: the
    # router resolves it to some pod, not necessarily the caller.
    client = aioredis.from_url(registry_url)
    try:
        registry = WorkerRegistry(client, lease_s=30)
        await registry.register("w-shared", f"{SHARED_NAMES[1]}:50051", [("m", "1")], time.time())
    finally:
        await client.aclose()
    async with _worker_channel(router, pki_dir) as channel:
        stub = router_rpc.WorkerRegistryServiceStub(channel)
        renew = stub.RenewLease(router_pb.RenewLeaseRequest(worker_id="w-shared", models=MODELS))
        assert await _reason(renew) == "NOT_OWN_ADDRESS"
        drain = stub.DrainWorker(router_pb.DrainWorkerRequest(worker_id="w-shared"))
        assert await _reason(drain) == "NOT_OWN_ADDRESS"


def test_an_address_matches_the_peer_ip_in_any_spelling_and_never_a_name():
    # grpc writes an IPv6 peer percent-encoded ("ipv6:%5B::1%5D:5000"); an IPv4
    # client of a dual-stack listener may show as an IPv4-mapped IPv6 address.
    cases = {
        "ipv4:10.0.0.5:1234": ("10.0.0.5:50051", "10.0.0.6:50051"),
        "ipv6:%5B::1%5D:5000": ("[::1]:50051", "127.0.0.1:50051"),
        "ipv6:%5B::ffff:10.0.0.5%5D:5000": ("10.0.0.5:50051", "[::ffff:10.0.0.6]:50051"),
        "unix:/tmp/router.sock": (None, "localhost:50051"),
    }
    for peer, (accepted, refused) in cases.items():
        hosts = identity.peer_hosts(_Peer(peer))
        if accepted is not None:
            identity.require_host_among("RegisterWorker", accepted, hosts)
        with pytest.raises(PermissionDenied):
            identity.require_host_among("RegisterWorker", refused, hosts)


class _Peer:
    """The one thing `peer_hosts` reads of a call: its peer string, as grpc writes it."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> None:
        return None
