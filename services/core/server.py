"""grpc.aio server bootstrap shared by every service.

A service implements `Service` (its servicers plus start/stop hooks); this
module adds health, reflection, the error boundary, tracing and metrics,
binds (port 0 is fine), reports readiness and drains on SIGTERM/SIGINT:
health goes NOT_SERVING, in-flight RPCs get `grace_s` to finish, then the
process exits 0. A signal during the service's start cancels the start and
shuts down the same way.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.core import cert_metrics, contract, telemetry
from services.core.identity import Authorizer, server_credentials
from services.core.interceptors import BoundaryInterceptor
from services.core.pki import IdentityFiles
from services.core.settings import ServerSettings
from services.core.tasks import cancel_and_wait

logger = logging.getLogger(__name__)
T = TypeVar("T")

# 16 MiB: room for large embedding batches; the edge enforces its own limits.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)
# How long a start cancelled by a signal may take to end before shutdown goes on.
START_CANCEL_TIMEOUT_S = 5.0


class Service(abc.ABC):
    """Service is one tokenmesh service: its servicers and lifecycle hooks."""

    #: name is the short service name, e.g. "inference".
    name: str

    @abc.abstractmethod
    def service_names(self) -> Sequence[str]:
        """Returns the full gRPC service names this service serves."""

    def reflection_names(self) -> Sequence[str]:
        """Returns the service names advertised through reflection."""
        return self.service_names()

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers the servicers on `server`."""

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """Returns the service's own interceptors, run inside the error boundary."""
        return ()

    async def start(self, running: RunningServer) -> None:  # noqa: B027 - optional hook
        """Prepares the service (may set extra health entries on `running`).

        The service names turn SERVING when this returns.
        """

    async def report_serving(self, running: RunningServer) -> None:
        """Turns the service SERVING once `start` has returned.

        A service whose health has conditions of its own (a HealthGate, per-model
        entries) overrides this to apply their current state instead.
        """
        await running.set_serving(self.service_names(), serving=True)

    async def drain(self) -> None:  # noqa: B027 - optional hook
        """Takes the service out of rotation before it stops (e.g. leaves the edge's endpoints)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Releases resources after the server stopped."""


@dataclass
class RunningServer:
    """RunningServer is a started server and the ports it bound."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    metrics_port: int | None

    async def set_serving(self, names: Sequence[str], serving: bool) -> None:
        """Sets the health of the service: `names` and the overall "" entry."""
        await self.set_entries_serving(("", *names), serving)

    async def set_entries_serving(self, names: Sequence[str], serving: bool) -> None:
        """Sets the health of `names` only: a part of the service (a model version)
        whose state says nothing about the rest, nor about the overall entry."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in names:
            await self.health.set(name, status)


async def start_server(service: Service, settings: ServerSettings) -> RunningServer:
    """Builds, binds and starts a server for `service`; health starts NOT_SERVING."""
    authorizer = Authorizer(settings.insecure_peer_identity)
    interceptors = [
        *telemetry.server_interceptors(service.name, settings.otlp_endpoint),
        BoundaryInterceptor(authorizer, settings.deprecation_schedule()),
        *service.interceptors(),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service.add_to_server(server)
    reflection.enable_server_reflection(
        [*service.reflection_names(), health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    authorizer.check_registered(service.service_names())
    port = _bind(server, service, settings)
    await server.start()
    metrics_port = _start_metrics(settings)
    running = RunningServer(server, port, health_servicer, metrics_port)
    await running.set_serving(service.service_names(), serving=False)
    return running


def identity_files(service_name: str, settings: ServerSettings) -> IdentityFiles | None:
    """Returns this component's certificate files, or None when it serves plaintext."""
    if settings.pki_dir is None:
        return None
    identity = settings.identity or contract.SERVICE_IDENTITY.get(service_name, service_name)
    return IdentityFiles.of(settings.pki_dir, identity)


def _bind(server: grpc.aio.Server, service: Service, settings: ServerSettings) -> int:
    address = f"{settings.host}:{settings.port}"
    files = identity_files(service.name, settings)
    if files is None:
        logger.warning(
            "%s serves PLAINTEXT gRPC (TOKENMESH_PKI_DIR unset): callers have no verified "
            "identity; for development and benchmarks only",
            service.name,
        )
        return server.add_insecure_port(address)
    cert_metrics.EXPIRY.watch(files.cert.stem, files)  # its file is named after the identity
    return server.add_secure_port(address, server_credentials(files))


def _start_metrics(settings: ServerSettings) -> int | None:
    if settings.metrics_port < 0:
        return None
    httpd, _thread = start_http_server(settings.metrics_port, addr=settings.host)
    return int(httpd.server_port)


def _write_ready_file(path: Path, running: RunningServer) -> None:
    """Writes the bound ports atomically so a supervisor can find them."""
    info = {"grpc_port": running.port, "metrics_port": running.metrics_port, "pid": os.getpid()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


@contextlib.asynccontextmanager
async def serving(service: Service, settings: ServerSettings) -> AsyncIterator[RunningServer]:
    """Runs `service` until the block exits, then drains it gracefully."""
    running = await start_server(service, settings)
    try:
        await service.start(running)
        await _report_serving(service, running, settings)
        yield running
    finally:
        await _shut_down(service, running, settings)


async def serve_until_signalled(service: Service, settings: ServerSettings) -> None:
    """Serves until SIGTERM or SIGINT, then drains (see `serving`).

    A signal while the service is still starting (waiting for Redis, loading
    models) cancels the start and shuts down the same way: its port is bound
    already, and a start can wait forever, so waiting for it first left the
    process to the orchestrator's SIGKILL, without `stop` (usage spool unsynced).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(service, settings)
    try:
        if await _unless_stopped(service.start(running), stop):
            await _report_serving(service, running, settings)
            if settings.ready_file is not None:
                _write_ready_file(settings.ready_file, running)
            await stop.wait()
        else:
            logger.info("%s stopping before it started: start cancelled", service.name)
        logger.info("%s draining (grace %.1fs)", service.name, settings.grace_s)
    finally:
        await _shut_down(service, running, settings)


async def _unless_stopped(start: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Runs `start` to its end unless `stop` is set first, which cancels it.

    Returns whether `start` completed (its own error propagates).
    """
    task = asyncio.create_task(_exit_as_result(start))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        completed = task.done()
        if not completed:  # stopped, or this wait itself cancelled
            await _cancel_start(task)
    if completed and (exited := task.result()) is not None:
        raise exited
    return completed


async def _exit_as_result(start: Coroutine[Any, Any, None]) -> SystemExit | None:
    """Awaits `start`, returning the SystemExit it raises (a setting only start can
    check ends the worker with exit 2): raised out of a task of its own, it leaves
    the event loop at once, skipping the shutdown, with "exception never retrieved"."""
    try:
        await start
    except SystemExit as exc:
        return exc
    return None


async def _cancel_start(task: asyncio.Task[SystemExit | None]) -> None:
    # Re-cancelled until it ends: redis-py can lose one cancellation (see
    # cancel_and_wait). A start still running after that is left behind rather
    # than holding the exit up forever; the shutdown's own deadlines apply.
    await cancel_and_wait(task, START_CANCEL_TIMEOUT_S)
    if not task.done():
        logger.warning("start did not end %.0fs after its cancel", START_CANCEL_TIMEOUT_S)


async def _report_serving(
    service: Service, running: RunningServer, settings: ServerSettings
) -> None:
    await service.report_serving(running)
    logger.info("%s serving on %s:%d", service.name, settings.host, running.port)


async def _shut_down(service: Service, running: RunningServer, settings: ServerSettings) -> None:
    """Drains and stops; also after a cancelled start (every hook must allow that)."""
    await service.drain()
    await running.health.enter_graceful_shutdown()
    await running.server.stop(settings.grace_s)
    await service.stop()
    logger.info("%s stopped", service.name)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs `main` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
