"""A worker's membership in the mesh: register with the router, heartbeat, drain.

The worker registers its address and loaded model versions, then renews its
lease every third of the lease. If the router forgot it (a Redis flush, a
lease that lapsed while the network was down) it registers again. When the
router says "drain" (an operator called DrainWorker), the worker stops
itself the same way SIGTERM does.

Workers share the `worker` identity, so each registers with a lease token,
a secret kept in a file only its user can read (`lease_token`): the router
takes this registration's heartbeats and drains from a worker only with it,
so another worker on the same host cannot rewrite or drain it. A restarted
worker reads the same file and takes its registration back at once; the
preStop hook reads it to drain the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from services.core import contract
from services.core.identity import ClientChannel
from services.core.probe import HEALTH_CHECK
from services.core.tasks import SupervisedTask, Supervisor
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as pb_grpc
from tokenmesh.type.v1 import types_pb2

logger = logging.getLogger(__name__)
_RPC_TIMEOUT_S = 2.0
#: The worker's channel to the router: reconnects at most ROUTER_RECONNECT_MAX_S
#: apart (gRPC's jitter adds up to 20%) while the router is away.
ROUTER_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(contract.ROUTER_RECONNECT_MAX_S * 1000)),
)
# Takes a heartbeat's answer: the other workers' models, how long they stay valid,
# and each model's version for requests that pin none (services.inference.mesh_models).
MeshModelsListener = Callable[[Sequence[inference_pb2.Model], float, Mapping[str, str]], None]


# Answers that mean the router will never accept this worker as it is configured.
_REFUSED = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def lease_token(path: Path) -> str:
    """Returns the worker's lease token from `path`, creating it (mode 0600) if absent.

    Written to a temporary file and linked into place, so a crash never leaves
    a half-written token and two processes starting at once end with one. A
    file that holds no well-formed token (a truncated disk, an edit) is
    replaced: registering without one would quietly drop the protection.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_lease_token(path)
    if contract.is_lease_token(existing):
        return existing
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_urlsafe(32))
    try:
        if path.exists():
            os.replace(staged, path)  # a malformed token: this one wins
        else:
            os.link(staged, path)  # fails if another process linked its token first
    except FileExistsError:
        pass
    finally:
        staged.unlink(missing_ok=True)
    return read_lease_token(path)


def read_lease_token(path: Path) -> str:
    """Returns the lease token stored at `path` ("" when there is none)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


class RegistrationRefused(Exception):
    """RegistrationRefused: the router refused this worker (identity, address or models)."""


class _NothingToRegister(Exception):
    """A router from before model-less registrations refused this worker, which holds
    no ready version now (between an unload and a load, or its loads failed)."""


class Registration:
    """Registration keeps one worker registered with the router.

    Args:
        router_address: the router's host:port.
        worker_id: this worker's stable id.
        address: host:port the edge reaches this worker at.
        models: returns the (name, version) pairs currently loaded and ready (every
            heartbeat sends them all, none included, with `served`: the router then
            takes an empty list as "none", see services.router.registry).
        lease_s: heartbeat period is a third of this (the router's lease, once known).
        load: returns the worker's load, sent with every heartbeat (None: none).
        token: the lease token this worker registers with (see the module).
        served: returns every model of the worker, described (services.inference.mesh_models).
        on_mesh_models: takes the other workers' models from each heartbeat's answer,
            how long they stay valid without another (a lease), and each model's version
            for requests that pin none (the catalogue's routing).
    """

    def __init__(
        self,
        router: ClientChannel,
        worker_id: str,
        address: str,
        models: Callable[[], Sequence[tuple[str, str]]],
        lease_s: float = 3.0,
        load: Callable[[], router_pb2.WorkerLoad] | None = None,
        token: str = "",
        served: Callable[[], Sequence[inference_pb2.Model]] | None = None,
        on_mesh_models: MeshModelsListener | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._token = token
        self.address = address
        self._models = models
        self._load = load
        self._served = served
        self._on_mesh_models = on_mesh_models
        self._lease_s = lease_s
        self._router = router
        self._task: SupervisedTask | None = None
        self.registered = asyncio.Event()

    def start(self, supervisor: Supervisor) -> None:
        """Starts registering and heartbeating in the background, under `supervisor`.

        An unreachable router is retried here (the worker keeps serving; the
        edge keeps its last config); anything else is the supervisor's.
        """
        self._task = supervisor.spawn("worker-registration", self._run)

    async def drain(self, delay_s: float) -> bool:
        """Leaves the edge's endpoints, then waits `delay_s` for every edge to apply it.

        Returns False when the edges may still route here: the worker was
        registered but the router did not answer (the caller then leaves
        through the edges' health checks instead).
        """
        if self._task is not None:
            self._task.cancel()
        if not self.registered.is_set():
            return True  # the edges never had this worker (or the router forgot it)
        try:
            await self._stub().DrainWorker(
                pb.DrainWorkerRequest(worker_id=self.worker_id, lease_token=self._token),
                timeout=_RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning("could not drain through the router: %s", exc.code().name)
            return False
        logger.info("left the edge's endpoints; waiting %.1fs before stopping", delay_s)
        await asyncio.sleep(delay_s)
        return True

    async def stop(self) -> None:
        """Stops heartbeating and closes the channel."""
        if self._task is not None:
            await self._task.stop(timeout_s=2)
        await self._router.close()

    def _stub(self) -> pb_grpc.WorkerRegistryServiceAsyncStub:
        # A new stub per call is cheap, and follows the channel across certificate renewals.
        return pb_grpc.WorkerRegistryServiceStub(self._router.get())

    def _refs(self) -> list[types_pb2.ModelRef]:
        return [types_pb2.ModelRef(name=n, version=v) for n, v in self._models()]

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                await self._renew()
                backoff = 0.2
                await asyncio.sleep(self._lease_s / 3)
            except _NothingToRegister:
                # Not a refusal for good: it registers once it holds a version again.
                logger.info("registering once a model version is ready (the router wants one)")
                await asyncio.sleep(self._lease_s / 3)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self.registered.clear()  # the router forgot us: register again now
                    continue
                if exc.code() in _REFUSED:
                    # Retrying the same call cannot help (wrong identity or address):
                    # let the supervisor count it, back off, and flip health.
                    raise RegistrationRefused(f"{exc.code().name}: {exc.details()}") from None
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # The call waited for the channel (wait_for_ready), which paces
                    # its own reconnects: call again at once, or the renewal came up
                    # to a backoff after the router was back.
                    why = await self._why_unreachable() or "DEADLINE_EXCEEDED"
                    logger.warning("registration failed (%s); retrying", why)
                    continue
                logger.warning(
                    "registration failed (%s: %s); retrying", exc.code().name, exc.details()
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._lease_s / 3)

    async def _why_unreachable(self) -> str:
        """Returns why the channel to the router cannot connect ("" when it can): a call
        that waited for the channel says only "Deadline Exceeded", not the refused
        connection or failed handshake an operator has to see. A health check that
        does not wait answers it at once."""
        channel = self._router.get()
        if channel.get_state() != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return ""
        # NOTE: the method by hand: the grpc_health stubs do not type HealthStub's methods.
        check = channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            await check(health_pb2.HealthCheckRequest(), timeout=_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return ""

    async def _register(self) -> None:
        refs = self._refs()
        try:
            response = await self._stub().RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id=self.worker_id,
                    address=self.address,
                    models=refs,
                    lease_token=self._token,
                ),
                timeout=_RPC_TIMEOUT_S,
                wait_for_ready=True,  # sent as soon as the router answers again
            )
        except grpc.aio.AioRpcError as exc:
            if not refs and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise _NothingToRegister from None
            raise
        self._lease_s = max(response.lease_duration.ToNanoseconds() / 1e9, 0.3)
        self.registered.set()
        logger.info("registered with the router as %s at %s", self.worker_id, self.address)
        if response.unplaced_models:
            # Placed on other worker pools (`tokenmesh models pools`): loaded, never routed.
            left_out = ", ".join(f"{m.name}:{m.version}" for m in response.unplaced_models)
            logger.warning(
                "not registered for %s: placed on other worker pools than this "
                "worker's certificate (TOKENMESH_IDENTITY)",
                left_out,
            )

    async def _renew(self) -> None:
        response = await self._stub().RenewLease(
            pb.RenewLeaseRequest(
                worker_id=self.worker_id,
                models=self._refs(),
                load=None if self._load is None else self._load(),
                lease_token=self._token,
                served_models=() if self._served is None else self._served(),
            ),
            timeout=_RPC_TIMEOUT_S,
            wait_for_ready=True,
        )
        if self._on_mesh_models is not None:
            routed = dict(response.routed_versions)
            self._on_mesh_models(response.mesh_models, self._lease_s, routed)
        if response.drain:
            logger.info("the router asked this worker to drain")
            os.kill(os.getpid(), signal.SIGTERM)  # the same path as an operator's SIGTERM
            await asyncio.Event().wait()
