"""The inference worker: settings, model loading, usage spool and server wiring."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import grpc.aio
import redis.asyncio as aioredis

from gateway.model_routing import model_health_name
from services.core import contract, server
from services.core.errors import InvalidArgument, NotFound, TokenmeshError, Unavailable
from services.core.identity import ClientChannel
from services.core.server import RunningServer, Service
from services.core.settings import RedisSettings, SettingsError, env, load, require
from services.core.tasks import HealthGate, Supervisor, to_daemon_thread
from services.inference import shadow
from services.inference.admission import Admission
from services.inference.budget import TokenBudgets
from services.inference.engines.base import DECODE_PATHS
from services.inference.fairness import FAIRNESS_MODES, FairnessPolicy, parse_weights
from services.inference.load_report import worker_load
from services.inference.mesh_models import MeshModels, local_models
from services.inference.models import LoadedModel, ModelRegistry
from services.inference.openai import servicer as openai
from services.inference.orphan_spools import SpoolAdopter
from services.inference.pipeline.cache import CacheSettings, CacheStage, ResponseCache
from services.inference.pipeline.content import ContentStage
from services.inference.pipeline.stream import end_streams
from services.inference.policy_cache import PolicyCache
from services.inference.registration import ROUTER_CHANNEL_OPTIONS, Registration, lease_token
from services.inference.repository import (
    EngineOptions,
    deterministic_test_model,
    load_from_repository,
)
from services.inference.request_limits import RequestLimitInterceptor
from services.inference.reservation_reaper import (
    HOLDER_TTL_S,
    ReservationReaper,
    holder_name,
)
from services.inference.scheduler import SchedulerLimits
from services.inference.servicer import InferenceAdminServicer, InferenceServicer
from services.inference.shadow import ShadowRecorder
from services.inference.template_cache import TemplateCache
from services.inference.usage_log import UsageLog
from services.inference.v2 import servicer as v2
from services.router.policies import PolicyCatalog
from services.router.prompts import PromptCatalog
from services.router.shadow_pairs import PairStore
from services.usage.limit_settings import RequestLimitSettings
from services.usage.ratelimit import RequestLimiter
from tokenmesh.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_grpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADMIN_SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name[
    "InferenceAdminService"
].full_name
ENGINES = ("auto", "onnxruntime", "tensorrt")
# A load the worker's stop abandoned, or a stream it ended before its grace ran out
# (UNAVAILABLE).
STOPPING_REASON = "WORKER_STOPPING"
# How long a stopping worker waits for its last budget calls (reconciles, take-backs)
# before it closes Redis: one Redis round trip each, retried while Redis is away.
BUDGET_CALLS_AT_STOP_S = 5.0
# How long before its shutdown grace is over a worker ends the streams still running
# in-band (half the grace when that is shorter): their final messages and status
# must be out before grpc cancels every call left.
END_STREAMS_BEFORE_S = 1.0


@dataclass(frozen=True)
class InferenceSettings(RequestLimitSettings, RedisSettings):
    """InferenceSettings configure one inference worker."""

    model_repository: Path = env(
        "TOKENMESH_MODEL_REPOSITORY", Path("models"), "The model repository."
    )
    models: tuple[str, ...] = env(
        "TOKENMESH_MODELS",
        ("demo-lm:1", "demo-lm:2", "all-minilm-l6-v2:1"),
        "Comma-separated NAME:VERSION list loaded from the repository at start.",
    )
    test_models: tuple[str, ...] = env(
        "TOKENMESH_TEST_MODELS", (), "NAME:VERSION list served by the deterministic test engine."
    )
    test_engine_step_ms: float = env(
        "TOKENMESH_TEST_ENGINE_STEP_MS", 20.0, "Simulated step time of the test engine, in ms."
    )
    test_engine_error_rate: float = env(
        "TOKENMESH_TEST_ENGINE_ERROR_RATE",
        0.0,
        "Share (0-1) of the test engine's requests that fail with INTERNAL (fault "
        "injection for rollout tests; only the deterministic test engine honours it).",
    )
    engine: str = env(
        "TOKENMESH_ENGINE", "auto", "auto, onnxruntime or tensorrt (auto: TensorRT with a GPU)."
    )
    engine_threads: int = env(
        "TOKENMESH_ENGINE_THREADS", 0, "Intra-op threads per engine; 0 = one per core."
    )
    engine_decode: str = env(
        "TOKENMESH_ENGINE_DECODE",
        "in-place",
        "ONNX Runtime decode steps: in-place (GroupQueryAttention on the KV cache, where the "
        "model's graph allows it) or padded (the exported graph, rows padded to the longest).",
    )
    max_sequences: int = env(
        "TOKENMESH_MAX_SEQUENCES", 32, "Running sequences (KV slots) per model version."
    )
    max_kv_tokens: int = env(
        "TOKENMESH_MAX_KV_TOKENS", 16384, "KV-token budget (prompt + max_tokens) per version."
    )
    max_queue: int = env("TOKENMESH_MAX_QUEUE", 256, "Waiting requests per version before 429.")
    samples_max_bytes: int = env(
        "TOKENMESH_SAMPLES_MAX_BYTES",
        64 * 1024 * 1024,
        "Bytes of content-policy samples kept per tenant in Redis (the oldest go first).",
    )
    shadow_max_copies: int = env(
        "TOKENMESH_SHADOW_MAX_COPIES",
        32,
        "Shadow copies' sequences (prompts x n) of one model version this worker runs at "
        "once; more are dropped (counted in tokenmesh_shadow_copies_dropped_total); "
        "0 = runs none.",
    )
    reservation_ttl_s: int = env(
        "TOKENMESH_RESERVATION_TTL_SECONDS",
        HOLDER_TTL_S,
        "Seconds a worker may go without refreshing its liveness (every third of this) "
        "before the other workers give back its open token reservations: it died with "
        "requests running, which were cut and billed nothing.",
    )
    max_prefill_tokens: int = env(
        "TOKENMESH_MAX_PREFILL_TOKENS", 2048, "Prompt tokens admitted per step."
    )
    messages_per_step: int = env(
        "TOKENMESH_MESSAGES_PER_STEP",
        16,
        "Stream messages per engine step before token batching: with more running "
        "sequences, each stream gets its tokens every ceil(running / this) steps; 0 = never.",
    )
    scheduler_fairness: str = env(
        "TOKENMESH_SCHEDULER_FAIRNESS",
        "tenant",
        "tenant: within a priority class, admit next the request of the tenant served "
        "least so far (virtual token counters); fifo: first come, first served.",
    )
    tenant_weights: tuple[str, ...] = env(
        "TOKENMESH_SCHEDULER_TENANT_WEIGHTS",
        (),
        "Fair-share weights by tenant, e.g. acme=2,globex=0.5 (a tenant of weight 2 gets "
        "twice the tokens of one of weight 1); wins over the tier's weight.",
    )
    tier_weights: tuple[str, ...] = env(
        "TOKENMESH_SCHEDULER_TIER_WEIGHTS",
        (),
        "Fair-share weights by key tier (the key's priority_tier), e.g. premium=4,standard=1; "
        "unlisted tiers weigh 1.",
    )
    metric_tenants: int = env(
        "TOKENMESH_SCHEDULER_METRIC_TENANTS",
        16,
        "Tenants with a label of their own in the per-tenant queue and service metrics; "
        "the rest are _other.",
    )
    prefix_cache_tokens: int = env(
        "TOKENMESH_PREFIX_CACHE_TOKENS",
        4096,
        "Prompt tokens per version whose KV is kept for prompts that start the same way "
        "(~8 KiB each for demo-lm); 0 = no prefix cache.",
    )
    router_address: str = env(
        "TOKENMESH_ROUTER_ADDR",
        "",
        "Router host:port to register with (the edge routes by it); empty = standalone.",
    )
    advertise_host: str = env(
        "TOKENMESH_ADVERTISE_HOST",
        "127.0.0.1",
        "IPv4 address the edge reaches this worker at; `auto`: this worker's address on the "
        "route to the router (compose: each replica its own, where a service name is one).",
    )
    drain_delay_s: float = env(
        "TOKENMESH_DRAIN_DELAY_SECONDS",
        1.0,
        "On SIGTERM, time between leaving the edge's endpoints and refusing new requests.",
    )
    drain_health_wait_s: float = env(
        "TOKENMESH_DRAIN_HEALTH_WAIT_SECONDS",
        2.5,
        "On SIGTERM when the router cannot take this worker out: time between turning "
        "NOT_SERVING and refusing new requests (two failed edge health checks).",
    )
    worker_id: str = env(
        "TOKENMESH_WORKER_ID", socket.gethostname(), "Stable worker name (usage spool, registry)."
    )
    usage_spool_dir: Path = env(
        "TOKENMESH_USAGE_SPOOL_DIR",
        Path(".tokenmesh/usage-spool"),
        "Where unshipped usage events wait.",
    )
    lease_token_dir: Path = env(
        "TOKENMESH_LEASE_TOKEN_DIR",
        Path(".tokenmesh/lease-tokens"),
        "Where the worker keeps its registry lease token (a file per worker id, mode 0600; "
        "the preStop hook reads it).",
    )
    usage_stream: str = env(
        "TOKENMESH_USAGE_STREAM", "tokenmesh:usage", "Redis Stream of usage events."
    )
    usage_spool_max_bytes: int = env(
        "TOKENMESH_USAGE_SPOOL_MAX_BYTES",
        64 * 2**20,
        "Unshipped usage bytes before new work is refused.",
    )
    usage_spool_sync_ms: float = env(
        "TOKENMESH_USAGE_SPOOL_SYNC_MS",
        20.0,
        "Spooled usage events are fsynced within this many ms: what a power loss can lose.",
    )
    usage_spool_adopt_after_s: float = env(
        "TOKENMESH_USAGE_SPOOL_ADOPT_AFTER_SECONDS",
        60.0,
        "A sibling usage spool (another worker id under the spool directory) unheld and "
        "unchanged this long is a gone worker's: this worker ships and settles it, then "
        "removes it (0: never).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for variable, entries in (
            ("TOKENMESH_MODELS", self.models),
            ("TOKENMESH_TEST_MODELS", self.test_models),
        ):
            for entry in entries:
                name, _, version = entry.partition(":")
                require(bool(name and version), variable, f"{entry!r} is not NAME:VERSION")
        require(
            bool(self.models or self.test_models),
            "TOKENMESH_MODELS",
            "at least one model is needed",
        )
        require(self.engine in ENGINES, "TOKENMESH_ENGINE", f"must be one of {', '.join(ENGINES)}")
        require(self.test_engine_step_ms >= 0, "TOKENMESH_TEST_ENGINE_STEP_MS", "must be >= 0")
        require(
            0 <= self.test_engine_error_rate <= 1, "TOKENMESH_TEST_ENGINE_ERROR_RATE", "must be 0-1"
        )
        require(1 <= self.max_sequences <= 1024, "TOKENMESH_MAX_SEQUENCES", "must be 1-1024")
        require(self.max_kv_tokens >= 1, "TOKENMESH_MAX_KV_TOKENS", "must be >= 1")
        require(self.max_queue >= 0, "TOKENMESH_MAX_QUEUE", "must be >= 0")
        require(self.shadow_max_copies >= 0, "TOKENMESH_SHADOW_MAX_COPIES", "must be >= 0")
        require(self.reservation_ttl_s >= 3, "TOKENMESH_RESERVATION_TTL_SECONDS", "must be >= 3")
        require(
            self.samples_max_bytes >= 1 << 20,
            "TOKENMESH_SAMPLES_MAX_BYTES",
            "must be >= 1048576 (room for samples of 32 KiB each)",
        )
        require(self.max_prefill_tokens >= 1, "TOKENMESH_MAX_PREFILL_TOKENS", "must be >= 1")
        require(self.messages_per_step >= 0, "TOKENMESH_MESSAGES_PER_STEP", "must be >= 0")
        require(self.prefix_cache_tokens >= 0, "TOKENMESH_PREFIX_CACHE_TOKENS", "must be >= 0")
        require(
            self.engine_decode in DECODE_PATHS,
            "TOKENMESH_ENGINE_DECODE",
            f"must be one of {', '.join(DECODE_PATHS)}",
        )
        require(
            self.scheduler_fairness in FAIRNESS_MODES,
            "TOKENMESH_SCHEDULER_FAIRNESS",
            f"must be one of {', '.join(FAIRNESS_MODES)}",
        )
        for variable, entries in (
            ("TOKENMESH_SCHEDULER_TENANT_WEIGHTS", self.tenant_weights),
            ("TOKENMESH_SCHEDULER_TIER_WEIGHTS", self.tier_weights),
        ):
            try:
                parse_weights(entries)
            except ValueError as exc:
                raise SettingsError(f"{variable}: {exc}") from None
        require(
            0 <= self.metric_tenants <= 1000, "TOKENMESH_SCHEDULER_METRIC_TENANTS", "must be 0-1000"
        )
        require(
            not self.router_address or ":" in self.router_address,
            "TOKENMESH_ROUTER_ADDR",
            "must be host:port",
        )
        require(0 <= self.drain_delay_s <= 60, "TOKENMESH_DRAIN_DELAY_SECONDS", "must be 0-60")
        require(
            0 <= self.drain_health_wait_s <= 60,
            "TOKENMESH_DRAIN_HEALTH_WAIT_SECONDS",
            "must be 0-60",
        )
        require(
            0 <= self.usage_spool_adopt_after_s <= 86_400,
            "TOKENMESH_USAGE_SPOOL_ADOPT_AFTER_SECONDS",
            "must be 0-86400",
        )
        require(
            1 <= self.usage_spool_sync_ms <= 10_000,
            "TOKENMESH_USAGE_SPOOL_SYNC_MS",
            "must be 1-10000",
        )
        # 0 is no "unlimited": the worker would refuse every request as backlogged.
        require(
            self.usage_spool_max_bytes >= 1 << 20,
            "TOKENMESH_USAGE_SPOOL_MAX_BYTES",
            "must be >= 1048576 (1 MiB; there is no unlimited)",
        )
        require(self.engine_threads >= 0, "TOKENMESH_ENGINE_THREADS", "must be >= 0")
        # The router accepts only the address a worker's connection comes from
        # (services.core.identity.require_host_among): a name would be refused at
        # every heartbeat, a worker that looks up and is never routed to.
        require(
            self.advertise_host == "auto" or _registrable(self.advertise_host),
            "TOKENMESH_ADVERTISE_HOST",
            "must be an IPv4 address (not 0.0.0.0) or auto (the router registers the "
            "IPv4 address a worker connects from)",
        )

    def engine_options(self) -> EngineOptions:
        """Returns what every model this worker loads runs with (engine, threads, limits)."""
        return EngineOptions(
            engine=resolve_engine(self.engine),
            threads=self.engine_threads,
            limits=self.limits(),
            prefix_cache_tokens=self.prefix_cache_tokens,
            in_place_decode=self.engine_decode == "in-place",
        )

    def limits(self) -> SchedulerLimits:
        """Returns the scheduler limits."""
        return SchedulerLimits(
            self.max_sequences,
            self.max_kv_tokens,
            self.max_queue,
            self.max_prefill_tokens,
            self.messages_per_step,
            FairnessPolicy(
                self.scheduler_fairness,
                parse_weights(self.tenant_weights),
                parse_weights(self.tier_weights),
                self.metric_tenants,
            ),
        )


def resolve_engine(choice: str) -> str:
    """Returns the engine to use: TensorRT for "auto" only when it and a GPU are usable."""
    if choice != "auto":
        return choice
    from services.inference.engines.tensorrt import tensorrt_available

    usable, why = tensorrt_available()
    logger.info("engine auto: %s -> %s", why, "tensorrt" if usable else "onnxruntime")
    return "tensorrt" if usable else "onnxruntime"


def _registrable(host: str) -> bool:
    """Tells whether the router can register `host`: an IPv4 address that a worker's
    connection can come from (0.0.0.0 never does: refused as not its own)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return not address.is_unspecified


def advertised_host(setting: str, router_address: str) -> str:
    """Returns the host a worker registers: `setting`, or for "auto" its own address on
    the route to the router (no packet is sent: a UDP socket's connect picks the
    route). Replicas of one compose service that advertised the service's name were
    one address at the edge: the router resolves a name to its first address."""
    if setting != "auto":
        return setting
    host, port = router_address.rsplit(":", 1)
    family, kind, proto, _, target = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_DGRAM
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(target)
        return str(probe.getsockname()[0])


def registered_host(setting: str, router_address: str) -> str:
    """Returns `advertised_host`, checked as the setting itself is at load: "auto"
    passes that check, and resolves only here (an IPv6 router address gives an IPv6
    source address, refused by the router at every heartbeat).

    Raises:
        SettingsError: the address is no IPv4 address, or is 0.0.0.0.
    """
    host = advertised_host(setting, router_address)
    require(
        _registrable(host),
        "TOKENMESH_ADVERTISE_HOST",
        f"{setting} gave {host!r} (this worker's address on the route to "
        f"TOKENMESH_ROUTER_ADDR={router_address}): the router registers the IPv4 address "
        "a worker connects from; set this worker's IPv4 address",
    )
    return host


def host_at_start(settings: InferenceSettings) -> str:
    """Returns the host a starting worker registers (`registered_host`), or ends the
    worker as `main` ends it on a setting it cannot load (services.core.entrypoint:
    the message, exit 2)."""
    try:
        return registered_host(settings.advertise_host, settings.router_address)
    except SettingsError as exc:
        print(f"tokenmesh-inference: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _stopping_error(name: str, version: str) -> Unavailable:
    return Unavailable(
        f"the worker is stopping: the load of model {name!r} version {version!r} was abandoned",
        reason=STOPPING_REASON,
        metadata={"model": name, "version": version},
    )


def _stopped_stream_error() -> Unavailable:
    """The error that ends a stream still running when the worker's grace runs out."""
    return Unavailable(
        "the worker stopped before this stream finished; send the request again",
        retry_after_s=1.0,
        reason=STOPPING_REASON,
    )


def _split(entry: str) -> tuple[str, str]:
    name, version = entry.split(":", 1)
    return name.strip(), version.strip()


def _model_health_names(name: str, version: str) -> list[str]:
    """Returns the health names of one model version: the edge checks v1's; v2's is alike."""
    return [model_health_name(name, version), f"{v2.SERVICE_NAME}/{name}/{version}"]


def failed_load_message(error: Exception) -> str | None:
    """What a version whose load failed says of it (FAILED); None when the request
    named nothing to load (no such version in the repository, a malformed name)."""
    if isinstance(error, NotFound | InvalidArgument):
        return None
    if isinstance(error, Unavailable) and error.reason == STOPPING_REASON:
        return None  # abandoned, not failed: nothing is left of it
    if isinstance(error, TokenmeshError):
        return error.message  # the caller's own answer, written for clients
    return "loading failed (see the worker's log)"  # internals stay in the log


class InferenceService(Service):
    """InferenceService serves the model versions of one worker."""

    name = "inference"

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.registry = ModelRegistry()
        self.mesh_models = MeshModels(self.registry)  # ListModels and GetModel answer for the mesh
        self._unloads: set[asyncio.Task[None]] = set()  # unloads whose caller left
        self._health_tasks: set[asyncio.Task[None]] = set()  # engine health changes
        self.options = settings.engine_options()
        self.redis = aioredis.from_url(settings.redis_url, socket_timeout=2.0)
        self.usage_log = self._open_spool(settings.usage_spool_dir / settings.worker_id)
        # The gate's every change reaches _apply_health from the start (attached
        # now, while no condition can have failed): health is never set from an
        # assumption, only from the gate's and the models' current state.
        self.health = HealthGate()
        self.health.attach(self._gate_changed)
        self._health_lock = asyncio.Lock()
        self._started = False  # start() has returned: the service names may be SERVING
        # LoadModel and UnloadModel of one version run one at a time (lock, its users).
        self._version_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._stopping = asyncio.Event()  # drain began: loads end, none registers a version
        # When the shutdown's grace ends (the event loop's clock; None: not draining).
        self._grace_ends: float | None = None
        self._ending_streams: asyncio.TimerHandle | None = None  # drain: see there
        self._admission: Admission | None = None  # the servicers' one (add_to_server)
        self.tasks = Supervisor(self.name, self.health)
        # Shadow copies' slots per model version (services.inference.shadow.CopySlots).
        self.shadow_copies = shadow.CopySlots(settings.shadow_max_copies)
        # Inference RPCs' request-rate limits are decided here, in the usage
        # service's windows (services/inference/request_limits.py).
        limits_url = settings.ratelimit_redis_url or settings.redis_url
        self._limits_redis = (
            aioredis.from_url(limits_url, socket_timeout=2.0)
            if settings.ratelimit_redis_url
            else self.redis
        )
        self.request_limiter = settings.limiter(
            RequestLimiter, self._limits_redis, limits_url, self.tasks
        )
        # Prompt templates by reference ("support@3", "support@stable"), kept fresh in the
        # background: the request path reads them from memory.
        self.templates = TemplateCache(PromptCatalog(self.redis))
        # Content policies attached to tenants and keys, and sample settings: in memory,
        # refreshed in the background (services.inference.policy_cache).
        self.policies = PolicyCache(PolicyCatalog(self.redis))
        self.shadow_records = ShadowRecorder(PairStore(self.redis))
        # Response cache and coalescing (services.inference.pipeline.cache): entries in
        # the volatile Redis (the rate limiter's), bounded by TTL and entry size.
        self.cache_settings = load(CacheSettings, os.environ)
        # Models the operator made public share their prefix cache across tenants too
        # (services.inference.engines.prefix_cache: the others' is scoped by tenant).
        self.options = replace(
            self.options, prefix_shared_models=frozenset(self.cache_settings.shared_models)
        )
        self.cache: CacheStage | None = None
        self._cache_redis: aioredis.Redis | None = None
        if self.cache_settings.enabled:
            cache_url = (
                self.cache_settings.redis_url
                or os.environ.get("TOKENMESH_RATELIMIT_REDIS_URL", "")
                or settings.redis_url
            )
            self._cache_redis = aioredis.from_url(cache_url, socket_timeout=1.0)
            config = self.cache_settings.config()
            self.cache = CacheStage(ResponseCache(self._cache_redis, config), config)
        self._running: RunningServer | None = None
        self.registration: Registration | None = None
        self._reaper: ReservationReaper | None = None  # set with the servicers

    def _open_spool(self, directory: Path, lock_wait_s: float | None = None) -> UsageLog:
        """Opens the usage spool at `directory` (this worker's, or a gone sibling's)."""
        return UsageLog(
            directory,
            self.redis,
            self.settings.usage_stream,
            self.settings.usage_spool_max_bytes,
            sync_interval_s=self.settings.usage_spool_sync_ms / 1000,
            lock_wait_s=lock_wait_s,
        )

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        return [
            RequestLimitInterceptor(
                self.request_limiter,
                self.settings.ratelimit_failure_mode_deny,
                copies=self.shadow_copies,
                cut_by_shutdown=self.cut_by_shutdown,
            )
        ]

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME, v2.SERVICE_NAME, openai.SERVICE_NAME, ADMIN_SERVICE_NAME]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        budgets = TokenBudgets(self.redis, holder=holder_name(self.settings.worker_id))
        ttl_s = self.settings.reservation_ttl_s
        self._reaper = ReservationReaper(
            budgets, every_s=ttl_s / 3, ttl_s=ttl_s, spool=self.usage_log
        )
        v1 = InferenceServicer(
            self.registry,
            self.usage_log,
            budgets,
            worker_id=self.settings.worker_id,
        )
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(v1, server)
        v1.admission.content = ContentStage(
            self.policies,
            self.usage_log,
            self.redis,
            sample_stream_max_bytes=self.settings.samples_max_bytes,
        )
        v1.admission.shadow_records = self.shadow_records
        v1.admission.cache = self.cache
        v1.admission.mesh_models = self.mesh_models
        v1.admission.cut_by_shutdown = self.cut_by_shutdown
        self._admission = v1.admission
        # v2 shares v1's routing, budgets and usage recording (one Admission).
        v2_servicer = v2.InferenceServicer(v1.admission, templates=self.templates)
        v2_grpc.add_InferenceServiceServicer_to_server(v2_servicer, server)
        # The OpenAI surface runs on v2 (raw JSON in, OpenAI's bytes out).
        openai_grpc.add_OpenAIServiceServicer_to_server(openai.OpenAIServicer(v2_servicer), server)
        inference_service_pb2_grpc.add_InferenceAdminServiceServicer_to_server(
            InferenceAdminServicer(self.registry, self.load, self.unload), server
        )

    async def start(self, running: RunningServer) -> None:
        # Before any model loads: an address the router refuses at every heartbeat
        # ends the worker at start, as an invalid setting does (exit 2).
        host = host_at_start(self.settings) if self.settings.router_address else ""
        self._running = running
        self.usage_log.start(self.tasks)
        if self._reaper is not None:
            self._reaper.start(self.tasks)
            if self.settings.usage_spool_adopt_after_s > 0:
                adopter = SpoolAdopter(
                    self.usage_log.directory,
                    functools.partial(self._open_spool, lock_wait_s=0),
                    self._reaper.budgets,
                    self.settings.usage_spool_adopt_after_s,
                )
                self.tasks.spawn("usage-spool-adopter", adopter.run_forever)
        self.templates.start(self.tasks)
        self.policies.start(self.tasks)
        for entry in self.settings.test_models:
            name, version = _split(entry)
            step_s = self.settings.test_engine_step_ms / 1000
            await self._activate(
                deterministic_test_model(
                    name,
                    version,
                    step_s,
                    self.options.limits,
                    error_rate=self.settings.test_engine_error_rate,
                )
            )
        for entry in self.settings.models:
            await self.load(*_split(entry))
        # A worker that says SERVING must serve: until the content policies were read
        # once it refuses every request, so health and registration wait for that.
        await self.policies.loaded()
        if self.settings.router_address:
            router = ClientChannel(
                self.settings.router_address,
                server.identity_files(self.name, self.settings),
                contract.ROUTER,
                ROUTER_CHANNEL_OPTIONS,
            )
            self.registration = Registration(
                router,
                self.settings.worker_id,
                f"{host}:{running.port}",
                lambda: [(m.name, m.version) for m in self.registry.all() if m.ready],
                load=lambda: worker_load(self.registry.all()),
                token=lease_token(self.settings.lease_token_dir / self.settings.worker_id),
                served=lambda: local_models(self.registry),
                on_mesh_models=self.mesh_models.update,
            )
            self.registration.start(self.tasks)

    def cut_by_shutdown(self) -> bool:
        """Tells whether a call cancelled now was cut by this worker's shutdown.

        The server's stop follows the drain (services.core.server): the calls
        still running once its grace is over are cancelled, their callers get a
        trailers-only UNAVAILABLE (if no response header went out), which the
        edge tries again on another worker: such a try is billed nothing here
        and gives its request count back (Admission.note_cancelled,
        request_limits). A call its client cancelled during the drain is not cut.
        """
        ends = self._grace_ends
        return ends is not None and asyncio.get_running_loop().time() >= ends

    async def drain(self) -> None:
        """Leaves the edges' endpoints; then the server's stop(grace) starts
        (services.core.server._shut_down).

        Shortly before that grace is over, the streams still running end in-band
        (`_end_streams`). grpc cancelled them at its end, UNAVAILABLE "Cancelling all
        calls" with no final message: a client could not tell a deploy from a crash.
        A unary call is left to that cancel: its headers are held, so it ends
        trailers-only, which the edge tries again elsewhere, billed nothing here
        (`cut_by_shutdown`).
        """
        try:
            await self._leave()
        finally:
            loop = asyncio.get_running_loop()
            grace_s = self.settings.grace_s
            self._grace_ends = loop.time() + grace_s
            margin_s = min(END_STREAMS_BEFORE_S, grace_s / 2)
            self._ending_streams = loop.call_at(self._grace_ends - margin_s, self._end_streams)

    def _end_streams(self) -> None:
        """Ends every Generate stream still running whose headers went out with a final
        message per running choice, `finish_reason` ERROR and `error` UNAVAILABLE
        (WORKER_STOPPING), then that status; each is billed what it sent
        (services.inference.pipeline.stream.end_streams)."""
        if self._admission is None:
            return
        error = self._admission.streams_ended_by = _stopped_stream_error()
        ended = end_streams(self._admission.open_streams, error)
        if ended:
            logger.info("ended %d streams still running before the grace is over", ended)

    async def _leave(self) -> None:
        """Takes the worker out of the edges' endpoints (or their health checks)."""
        # Loads in flight end now (UNAVAILABLE): a version loaded while the worker
        # leaves serves nothing, and its build held the exit until it ended.
        self._stopping.set()
        if self.registration is None:
            return
        if await self.registration.drain(self.settings.drain_delay_s):
            return
        # The router did not take this worker out, so the edges still route here
        # (it is down, or its Redis stalls). Leave through their health checks:
        # every entry NOT_SERVING, and keep serving what still arrives until two
        # failed checks have taken the worker out of every edge.
        wait_s = self.settings.drain_health_wait_s
        logger.warning("leaving through the edges' health checks; serving %.1fs more", wait_s)
        if self._running is not None:
            await self._running.health.enter_graceful_shutdown()
        await asyncio.sleep(wait_s)

    async def report_serving(self, running: RunningServer) -> None:
        """Turns SERVING once started, unless a health condition fails (the gate's state)."""
        self._started = True
        await self._apply_health()

    async def _gate_changed(self, serving: bool) -> None:
        """The HealthGate's sink: applies the current state (which `serving` was)."""
        await self._apply_health()

    async def _apply_health(self) -> None:
        """Sets every health entry from the current state: the gate, start, the versions.

        The edge checks each version's own names (model_health_name), so a
        failing gate turns those NOT_SERVING too, not only "" and the service
        names. One writer at a time, reading the state once it holds the lock:
        whichever change applies last applies the latest state.
        """
        async with self._health_lock:
            if self._running is None:
                return
            serving = self.health.serving and self._started
            await self._running.set_serving(self.service_names(), serving)
            for model in self.registry.all():
                if model.ready:
                    names = _model_health_names(model.name, model.version)
                    await self._running.set_entries_serving(
                        names, serving and not model.engine_failing
                    )

    async def _set_version_health(self, model: LoadedModel, serving: bool) -> None:
        """Sets one version's health entries (SERVING only once the worker has started,
        while the gate holds and its engine steps do not keep failing: the edge checks
        these names, not the service's)."""
        async with self._health_lock:
            if self._running is not None:
                await self._running.set_entries_serving(
                    _model_health_names(model.name, model.version),
                    serving
                    and self.health.serving
                    and self._started
                    # Read here, not by the caller: an unload (or a failing streak)
                    # may have begun while this waited for the lock.
                    and model.ready
                    and not model.unloading
                    and not model.engine_failing,
                )

    def _engine_health_changed(self, model: LoadedModel) -> None:
        """A version's engine steps began or stopped failing (scheduler.on_health, on
        the event loop): its health entries follow, unless it is going away."""
        if model.unloading or not model.ready:
            return
        task = asyncio.create_task(self._set_version_health(model, serving=True))
        self._health_tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._health_tasks.discard)

    @contextlib.asynccontextmanager
    async def _version_lock(self, name: str, version: str) -> AsyncIterator[None]:
        """Holds the lock of one version's LoadModel and UnloadModel (dropped when unused)."""
        key = (name, version)
        lock, users = self._version_locks.get(key, (asyncio.Lock(), 0))
        self._version_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._version_locks[key]
            if users == 1:
                del self._version_locks[key]
            else:
                self._version_locks[key] = (lock, users - 1)

    async def load(self, name: str, version: str) -> None:
        """Loads a version from the repository, warms it up, marks it ready.

        Idempotent: a version already loaded stays as it is, and the call
        succeeds (as Triton's repository API answers a load of a loaded model;
        versions are immutable here, so there is nothing to reload: unload
        first to load its files again). Loads and unloads of one version run
        one at a time, so concurrent loads build one engine. The worker's stop
        ends a load at once, registering nothing (see `_build`).
        """
        async with self._version_lock(name, version):
            if self.registry.has(name, version):
                existing = self.registry.resolve(name, version)
                if existing.ready:
                    logger.info("model %s version %s is already loaded", name, version)
                    return
                # Left by an unload that did not finish (its stop raised): not served,
                # not health-checked in, yet registered. Cleared, then loaded anew.
                await existing.stop(drain_timeout_s=0)
                self.registry.discard(existing)
            # Described LOADING meanwhile (minutes for an engine build), FAILED with
            # the reason after a failed load: never routed to or resolved.
            logger.info("loading model %s version %s", name, version)
            self.registry.loading(name, version)
            try:
                model = await self._build(name, version)
                await self._activate(model)
            except Exception as exc:
                message = failed_load_message(exc)
                if message is not None:
                    self.registry.failed(name, version, message)
                raise
            finally:
                self.registry.clear_loading(name, version)  # a cancelled or refused load

    async def _build(self, name: str, version: str) -> LoadedModel:
        """Builds a version from the repository on a daemon thread of its own.

        Not asyncio.to_thread: the loop's default executor and the interpreter
        join those threads at exit, and a build cannot be interrupted, so a worker
        stopped while it built a version (seconds for ONNX Runtime, minutes for a
        TensorRT engine) stayed up until the build ended, often into SIGKILL. A
        stop (or a cancel: a start cut short) abandons the build instead: the
        thread runs on and what it builds is discarded, never registered.

        Raises:
            Unavailable: the worker began to stop (reason WORKER_STOPPING).
        """
        built = asyncio.ensure_future(
            to_daemon_thread(
                f"load-{name}-{version}",
                load_from_repository,
                self.settings.model_repository,
                name,
                version,
                self.options,
            )
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((built, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            abandoned = not built.done()
            if abandoned:
                # What the thread returns or raises later is dropped (a LoadedModel
                # never started: its engine is freed once collected).
                built.cancel()
                logger.warning(
                    "model %s version %s: load abandoned (%s); its build runs on in the "
                    "background and is discarded",
                    name,
                    version,
                    "the worker is stopping" if self._stopping.is_set() else "cancelled",
                )
        if abandoned:  # the stop came first (a cancel of this load raised above)
            raise _stopping_error(name, version)
        return built.result()

    async def _activate(self, model: LoadedModel) -> None:
        await model.start()
        if self._stopping.is_set():
            # Its warm-up outlasted the start of the stop, which may have stopped the
            # registered versions already: one added now would run on unstopped.
            await model.stop(drain_timeout_s=0)
            raise _stopping_error(model.name, model.version)
        self.registry.add(model)  # no await since the check: stop() cannot slip between
        if model.scheduler is not None:
            model.scheduler.on_health = lambda _: self._engine_health_changed(model)
        await self._set_version_health(model, serving=True)
        logger.info("model %s version %s ready (%s)", model.name, model.version, model.engine_name)

    async def unload(self, name: str, version: str) -> None:
        """Stops admitting a version, lets its requests finish, frees it.

        Runs to the end even if the caller leaves (its RPC cancelled, or past its
        deadline while the version drains): cut short, the version stayed
        registered, refusing every request and out of health, and the idempotent
        LoadModel then took it for loaded.
        """
        task = asyncio.create_task(self._unload(name, version))
        self._unloads.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._unloads.discard)
        await asyncio.shield(task)

    async def _unload(self, name: str, version: str) -> None:
        async with self._version_lock(name, version):
            if not self.registry.has(name, version) and self.registry.clear_status(name, version):
                logger.info("model %s version %s: its failed load forgotten", name, version)
                return
            model = self.registry.resolve(name, version)
            model.unloading = True  # lookups say UNLOADING while it drains
            # Health is never set SERVING for it again; and before the first await,
            # new requests are refused (MODEL_UNLOADING: tried elsewhere).
            model.stop_admitting()
            await self._set_version_health(model, serving=False)
            await model.stop(self.settings.grace_s)
            self.registry.discard(model)  # this object: never a version loaded since
            logger.info("model %s version %s unloaded", name, version)

    async def stop(self) -> None:
        self._stopping.set()  # set by drain already; nothing is registered from now on
        if self._ending_streams is not None:  # every call ended before the grace did
            self._ending_streams.cancel()
        if self.registration is not None:
            await self.registration.stop()
        for model in self.registry.all():
            await model.stop(drain_timeout_s=0)
        if self._admission is not None:  # before Redis closes under its last calls
            await self._admission.settled(BUDGET_CALLS_AT_STOP_S)
        if self._reaper is not None:  # what did not settle is taken back at once
            await self._reaper.stop()
        await self.usage_log.stop()
        await self.shadow_records.stop()
        await self.templates.stop()
        await self.policies.stop()
        await self.request_limiter.close()  # unused leased slots go back to the windows
        await self.tasks.stop()
        if self._limits_redis is not self.redis:
            await self._limits_redis.aclose()
        if self._cache_redis is not None:
            await self._cache_redis.aclose()
        await self.redis.aclose()
