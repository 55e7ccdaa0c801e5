"""The router service: model catalogue, worker registry and the edge's xDS control plane.

The router also answers server reflection for the whole public mesh API: the
edge routes reflection here, so one generic client (grpcurl, Postman, ghz)
discovers every public service through a single port.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc
from redis.exceptions import RedisError

from services.core import contract
from services.core.redis_service import RedisBackedService
from services.core.server import RunningServer
from services.core.settings import RedisSettings, env, require
from services.router import snapshot
from services.router.addresses import HostResolver
from services.router.catalog import Catalog, ModelEntry, now, sync_clock
from services.router.pin_store import PinStore
from services.router.prompts import PromptCatalog
from services.router.registry import BUILT_AT_EVERY_S, WorkerRegistry
from services.router.rollouts import RolloutDriver, RolloutStore
from services.router.servicer import RouterServicer, WorkerRegistryServicer
from services.router.snapshot import ClusterOptions, EdgeFlags, Resources
from services.router.xds import AdsServicer, ControlPlane
from tokenmesh.auth.v1 import auth_service_pb2
from tokenmesh.inference.v1 import inference_service_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as inference_v2_service_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2
from tokenmesh.openai.v1 import openai_batch_service_pb2, openai_service_pb2
from tokenmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from tokenmesh.usage.v1 import usage_service_pb2
from tokenmesh.usage.v2 import usage_service_pb2 as usage_v2_service_pb2

logger = logging.getLogger(__name__)

ROUTER_SERVICE = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
REGISTRY_SERVICE = router_service_pb2.DESCRIPTOR.services_by_name["WorkerRegistryService"].full_name
ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name
# What reflection lists at the edge: every service a client may call there (the edge's
# transcoded services, gateway.envoy_config.TRANSCODED_SERVICES; a unit test keeps the
# two equal). Not the internal ones (WorkerRegistryService: workers only), nor the
# edge's own plumbing (HandoverService: a REST `Prefer: respond-async`).
PUBLIC_SERVICES = (
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    ROUTER_SERVICE,
    inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    inference_v2_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    openai_service_pb2.DESCRIPTOR.services_by_name["OpenAIService"].full_name,
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    usage_v2_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    jobs_service_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name,
    openai_batch_service_pb2.DESCRIPTOR.services_by_name["OpenAIBatchService"].full_name,
)


def routed_versions(models: Mapping[str, ModelEntry], at: float) -> dict[str, str]:
    """Returns each model's version for requests that pin none, as the edge routes
    them: the pin, else the largest share of the split (the version other models
    fall back to); what ListModels reports as its default_version."""
    return {
        name: version for name, model in models.items() if (version := model.primary_version(at))
    }


@dataclass(frozen=True)
class RouterSettings(RedisSettings):
    """RouterSettings configure the catalogue, worker leases and the control plane."""

    lease_s: float = env(
        "TOKENMESH_ROUTER_LEASE_SECONDS",
        3.0,
        "A worker missing heartbeats this long leaves the edge's endpoints.",
    )
    poll_s: float = env(
        "TOKENMESH_ROUTER_POLL_SECONDS", 0.25, "How often the control plane re-reads Redis."
    )
    health_check_interval_s: float = env(
        "TOKENMESH_ROUTER_HEALTH_CHECK_SECONDS",
        1.0,
        "How often each edge health-checks each worker of each model version.",
    )
    prefix_affinity: bool = env(
        "TOKENMESH_ROUTER_PREFIX_AFFINITY",
        True,
        "Route generations whose prompts start alike to the same worker (bounded-load "
        "consistent hashing), where its prefix cache holds them; false = round robin.",
    )
    load_aware: bool = env(
        "TOKENMESH_ROUTER_LOAD_AWARE",
        True,
        "Weigh workers' endpoints by their load reports (slow or saturated workers get "
        "fewer new requests); false = equal weights (workers list still shows the weights "
        "they would get).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(1 <= self.lease_s <= 300, "TOKENMESH_ROUTER_LEASE_SECONDS", "must be 1-300")
        require(0.05 <= self.poll_s <= 5, "TOKENMESH_ROUTER_POLL_SECONDS", "must be 0.05-5")
        require(
            0.1 <= self.health_check_interval_s <= 60,
            "TOKENMESH_ROUTER_HEALTH_CHECK_SECONDS",
            "must be 0.1-60",
        )


class RouterService(RedisBackedService):
    """RouterService serves tokenmesh.router.v1, Envoy's ADS and mesh-wide reflection."""

    name = "router"

    def __init__(self, settings: RouterSettings) -> None:
        super().__init__(settings)
        self.catalog = Catalog(self.redis)
        self.registry = WorkerRegistry(self.redis, settings.lease_s)
        self.options = ClusterOptions(
            health_check_interval_s=settings.health_check_interval_s,
            prefix_affinity=settings.prefix_affinity,
            load_aware=settings.load_aware,
        )
        self.hosts = HostResolver()
        self.plane = ControlPlane(self._build, settings.poll_s)
        self.rollout_store = RolloutStore(
            self.redis, self.catalog, self.registry, self.plane.refresh
        )
        self.rollouts = RolloutDriver(self.rollout_store, now)
        self.lease_s = settings.lease_s
        # Until workers had a lease period (and a reconnect) to renew, expired leases
        # still count.
        self._lease_grace_until = time.monotonic() + self.lease_grace_s
        # In the grace, leases that ended after this time count (registry.BUILT_AT_KEY;
        # None: read it at the grace's first build).
        self._ended_after: float | None = None
        self._marked_at = -math.inf  # when this router last wrote BUILT_AT_KEY
        self.pin_store = PinStore(self.redis)  # the last prefix pins, shared by replicas
        # Each model's version for requests that pin none, as the last build routed it.
        self.routed_versions: dict[str, str] = {}
        # The worker pools of each placed model, as the last build read them (None:
        # no build yet; heartbeats then read the catalogue).
        self.placements: dict[str, frozenset[str]] | None = None

    @property
    def lease_grace_s(self) -> float:
        """How long after this router (or its Redis) is back expired leases still count:
        a lease, and the time a worker's channel takes to connect again (at most
        ROUTER_RECONNECT_MAX_S apart, plus gRPC's jitter and the handshake)."""
        return self.lease_s + 2 * contract.ROUTER_RECONNECT_MAX_S

    async def _build(self, flavours: Sequence[EdgeFlags]) -> list[Resources]:
        """Reads the catalogue and the workers once; builds each flavour's resources."""
        # Workers could not renew while this router or its Redis was away: their leases
        # count as live for a lease, and none is forgotten meanwhile (a minute's outage
        # forgot every worker, and the edges got empty endpoints until they registered).
        grace = time.monotonic() < self._lease_grace_until
        try:
            await sync_clock(self.redis)
            at = now()
            if grace and self._ended_after is None:
                self._ended_after = await self.registry.built_at()
            models = await self.catalog.all()
            workers = await self.registry.all(at, forget=not grace)
            last_pins = await self.pin_store.load()
            workers = await self.hosts.with_ip_hosts(workers)  # EDS takes IP addresses
        except Exception:
            # Heartbeats fail while Redis does: give workers a lease period after it is back.
            self._lease_grace_until = time.monotonic() + self.lease_grace_s
            self._ended_after = None
            raise
        self.routed_versions = routed_versions(models, at)
        self.placements = {name: m.worker_pools for name, m in models.items() if m.worker_pools}
        ended_after = self._ended_after if grace else None
        built = [
            snapshot.build(models, workers, at, flags, self.options, ended_after, last_pins)
            for flags in flavours
        ]
        if not grace:
            await self._mark_built(at)
        # Only edges with prefix affinity get pins, the same for each of them.
        pins = next((r.pins for r in built if r.pins), None)
        if pins is not None and pins != last_pins:
            await self._save_pins(pins)
        return built

    async def _mark_built(self, at: float) -> None:
        """Records that a router built outside its grace at `at` (every BUILT_AT_EVERY_S):
        the leases that ended before, it saw end."""
        if at - self._marked_at < BUILT_AT_EVERY_S:
            return
        try:
            await self.registry.mark_built(at)
        except RedisError as exc:  # a later build writes it
            logger.warning("could not record the build time: %s", exc)
            return
        self._marked_at = at

    async def _save_pins(self, pins: snapshot.Pins) -> None:
        """Stores the build's pins for the next build (of any replica) to start from."""
        try:
            await self.pin_store.save(pins)
        except RedisError as exc:  # the build stands; the next one reads Redis again
            logger.warning("could not store the prefix pins: %s", exc)

    def service_names(self) -> Sequence[str]:
        return [ROUTER_SERVICE, REGISTRY_SERVICE, ADS_SERVICE]

    def reflection_names(self) -> Sequence[str]:
        return list(PUBLIC_SERVICES)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        refresh = self.plane.refresh
        router_service_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(
                self.catalog,
                self.registry,
                refresh,
                PromptCatalog(self.redis),
                self.rollout_store,
            ),
            server,
        )
        router_service_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(
            WorkerRegistryServicer(
                self.catalog,
                self.registry,
                refresh,
                lambda: self.routed_versions,
                lambda: self.placements,
            ),
            server,
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AdsServicer(self.plane), server
        )

    async def start(self, running: RunningServer) -> None:
        await super().start(running)  # waits for Redis, however long it is away
        # The grace counts from now, Redis reached: counted from construction, a router
        # started during an outage longer than a lease built its first snapshot with
        # none, every worker's lease lapsed meanwhile, and pushed empty endpoints.
        self._lease_grace_until = time.monotonic() + self.lease_grace_s
        self._ended_after = None
        self.plane.start(self.tasks)
        self.rollouts.start(self.tasks)

    async def drain(self) -> None:
        # End the ADS streams first: Envoys keep their config and reconnect to
        # another replica (or to this one after its restart) at once.
        self.plane.closing.set()

    async def stop(self) -> None:
        await self.rollouts.stop()
        await self.plane.stop()
        await super().stop()
