"""The worker's Kubernetes preStop hook: drain, then wait for in-flight work to finish.

`python -m services.inference.prestop` runs in the worker's container with
its environment (the same settings as the worker). It asks the router to
drain this worker (DrainWorker as the worker's own identity: the edge stops
sending it new requests; a drain by the worker's own lease token does not ask
it to stop, as an operator's does, so it keeps serving its streams), waits
TOKENMESH_DRAIN_DELAY_SECONDS for every edge to apply that, then polls the
worker's own /metrics until no sequence is queued or running, for at most
TOKENMESH_GRACE_SECONDS (the longest stream).
Only then does the kubelet send SIGTERM, so a scale-down never cuts a
stream. terminationGracePeriodSeconds must exceed both waits (and the
worker's own SIGTERM drain after them): tests/unit/test_deploy.py checks it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import urllib.error
import urllib.request

import grpc
import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

from services.core import contract, server
from services.core.identity import ClientChannel
from services.core.settings import load
from services.inference.registration import read_lease_token
from services.inference.service import InferenceSettings
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
IN_FLIGHT_METRICS = ("tokenmesh_queue_depth", "tokenmesh_running_sequences")
POLL_S = 1.0


def in_flight(metrics_text: str) -> float:
    """Returns the sequences queued or running, summed over versions, from /metrics text."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name in IN_FLIGHT_METRICS
        for sample in family.samples
    )


async def drain(settings: InferenceSettings) -> bool:
    """Asks the router to take this worker out of the edge's endpoints; False if it could not."""
    if not settings.router_address:
        return False
    files = server.identity_files("inference", settings)
    channel = ClientChannel(settings.router_address, files, contract.ROUTER)
    try:
        stub = pb_grpc.WorkerRegistryServiceStub(channel.get())
        # The worker's own lease token: the router drains a registration only for it.
        token = read_lease_token(settings.lease_token_dir / settings.worker_id)
        request = pb.DrainWorkerRequest(worker_id=settings.worker_id, lease_token=token)
        await stub.DrainWorker(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        logger.warning("drain through the router failed: %s", exc.code().name)
        return False
    finally:
        await channel.close()
    return True


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text: str = reply.read().decode()
            return text
    except (urllib.error.URLError, OSError):
        return None


async def wait_idle(metrics_port: int, timeout_s: float) -> bool:
    """Polls the worker's /metrics until nothing is queued or running; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = await asyncio.to_thread(_scrape, metrics_port)
        if text is not None and in_flight(text) == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)


async def run(settings: InferenceSettings) -> None:
    """Drains this worker and waits until its streams have finished (bounded)."""
    if await drain(settings):
        await asyncio.sleep(settings.drain_delay_s)
    if settings.metrics_port <= 0:
        return  # no fixed metrics port to read in-flight work from: SIGTERM's grace covers it
    if not await wait_idle(settings.metrics_port, settings.grace_s):
        logger.warning("streams still running after %.0fs; stopping anyway", settings.grace_s)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(run(load(InferenceSettings, os.environ)))


if __name__ == "__main__":
    main()
