"""mTLS between components, and authorization by the caller's identity.

Each server requires a certificate from the mesh CA; the contract
(`services.core.contract.CALLER_RULES`) says which identity may call what.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.core import identity, pki
from services.core.server import RunningServer, serving
from services.inference import prestop
from services.inference.service import InferenceService
from services.router.registry import WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.usage.service import UsageService, UsageSettings
from tests import mtls
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as inference_pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as inference_rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc
from tokenmesh.type.v1 import types_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as usage_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as usage_rpc

HEALTH = health_pb2.HealthCheckRequest()


@pytest.fixture
async def router(redis_url) -> AsyncIterator[RunningServer]:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=redis_url
    )
    async with serving(RouterService(settings), settings) as running:
        yield running


@pytest.fixture
async def usage(redis_url, tmp_path) -> AsyncIterator[RunningServer]:
    settings = UsageSettings(
        pki_dir=mtls.pki_dir(),
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=f"mtls:{tmp_path.name}",
    )
    async with serving(UsageService(settings), settings) as running:
        yield running


async def _refused(call) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo]:
    """Awaits `call`, expects it to fail without internals; returns its code and ErrorInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    error_info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error_info)
    details = info.value.details() or ""
    assert "Traceback" not in details and ".py" not in details
    return info.value.code(), error_info


async def _denied(call) -> error_details_pb2.ErrorInfo:
    """Awaits `call`, expects PERMISSION_DENIED, returns its ErrorInfo."""
    code, error_info = await _refused(call)
    assert code == grpc.StatusCode.PERMISSION_DENIED, error_info
    return error_info


async def test_a_caller_without_a_mesh_certificate_cannot_connect(router, usage, tmp_path):
    other_ca = pki.LocalCA(tmp_path / "other")
    other_ca.ensure()
    foreign = other_ca.issue("edge")
    for running, peer in ((router, "router"), (usage, "usage")):
        target = f"127.0.0.1:{running.port}"
        channels = [
            grpc.aio.insecure_channel(target),  # plaintext
            grpc.aio.secure_channel(  # TLS, trusts the CA, presents no certificate
                target,
                grpc.ssl_channel_credentials(mtls.files("edge").ca.read_bytes()),
                identity.channel_options(peer),
            ),
            identity.secure_channel(target, foreign, peer),  # another CA's "edge"
        ]
        for channel in channels:
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_pb2_grpc.HealthStub(channel).Check(HEALTH, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_refuses_a_server_with_another_identity(router):
    # A worker certificate cannot stand in for the router: the channel checks the name.
    async with mtls.aio_channel(router.port, peer="usage") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(HEALTH, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_identity_headers_are_honoured_only_from_the_edge(usage):
    forged = [("x-tokenmesh-scopes", "admin"), ("x-tokenmesh-tenant", "victim")]
    for caller in ("worker", "router", "jobs", "operator"):
        async with mtls.aio_channel(usage.port, peer="usage", caller=caller) as channel:
            call = usage_rpc.UsageServiceStub(channel).GetUsage(
                usage_pb.GetUsageRequest(), metadata=forged
            )
            assert (await _denied(call)).reason == "EDGE_HEADERS_FROM_NON_EDGE"
            # Even health refuses forged identity headers from a non-edge caller.
            health = health_pb2_grpc.HealthStub(channel).Check(HEALTH, metadata=forged)
            assert (await _denied(health)).reason == "EDGE_HEADERS_FROM_NON_EDGE"


async def test_public_rpcs_are_only_for_the_edge(usage):
    async with mtls.aio_channel(usage.port, peer="usage", caller="worker") as channel:
        call = usage_rpc.UsageServiceStub(channel).GetUsage(usage_pb.GetUsageRequest())
        error = await _denied(call)
        assert error.reason == "CALLER_NOT_ALLOWED"
    async with mtls.aio_channel(usage.port, peer="usage", caller="edge") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(HEALTH)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_only_a_worker_registers_and_only_its_own_address(router):
    models = [types_pb2.ModelRef(name="m", version="1")]
    request = router_pb.RegisterWorkerRequest(
        worker_id="w-mtls", address="127.0.0.1:5999", models=models
    )
    for caller in ("edge", "operator", "usage"):
        async with mtls.aio_channel(router.port, peer="router", caller=caller) as channel:
            call = router_rpc.WorkerRegistryServiceStub(channel).RegisterWorker(request)
            assert (await _denied(call)).reason == "CALLER_NOT_ALLOWED"
    async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
        registry = router_rpc.WorkerRegistryServiceStub(channel)
        elsewhere = router_pb.RegisterWorkerRequest(
            worker_id="w-evil", address="10.9.8.7:5999", models=models
        )
        assert (await _denied(registry.RegisterWorker(elsewhere))).reason == "NOT_OWN_ADDRESS"
        await registry.RegisterWorker(request)
        # A worker may drain itself (its own host), but not list or manage the fleet.
        await registry.DrainWorker(router_pb.DrainWorkerRequest(worker_id="w-mtls"))
        listing = registry.ListWorkers(router_pb.ListWorkersRequest())
        assert (await _denied(listing)).reason == "CALLER_NOT_ALLOWED"


async def test_a_worker_cannot_heartbeat_or_drain_a_worker_of_another_host(router, redis_url):
    # Every worker shares the `worker` identity: the registered address tells
    # them apart. A heartbeat rewrites a worker's models (what the edge routes
    # to it), so another host's worker must not send one for it.
    client = aioredis.from_url(redis_url)
    try:
        remote = WorkerRegistry(client, lease_s=30)
        await remote.register("w-remote", "10.9.8.7:5999", [("m", "1")], time.time())
    finally:
        await client.aclose()
    models = [types_pb2.ModelRef(name="m", version="2")]
    async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
        registry = router_rpc.WorkerRegistryServiceStub(channel)
        renew = registry.RenewLease(
            router_pb.RenewLeaseRequest(worker_id="w-remote", models=models)
        )
        assert (await _denied(renew)).reason == "NOT_OWN_ADDRESS"
        drain = registry.DrainWorker(router_pb.DrainWorkerRequest(worker_id="w-remote"))
        assert (await _denied(drain)).reason == "NOT_OWN_ADDRESS"


async def test_admin_rpcs_need_the_operator_or_an_admin_caller_at_the_edge(router):
    split = router_pb.RegisterModelVersionRequest(model="mtls-model", version="1")
    async with mtls.aio_channel(router.port, peer="router", caller="edge") as channel:
        stub = router_rpc.RouterServiceStub(channel)
        user = [("x-tokenmesh-scopes", "models:read inference:generate")]
        assert (await _denied(stub.RegisterModelVersion(split, metadata=user))).reason == (
            "CALLER_NOT_ALLOWED"
        )
        await stub.RegisterModelVersion(split, metadata=mtls.EDGE_FOR_ADMIN)
    async with mtls.aio_channel(router.port, peer="router", caller="operator") as channel:
        await router_rpc.RouterServiceStub(channel).GetCatalogModel(
            router_pb.GetCatalogModelRequest(model="mtls-model")
        )
    async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
        call = router_rpc.RouterServiceStub(channel).RegisterModelVersion(split)
        assert (await _denied(call)).reason == "CALLER_NOT_ALLOWED"


async def test_inference_admin_is_refused_to_the_edge_for_a_plain_caller(tmp_path, redis_url):
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        admin = inference_rpc.InferenceAdminServiceStub(channel)
        unload = inference_pb.UnloadModelRequest(model="deterministic-test", version="1")
        assert (await _denied(admin.UnloadModel(unload))).reason == "CALLER_NOT_ALLOWED"


async def test_a_renewed_certificate_is_served_without_a_restart(redis_url, tmp_path):
    """The server re-reads its files at the next handshake (here: a whole new CA)."""
    served = tmp_path / "served"
    shutil.copytree(mtls.pki_dir(), served)
    new_ca = pki.LocalCA(tmp_path / "new")
    new_ca.ensure()
    new_ca.issue("router")
    settings = RouterSettings(pki_dir=served, metrics_port=-1, grace_s=0.5, redis_url=redis_url)
    async with serving(RouterService(settings), settings) as running:
        target = f"127.0.0.1:{running.port}"
        new_edge = new_ca.issue("edge")
        async with identity.secure_channel(target, new_edge, "router") as before:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(before).Check(HEALTH, timeout=5)
        for name in ("ca.pem", "router.pem", "router-key.pem"):
            _replace(served / name, (tmp_path / "new" / name).read_bytes())
        async with identity.secure_channel(target, new_edge, "router") as after:
            reply = await health_pb2_grpc.HealthStub(after).Check(HEALTH, timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    tmp.replace(path)


async def test_a_worker_the_router_refuses_turns_not_serving(router, redis_url, tmp_path):
    """A worker with the wrong identity is refused for good: its health says so."""
    settings = inference_settings(
        tmp_path,
        redis_url,
        router_address=f"127.0.0.1:{router.port}",
        identity="usage",  # not a worker: the registry refuses it
    )
    service = InferenceService(settings)
    async with serving(service, settings) as running:
        async with mtls.aio_channel(running.port, peer="usage") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="tokenmesh.inference.v1.InferenceService"),
                timeout=60,
            )
            async for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            watch.cancel()


async def test_a_worker_of_the_same_host_cannot_act_for_a_registration_it_does_not_hold(router):
    # Two workers on one host share the `worker` identity and the host: the
    # lease token the registration was made with is what tells them apart.
    models = [types_pb2.ModelRef(name="m", version="1")]
    token, other = "a" * 43, "b" * 43
    register = router_pb.RegisterWorkerRequest(
        worker_id="w-token", address="127.0.0.1:5998", models=models, lease_token=token
    )
    async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
        registry = router_rpc.WorkerRegistryServiceStub(channel)
        await registry.RegisterWorker(register)
        for wrong in ("", other):
            renew = registry.RenewLease(
                router_pb.RenewLeaseRequest(worker_id="w-token", models=models, lease_token=wrong)
            )
            assert (await _denied(renew)).reason == "NOT_LEASE_HOLDER"
            drain = registry.DrainWorker(
                router_pb.DrainWorkerRequest(worker_id="w-token", lease_token=wrong)
            )
            assert (await _denied(drain)).reason == "NOT_LEASE_HOLDER"
            # Nor can it take the live registration over by registering the id again.
            again = router_pb.RegisterWorkerRequest()
            again.CopyFrom(register)
            again.lease_token = wrong
            code, error_info = await _refused(registry.RegisterWorker(again))
            assert (code, error_info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WORKER_ID_IN_USE")
        # The holder can: a restarted worker that read its token file registers again.
        await registry.RegisterWorker(register)
        renewed = await registry.RenewLease(
            router_pb.RenewLeaseRequest(worker_id="w-token", models=models, lease_token=token)
        )
        assert not renewed.drain
        drained = await registry.DrainWorker(
            router_pb.DrainWorkerRequest(worker_id="w-token", lease_token=token)
        )
        assert drained.worker.id == "w-token"
        malformed = router_pb.RegisterWorkerRequest()
        malformed.CopyFrom(register)
        malformed.worker_id, malformed.lease_token = "w-short", "short"
        code, _ = await _refused(registry.RegisterWorker(malformed))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    # An operator drains any worker, without its token, and sees who holds one.
    async with mtls.aio_channel(router.port, peer="router", caller="operator") as channel:
        operator = router_rpc.WorkerRegistryServiceStub(channel)
        await operator.DrainWorker(router_pb.DrainWorkerRequest(worker_id="w-token"))
        workers = (await operator.ListWorkers(router_pb.ListWorkersRequest())).workers
        assert {w.id: w.lease_token_held for w in workers}["w-token"]


async def test_a_worker_registers_with_the_token_in_its_file_and_drains_with_it(
    router, redis_url, tmp_path
):
    settings = inference_settings(
        tmp_path, redis_url, router_address=f"127.0.0.1:{router.port}", worker_id="w-file"
    )
    token_file = tmp_path / "lease-tokens" / "w-file"
    service = InferenceService(settings)
    async with serving(service, settings):
        assert service.registration is not None
        await asyncio.wait_for(service.registration.registered.wait(), 30)
        token = token_file.read_text()
        assert token_file.stat().st_mode & 0o777 == 0o600
        client = aioredis.from_url(redis_url)
        try:
            entry = await WorkerRegistry(client, lease_s=30).get("w-file")
        finally:
            await client.aclose()
        assert entry.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
        # Another worker of this host, without the file, cannot drain it.
        async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
            drain = router_rpc.WorkerRegistryServiceStub(channel).DrainWorker(
                router_pb.DrainWorkerRequest(worker_id="w-file")
            )
            assert (await _denied(drain)).reason == "NOT_LEASE_HOLDER"
        # The preStop hook reads the file and drains it.
        assert await prestop.drain(settings)
        client = aioredis.from_url(redis_url)
        try:
            assert (await WorkerRegistry(client, lease_s=30).get("w-file")).state == "draining"
        finally:
            await client.aclose()
