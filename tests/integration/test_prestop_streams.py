"""The preStop hook against a worker registered with a real router: a scale-down lets a
stream run for the hook's wait plus SIGTERM's grace, as deploy/k8s/inference.yaml says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.core.errors import NotFound
from services.core.server import RunningServer, serving
from services.inference import prestop
from services.inference.service import InferenceSettings
from services.router.catalog import Catalog
from services.router.registry import DRAINING, WorkerCaller, WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.router.servicer import WorkerRegistryServicer
from tests import mtls
from tests.integration.conftest import RegistryOperator, no_refresh
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb

GRACE_S, DELAY_S, STEP_MS = 4.0, 0.5, 50
# 1.6 x the grace: longer than one heartbeat + delay + grace (where a drain answered in
# a heartbeat cut it), well within the hook's wait + the SIGTERM's delay and grace.
TOKENS = int(1.6 * GRACE_S * 1000 / STEP_MS)
WORKER = "w-prestop"


@pytest.fixture
async def router(own_redis: str) -> AsyncIterator[RunningServer]:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=own_redis, lease_s=3
    )
    async with serving(RouterService(settings), settings) as running:
        yield running


async def _start_worker(
    tmp_path: Path, redis_url: str, router_port: int
) -> subprocess.Popen[bytes]:
    ready = tmp_path / "ready.json"
    env = {
        **os.environ,
        "TOKENMESH_READY_FILE": str(ready),
        "REDIS_URL": redis_url,
        "TOKENMESH_PKI_DIR": str(mtls.pki_dir()),
        "TOKENMESH_ROUTER_ADDR": f"127.0.0.1:{router_port}",
        "TOKENMESH_WORKER_ID": WORKER,
        "TOKENMESH_LEASE_TOKEN_DIR": str(tmp_path / "lease-tokens"),
        "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "TOKENMESH_METRICS_PORT": "0",
        "TOKENMESH_MODELS": "",
        "TOKENMESH_TEST_MODELS": "slow:1",
        "TOKENMESH_TEST_ENGINE_STEP_MS": str(STEP_MS),
        "TOKENMESH_GRACE_SECONDS": str(GRACE_S),
        "TOKENMESH_DRAIN_DELAY_SECONDS": str(DELAY_S),
        "TOKENMESH_ENGINE": "onnxruntime",
    }
    with open(tmp_path / "worker.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.inference"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    async with asyncio.timeout(60):
        while not ready.exists():
            assert process.poll() is None, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.05)
    return process


async def _registered(registry: WorkerRegistry) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                await registry.get(WORKER)
                return
            except NotFound:
                await asyncio.sleep(0.05)


async def _next(stream: Any) -> pb.GenerateResponse | None:
    """The stream's next message (None at its end)."""
    message = await stream.read()
    if message is grpc.aio.EOF:
        return None
    assert isinstance(message, pb.GenerateResponse)
    return message


async def test_a_stream_outlives_the_prestop_hook_and_sigterm_s_grace(
    router: RunningServer, own_redis: str, tmp_path: Path
) -> None:
    process = await _start_worker(tmp_path, own_redis, router.port)
    client = aioredis.from_url(own_redis)
    try:
        info = json.loads((tmp_path / "ready.json").read_text())
        await _registered(WorkerRegistry(client, lease_s=3))
        settings = InferenceSettings(
            pki_dir=mtls.pki_dir(),
            redis_url=own_redis,
            router_address=f"127.0.0.1:{router.port}",
            models=(),
            test_models=("slow:1",),
            grace_s=GRACE_S,
            drain_delay_s=DELAY_S,
            metrics_port=info["metrics_port"],
            worker_id=WORKER,
            lease_token_dir=tmp_path / "lease-tokens",
        )
        async with mtls.aio_channel(info["grpc_port"], peer="worker") as channel:
            stream = rpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(model="slow", prompt="p", max_tokens=TOKENS), timeout=60
            )
            messages = [await _next(stream)]  # running before the hook starts
            started = time.monotonic()

            async def kubelet() -> None:
                await prestop.run(settings)  # DrainWorker, delay, waits at most GRACE_S
                entry = await WorkerRegistry(client, lease_s=3).get(WORKER)
                assert entry.state == DRAINING  # out of the edge's endpoints
                assert process.poll() is None, "the worker stopped during its preStop hook"
                process.send_signal(signal.SIGTERM)

            terminating = asyncio.create_task(kubelet())
            while (message := await _next(stream)) is not None:
                messages.append(message)
            await terminating
        assert messages[0] is not None and messages[-1] is not None
        assert messages[-1].finish_reason == "length", time.monotonic() - started
        assert messages[-1].usage.completion_tokens == TOKENS
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        await client.aclose()
        if process.poll() is None:
            process.kill()
        process.wait()


async def test_only_an_operator_s_drain_asks_the_worker_to_stop(registry_client):
    registry = WorkerRegistry(registry_client, lease_s=30)
    servicer = WorkerRegistryServicer(Catalog(registry_client), registry, no_refresh)
    token = "t" * 43
    itself = WorkerCaller(token, frozenset({"127.0.0.1"}))
    heartbeat = router_pb.RenewLeaseRequest(worker_id=WORKER, lease_token=token)

    async def told_to_stop() -> bool:
        return bool((await servicer.RenewLease(heartbeat, RegistryOperator())).drain)

    await registry.register(WORKER, "127.0.0.1:1", [("m", "1")], time.time(), token)
    await registry.drain(WORKER, itself)  # its preStop hook
    assert (await registry.get(WORKER)).state == DRAINING
    assert not await told_to_stop()
    await registry.drain(WORKER)  # `tokenmesh workers drain`: it stops itself
    assert await told_to_stop()
    await registry.drain(WORKER, itself)  # its own drain does not take that back
    assert await told_to_stop()
    await registry.register(WORKER, "127.0.0.1:1", [("m", "1")], time.time(), token)
    assert not await told_to_stop()  # a new process serves
