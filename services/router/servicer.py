"""tokenmesh.router.v1: the catalogue's admin RPCs and the worker registry."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from services.core import contract, identity
from services.core.errors import FieldViolation, InvalidArgument, PermissionDenied
from services.core.interceptors import Context, request_headers
from services.core.model_access import allowed_models, check_model_allowed
from services.core.pricing import Price
from services.core.time_fields import timestamp_seconds
from services.inference.templates import DEFAULT_MAX_LENGTH, Variable
from services.router import catalog as cat
from services.router import rollouts
from services.router.catalog import Catalog, ModelEntry, now
from services.router.load_weights import LoadReport
from services.router.policies import PolicyCatalog
from services.router.policy_servicer import PolicyRpcs
from services.router.prompts import PromptCatalog, PromptHead, PromptTemplate
from services.router.registry import (
    DRAINING,
    HotPrefix,
    VersionCounts,
    WorkerCaller,
    WorkerEntry,
    WorkerRegistry,
)
from services.router.served_models import mesh_models, served_from_pb
from services.router.shadow_pairs import PairStore
from services.router.shadow_servicer import ShadowRpcs
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as pb_grpc
from tokenmesh.type.v1 import types_pb2

Refresh = Callable[[], Awaitable[None]]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    # Whole seconds apart from the fraction: seconds * 1e9 as a float showed
    # 9999-12-31T23:59:59Z (a sunset of "never") as 23:59:58.999986176.
    whole = math.floor(seconds)
    nanos = min(round((seconds - whole) * 1e9), 999_999_999)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)


def model_to_pb(
    model: ModelEntry, workers: Sequence[WorkerEntry], at: float
) -> router_pb2.CatalogModel:
    """Converts a catalogue model, counting each version's routable workers."""
    routable = [w for w in workers if w.routable(at)]
    weights = model.effective_weights(at)
    versions = []
    for entry in model.versions:
        if entry.sunset(at):
            state = router_pb2.CATALOG_VERSION_STATE_SUNSET
        elif entry.deprecated_at is not None:
            state = router_pb2.CATALOG_VERSION_STATE_DEPRECATED
        else:
            state = router_pb2.CATALOG_VERSION_STATE_ACTIVE
        version = router_pb2.CatalogVersion(
            version=entry.version,
            weight=weights.get(entry.version, 0),
            state=state,
            healthy_workers=sum(w.serves(model.name, entry.version, model) for w in routable),
        )
        if entry.sunset_at is not None:
            version.sunset_time.CopyFrom(_timestamp(entry.sunset_at))
        _set_price(version, entry)
        versions.append(version)
    return router_pb2.CatalogModel(
        name=model.name,
        versions=versions,
        aliases=dict(model.aliases),
        fallback_model=model.fallback,
        pinned_version=model.pinned,
        shadow=_shadow_pb(model, at),
        worker_pools=sorted(model.worker_pools),
    )


def _as_seen_by(
    model: router_pb2.CatalogModel, allowed: frozenset[str] | None, context: Context
) -> router_pb2.CatalogModel:
    """Returns `model` as a key restricted to `allowed` models (None: any) may see it: a
    fallback outside them is left out (a restricted key learns no other model's name),
    and worker pools (the deployment's layout) are shown to admins only."""
    if allowed is not None and model.fallback_model not in allowed:
        model.fallback_model = ""
    if not _is_admin(context):
        del model.worker_pools[:]
    return model


def _is_admin(context: Context) -> bool:
    """Tells whether the caller is the operator, or an admin key through the edge."""
    if identity.peer_identity(context) == contract.OPERATOR:
        return True
    scopes = request_headers(context).get(contract.SCOPES_HEADER, "")
    return contract.ADMIN_SCOPE in scopes.split()


def _shadow_pb(model: ModelEntry, at: float) -> router_pb2.ShadowTraffic | None:
    shadow = model.shadow(at)
    return router_pb2.ShadowTraffic(version=shadow[0], percent=shadow[1]) if shadow else None


def _set_price(version: router_pb2.CatalogVersion, entry: cat.VersionEntry) -> None:
    if entry.prices:
        version.price_update_time.CopyFrom(_timestamp(entry.prices[-1].since_ms / 1000))
    if entry.price is not None:
        version.price.CopyFrom(entry.price.to_pb())


def worker_to_pb(worker: WorkerEntry) -> router_pb2.Worker:
    """Converts a registered worker."""
    return router_pb2.Worker(
        id=worker.worker_id,
        address=worker.address,
        models=[types_pb2.ModelRef(name=n, version=v) for n, v in worker.models],
        state=(
            router_pb2.WORKER_STATE_DRAINING
            if worker.state == DRAINING
            else router_pb2.WORKER_STATE_SERVING
        ),
        lease_expire_time=_timestamp(worker.lease_expires_at),
        load=None if worker.load is None else load_to_pb(worker.load, worker.outcomes),
        weight=worker.weight.weight,
        weight_reason=worker.weight.reason,
        lease_token_held=bool(worker.token_sha256),
        pool=worker.pool,
    )


# A TTFT above this (ms, ~2.8 hours) is clamped: a cost is the TTFT times the queue
# pressure, and a finite 1e300 ms overflowed to infinity.
TTFT_MAX_MS = 1e7


def load_from_pb(load: router_pb2.WorkerLoad) -> LoadReport:
    """Converts a heartbeat's load report.

    A TTFT that is not a finite number is no sample: an infinite median raised
    ValueError (NaN weight) in every heartbeat of a worker with no timed peer, so
    its lease lapsed, and a NaN one read as 0 ms, the best worker of its clusters.
    """
    timed = math.isfinite(load.ttft_p50_ms) and math.isfinite(load.ttft_p99_ms)
    return LoadReport(
        queue_depth=max(0, load.queue_depth),
        running=max(0, load.running_sequences),
        slots=max(0, load.max_sequences),
        # NaN: no evidence (0); an infinite share is a full one.
        kv_utilization=0.0 if math.isnan(load.kv_utilization) else _share(load.kv_utilization),
        ttft_samples=max(0, load.ttft_samples) if timed else 0,
        ttft_p50_ms=_ttft_ms(load.ttft_p50_ms) if timed else 0.0,
        ttft_p99_ms=_ttft_ms(load.ttft_p99_ms) if timed else 0.0,
    )


def _share(value: float) -> float:
    return min(1.0, max(0.0, value))


def _ttft_ms(value: float) -> float:
    return min(TTFT_MAX_MS, max(0.0, value))


# A heartbeat's hot prompt heads kept per version (the worker sends at most 32).
HOT_PREFIXES_KEPT = 32
# A head reporting more decayed requests or prompt tokens than these is malformed
# (dropped): pins sum counts over workers, and a head's size is the largest any
# worker reports, so one absurd report would count for every worker.
HOT_PREFIX_MAX_REQUESTS = 1e9
HOT_PREFIX_MAX_TOKENS = 1 << 24


def outcomes_from_pb(load: router_pb2.WorkerLoad, received_at: float) -> list[VersionCounts]:
    """Converts a heartbeat's per version outcome counters (malformed ones are dropped);
    its hot heads' idle seconds become when they were last seen on this clock."""
    return [
        VersionCounts(
            model=v.model.name,
            version=v.model.version,
            requests=v.requests,
            errors=v.errors,
            ttft_bounds_ms=tuple(v.ttft_bucket_bounds_ms),
            ttft_counts=tuple(v.ttft_bucket_counts),
            hot_prefixes=tuple(
                HotPrefix(h.prefix, h.requests, received_at - h.idle_seconds, h.prompt_tokens)
                for h in v.hot_prefixes[:HOT_PREFIXES_KEPT]
                if contract.is_prefix_key(h.prefix)
                and 0 < h.requests <= HOT_PREFIX_MAX_REQUESTS
                and 0 <= h.idle_seconds < math.inf
                and 0 <= h.prompt_tokens <= HOT_PREFIX_MAX_TOKENS
            ),
            prefix_cache_tokens=max(0, v.prefix_cache_tokens),
            counters_id=v.counters_id[:64],
            batch_requests=v.batch_requests,
            batch_errors=v.batch_errors,
        )
        for v in load.versions
        if len(v.ttft_bucket_counts) == len(v.ttft_bucket_bounds_ms) + 1
        # Rollouts read TTFT quantiles from these: an infinite bound read as an infinite
        # p99, a NaN one set a window's shape that no other worker's bounds matched.
        and all(math.isfinite(bound) for bound in v.ttft_bucket_bounds_ms)
        and contract.is_model_name(v.model.name)
        and contract.is_model_version(v.model.version)
        # Rollouts sum these over workers: a negative count hid another's errors.
        and 0 <= v.errors <= v.requests
        and 0 <= v.batch_errors <= v.batch_requests <= v.requests
        and v.batch_errors <= v.errors
        and all(count >= 0 for count in v.ttft_bucket_counts)
        and sum(v.ttft_bucket_counts) <= v.requests - v.batch_requests
    ]


def load_to_pb(load: LoadReport, outcomes: Sequence[VersionCounts]) -> router_pb2.WorkerLoad:
    """Converts a stored load report (and its outcome counters) back."""
    at = now()
    return router_pb2.WorkerLoad(
        queue_depth=load.queue_depth,
        running_sequences=load.running,
        max_sequences=load.slots,
        kv_utilization=load.kv_utilization,
        ttft_samples=load.ttft_samples,
        ttft_p50_ms=load.ttft_p50_ms,
        ttft_p99_ms=load.ttft_p99_ms,
        versions=[
            router_pb2.VersionOutcomes(
                model=types_pb2.ModelRef(name=c.model, version=c.version),
                requests=c.requests,
                errors=c.errors,
                ttft_bucket_counts=c.ttft_counts,
                ttft_bucket_bounds_ms=c.ttft_bounds_ms,
                hot_prefixes=[
                    router_pb2.PrefixHeat(
                        prefix=h.prefix,
                        requests=h.requests,
                        idle_seconds=max(0.0, at - h.seen_at),
                        prompt_tokens=h.prompt_tokens,
                    )
                    for h in c.hot_prefixes
                ],
                prefix_cache_tokens=c.prefix_cache_tokens,
                counters_id=c.counters_id,
                batch_requests=c.batch_requests,
                batch_errors=c.batch_errors,
            )
            for c in outcomes
        ],
    )


def prompt_to_pb(template: PromptTemplate) -> router_pb2.PromptTemplate:
    """Converts one prompt-template version."""
    return router_pb2.PromptTemplate(
        name=template.name,
        version=template.version,
        template=template.source,
        system_prompt=template.system,
        variables=[
            router_pb2.PromptVariable(
                name=v.name, required=v.required, default_value=v.default, max_length=v.max_length
            )
            for v in template.variables
        ],
        create_time=_timestamp(template.created_at),
    )


def prompt_head_to_pb(head: PromptHead) -> router_pb2.CatalogPromptTemplate:
    """Converts a prompt template's head (newest version and aliases)."""
    return router_pb2.CatalogPromptTemplate(
        name=head.name,
        latest_version=head.latest,
        aliases=dict(head.aliases),
        update_time=_timestamp(head.updated_at),
    )


def variables_from_pb(variables: Sequence[router_pb2.PromptVariable]) -> list[Variable]:
    """Converts declared variables (max_length 0 means the default)."""
    return [
        Variable(v.name, v.required, v.default_value, v.max_length or DEFAULT_MAX_LENGTH)
        for v in variables
    ]


def _worker_caller(lease_token: str, context: Context) -> WorkerCaller | None:
    """Returns who a worker caller is, for the registry to check against the entry it
    changes (None: an operator or admin, who may act for any worker)."""
    pool = contract.worker_pool_of(identity.peer_identity(context))
    if pool is None:
        return None
    return WorkerCaller(lease_token, identity.peer_hosts(context), pool)


def _caller_pool(context: Context) -> str:
    """Returns the worker pool a registering worker's certificate names ("": the shared
    `worker` identity, or a plaintext caller the server takes for a worker)."""
    return contract.worker_pool_of(identity.peer_identity(context)) or ""


def _placed_on(
    models: Sequence[tuple[str, str]], pool: str, catalog: Mapping[str, ModelEntry]
) -> list[tuple[str, str]]:
    """Returns those of `models` whose model is placed on worker pools other than
    `pool`; raises PermissionDenied when that is every one of them."""
    unplaced = [
        (name, version)
        for name, version in models
        if (entry := catalog.get(name)) is not None and not entry.admits(pool)
    ]
    if unplaced and len(unplaced) == len(models):
        name = unplaced[0][0]
        pools = ", ".join(sorted(catalog[name].worker_pools))
        raise PermissionDenied(
            f"model {name!r} is served only by the worker pools {pools}; this worker's "
            f"certificate is {contract.worker_identity(pool)!r}",
            reason="MODEL_NOT_ON_WORKER_POOL",
        )
    return unplaced


def _refs(models: Sequence[types_pb2.ModelRef]) -> list[tuple[str, str]]:
    for ref in models:
        if not ref.version:
            raise InvalidArgument([FieldViolation("models.version", "is required")])
    return [(ref.name, ref.version) for ref in models]


def _duration(seconds: float) -> duration_pb2.Duration:
    found = duration_pb2.Duration()
    found.FromNanoseconds(int(seconds * 1e9))
    return found


def policy_from_pb(request: pb.StartRolloutRequest) -> rollouts.Policy:
    """Converts a rollout request's policy (unset fields take their defaults)."""
    step_s = (
        request.step_duration.ToNanoseconds() / 1e9
        if request.HasField("step_duration")
        else rollouts.DEFAULT_STEP_S
    )
    return rollouts.Policy(
        steps=tuple(request.steps) or rollouts.DEFAULT_STEPS,
        step_s=step_s,
        max_error_rate=request.max_error_rate or rollouts.DEFAULT_MAX_ERROR_RATE,
        max_ttft_p99_ratio=request.max_ttft_p99_ratio or rollouts.DEFAULT_MAX_TTFT_P99_RATIO,
        min_requests=request.min_requests or rollouts.DEFAULT_MIN_REQUESTS,
    )


_ROLLOUT_STATES = {
    rollouts.RUNNING: router_pb2.ROLLOUT_STATE_RUNNING,
    rollouts.PAUSED: router_pb2.ROLLOUT_STATE_PAUSED,
    rollouts.SUCCEEDED: router_pb2.ROLLOUT_STATE_SUCCEEDED,
    rollouts.ROLLED_BACK: router_pb2.ROLLOUT_STATE_ROLLED_BACK,
    rollouts.ABORTED: router_pb2.ROLLOUT_STATE_ABORTED,
}


def _window_pb(window: rollouts.Window) -> router_pb2.RolloutWindow:
    return router_pb2.RolloutWindow(
        requests=window.requests,
        errors=window.errors,
        error_rate=window.error_rate,
        ttft_p99_ms=window.ttft_p99_ms(),
    )


def rollout_to_pb(rollout: rollouts.Rollout, workers: Sequence[WorkerEntry]) -> router_pb2.Rollout:
    """Converts a rollout, with both versions' figures over its current step."""
    policy = rollout.policy
    return router_pb2.Rollout(
        model=rollout.model,
        version=rollout.version,
        stable_version=rollout.stable,
        steps=policy.steps,
        step_duration=_duration(policy.step_s),
        max_error_rate=policy.max_error_rate,
        max_ttft_p99_ratio=policy.max_ttft_p99_ratio,
        min_requests=policy.min_requests,
        state=_ROLLOUT_STATES[rollout.state],
        step_index=rollout.step_index,
        weight=rollout.weight,
        step_start_time=_timestamp(rollout.step_started_at),
        canary=_window_pb(rollouts.window(rollout, workers, rollout.version)),
        stable=_window_pb(rollouts.window(rollout, workers, rollout.stable)),
        reason=rollout.reason,
        decisions=[
            router_pb2.RolloutDecision(
                time=_timestamp(d.at), action=d.action, weight=d.weight, reason=d.reason
            )
            for d in rollout.decisions
        ],
        create_time=_timestamp(rollout.created_at),
    )


class RouterServicer(PolicyRpcs, ShadowRpcs, pb_grpc.RouterServiceServicer):
    """RouterServicer serves the catalogue; every change reaches the edges within a second.

    Content policies and samples: `PolicyRpcs` (services.router.policy_servicer);
    shadow traffic and version comparisons: `ShadowRpcs` (services.router.shadow_servicer).
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: WorkerRegistry,
        refresh: Refresh,
        prompts: PromptCatalog,
        rollout_store: rollouts.RolloutStore,
    ) -> None:
        self.catalog = catalog
        self.registry = registry
        self.refresh = refresh
        self.prompts = prompts
        self.policy_catalog = PolicyCatalog(prompts.redis)
        self.shadow_pairs = PairStore(prompts.redis)
        self.rollouts = rollout_store

    async def _rollout_pb(self, rollout: rollouts.Rollout) -> router_pb2.Rollout:
        return rollout_to_pb(rollout, await self.rollouts.placed_workers(rollout.model, now()))

    async def StartRollout(
        self, request: pb.StartRolloutRequest, context: Context
    ) -> pb.StartRolloutResponse:
        rollout = await self.rollouts.start(
            request.model, request.version, policy_from_pb(request), now()
        )
        return pb.StartRolloutResponse(rollout=await self._rollout_pb(rollout))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Context
    ) -> pb.GetRolloutResponse:
        rollout = await self.rollouts.get(request.model)
        return pb.GetRolloutResponse(rollout=await self._rollout_pb(rollout))

    async def PauseRollout(
        self, request: pb.PauseRolloutRequest, context: Context
    ) -> pb.PauseRolloutResponse:
        rollout = await self.rollouts.operate(request.model, "pause", now())
        return pb.PauseRolloutResponse(rollout=await self._rollout_pb(rollout))

    async def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context: Context
    ) -> pb.ResumeRolloutResponse:
        rollout = await self.rollouts.operate(request.model, "resume", now())
        return pb.ResumeRolloutResponse(rollout=await self._rollout_pb(rollout))

    async def AbortRollout(
        self, request: pb.AbortRolloutRequest, context: Context
    ) -> pb.AbortRolloutResponse:
        rollout = await self.rollouts.operate(request.model, "abort", now())
        return pb.AbortRolloutResponse(rollout=await self._rollout_pb(rollout))

    async def _answer(self, model: ModelEntry) -> router_pb2.CatalogModel:
        at = now()
        return model_to_pb(model, await self.registry.all(at), at)

    async def _changed(self, model: ModelEntry) -> router_pb2.CatalogModel:
        await self.refresh()  # push to this replica's Envoys now, not at the next poll
        return await self._answer(model)

    async def ListCatalogModels(
        self, request: pb.ListCatalogModelsRequest, context: Context
    ) -> pb.ListCatalogModelsResponse:
        at = now()
        models, workers = await self.catalog.all(), await self.registry.all(at)
        allowed = allowed_models(request_headers(context))
        names = sorted(n for n in models if allowed is None or n in allowed)
        return pb.ListCatalogModelsResponse(
            models=[
                _as_seen_by(model_to_pb(models[n], workers, at), allowed, context) for n in names
            ]
        )

    async def GetCatalogModel(
        self, request: pb.GetCatalogModelRequest, context: Context
    ) -> pb.GetCatalogModelResponse:
        cat.check_name(request.model)
        headers = request_headers(context)
        check_model_allowed(headers, request.model)
        answer = await self._answer(await self.catalog.get(request.model))
        return pb.GetCatalogModelResponse(
            model=_as_seen_by(answer, allowed_models(headers), context)
        )

    async def RegisterModelVersion(
        self, request: pb.RegisterModelVersionRequest, context: Context
    ) -> pb.RegisterModelVersionResponse:
        model = await self.catalog.change(
            request.model,
            lambda current, _: cat.add_version(
                current, request.model, request.version, request.weight
            ),
        )
        return pb.RegisterModelVersionResponse(model=await self._changed(model))

    async def SetTrafficSplit(
        self, request: pb.SetTrafficSplitRequest, context: Context
    ) -> pb.SetTrafficSplitResponse:
        weights: dict[str, int] = {}
        for entry in request.weights:
            if entry.version in weights:
                raise InvalidArgument(
                    [FieldViolation("weights", f"version {entry.version!r} is listed twice")]
                )
            weights[entry.version] = entry.weight
        # The operator's split wins: a rollout running on the model is aborted with it.
        split = " ".join(f"{v}={w}" for v, w in weights.items())
        model = await self.rollouts.change_by_hand(
            request.model, lambda m: cat.set_split(m, weights), f"split {split}", now()
        )
        return pb.SetTrafficSplitResponse(model=await self._changed(model))

    async def PinModelVersion(
        self, request: pb.PinModelVersionRequest, context: Context
    ) -> pb.PinModelVersionResponse:
        at = now()
        if not request.version:  # an unpin moves no rollout's traffic
            model = await self.catalog.update(request.model, lambda m, _: cat.pin(m, "", at))
        else:  # a pin takes all traffic: a rollout running on the model is aborted with it
            model = await self.rollouts.change_by_hand(
                request.model,
                lambda m: cat.pin(m, request.version, at),
                f"pinned to {request.version}",
                at,
            )
        return pb.PinModelVersionResponse(model=await self._changed(model))

    async def DeprecateModelVersion(
        self, request: pb.DeprecateModelVersionRequest, context: Context
    ) -> pb.DeprecateModelVersionResponse:
        sunset = 0.0
        if request.HasField("sunset_time"):
            timestamp_seconds(request.sunset_time, "sunset_time")  # its range, checked
            # Whole seconds, what the Sunset header carries: as a float, the largest
            # Timestamp (9999-12-31T23:59:59.999999999Z, a common "never") rounded
            # up to the year 10000, which no header or Timestamp can show.
            sunset = float(request.sunset_time.seconds)
        model = await self.catalog.update(
            request.model, lambda m, _: cat.deprecate(m, request.version, sunset, now())
        )
        return pb.DeprecateModelVersionResponse(model=await self._changed(model))

    async def SetFallbackModel(
        self, request: pb.SetFallbackModelRequest, context: Context
    ) -> pb.SetFallbackModelResponse:
        model = await self.catalog.update(
            request.model, lambda m, models: cat.set_fallback(m, request.fallback_model, models)
        )
        return pb.SetFallbackModelResponse(model=await self._changed(model))

    async def SetModelWorkerPools(
        self, request: pb.SetModelWorkerPoolsRequest, context: Context
    ) -> pb.SetModelWorkerPoolsResponse:
        model = await self.catalog.update(
            request.model, lambda m, models: cat.set_worker_pools(m, request.worker_pools, models)
        )
        return pb.SetModelWorkerPoolsResponse(model=await self._changed(model))

    async def SetModelAlias(
        self, request: pb.SetModelAliasRequest, context: Context
    ) -> pb.SetModelAliasResponse:
        model = await self.catalog.update(
            request.model, lambda m, _: cat.set_alias(m, request.alias, request.version)
        )
        return pb.SetModelAliasResponse(model=await self._changed(model))

    async def SetModelPrice(
        self, request: pb.SetModelPriceRequest, context: Context
    ) -> pb.SetModelPriceResponse:
        price = Price.from_pb(request.price) if request.HasField("price") else None
        model = await self.catalog.update(
            request.model, lambda m, _: cat.set_price(m, request.version, price, now())
        )
        # Prices do not change routing: no push to the edges is needed.
        return pb.SetModelPriceResponse(model=await self._answer(model))

    async def CreatePromptTemplate(
        self, request: pb.CreatePromptTemplateRequest, context: Context
    ) -> pb.CreatePromptTemplateResponse:
        template = await self.prompts.create(
            request.name,
            request.template,
            request.system_prompt,
            variables_from_pb(request.variables),
            now(),
        )
        return pb.CreatePromptTemplateResponse(template=prompt_to_pb(template))

    async def GetPromptTemplate(
        self, request: pb.GetPromptTemplateRequest, context: Context
    ) -> pb.GetPromptTemplateResponse:
        template = await self.prompts.get(request.name, request.version)
        return pb.GetPromptTemplateResponse(template=prompt_to_pb(template))

    async def ListPromptTemplates(
        self, request: pb.ListPromptTemplatesRequest, context: Context
    ) -> pb.ListPromptTemplatesResponse:
        heads = await self.prompts.heads()
        return pb.ListPromptTemplatesResponse(
            templates=[prompt_head_to_pb(heads[name]) for name in sorted(heads)]
        )

    async def SetPromptTemplateAlias(
        self, request: pb.SetPromptTemplateAliasRequest, context: Context
    ) -> pb.SetPromptTemplateAliasResponse:
        head = await self.prompts.set_alias(request.name, request.alias, request.version, now())
        return pb.SetPromptTemplateAliasResponse(template=prompt_head_to_pb(head))


class WorkerRegistryServicer(pb_grpc.WorkerRegistryServiceServicer):
    """WorkerRegistryServicer is where workers register, heartbeat and drain."""

    def __init__(
        self,
        catalog: Catalog,
        registry: WorkerRegistry,
        refresh: Refresh,
        routed_versions: Callable[[], Mapping[str, str]] = dict,
        placements: Callable[[], Mapping[str, frozenset[str]] | None] = dict,
    ) -> None:
        self.catalog = catalog
        self.registry = registry
        self.refresh = refresh
        # Each model's version for requests that pin none, as the edge's routes were
        # last built: workers report it as the default (a heartbeat reads no Redis).
        self.routed_versions = routed_versions
        # The worker pools of each placed model, as last built (None: not built yet): a
        # heartbeat keeps only what its worker's pool may serve (WorkerRegistry.renew).
        self.placements = placements
        # The versions this replica registered in the catalogue. A heartbeat whose new
        # models were stored but whose catalogue registration failed (Redis, or a busy
        # catalogue's UNAVAILABLE) registers them at the worker's next heartbeat: the
        # registry no longer reports them as changed, and the version stayed unrouted.
        self._in_catalogue: set[tuple[str, str]] = set()

    async def _placements(self) -> Mapping[str, frozenset[str]]:
        """Returns the worker pools of each placed model as the router's last build
        read them (before its first build, as the catalogue has them now)."""
        built = self.placements()
        if built is not None:
            return built
        models = await self.catalog.all()
        return {name: m.worker_pools for name, m in models.items() if m.worker_pools}

    async def _register(self, models: Sequence[tuple[str, str]], pool: str | None) -> bool:
        """Adds versions no operator registered yet to the catalogue (0% of traffic),
        of models placed on `pool` or on none (None: any); returns whether it added any."""
        added = await self.catalog.register(models, pool)
        self._in_catalogue.update(models)
        return added

    async def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: Context
    ) -> pb.RegisterWorkerResponse:
        models = _refs(request.models)
        pool = _caller_pool(context)
        # Versions of models placed on other pools are left out, and named in the
        # answer (the worker logs them); naming nothing else is refused. A placement
        # made later is kept by heartbeats (RenewLease), by the readers that route
        # (WorkerEntry.serves) and by the edge's certificate check.
        unplaced = _placed_on(models, pool, await self.catalog.all()) if models else []
        models = [ref for ref in models if ref not in unplaced]
        await self.registry.register(
            request.worker_id, request.address, models, now(), request.lease_token, pool
        )
        await self._register(models, pool)
        await self.refresh()
        lease = duration_pb2.Duration()
        lease.FromNanoseconds(int(self.registry.lease_s * 1e9))
        return pb.RegisterWorkerResponse(
            lease_duration=lease,
            unplaced_models=[types_pb2.ModelRef(name=n, version=v) for n, v in unplaced],
        )

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: Context
    ) -> pb.RenewLeaseResponse:
        # A heartbeat rewrites the worker's models and load: only the worker itself.
        caller = _worker_caller(request.lease_token, context)
        placements = await self._placements()
        models = _refs(request.models)
        load = load_from_pb(request.load) if request.HasField("load") else None
        at = now()
        renewal = await self.registry.renew(
            request.worker_id,
            models,
            at,
            load,
            outcomes_from_pb(request.load, at),
            caller,
            served_from_pb(request.worker_id, request.served_models),
            describes=bool(request.served_models),
            placements=placements,
        )
        if renewal.models_changed or not self._in_catalogue.issuperset(models):
            # A replica's first heartbeat from each worker only checks the catalogue:
            # the routes are built again when something changed.
            added = await self._register(models, None if caller is None else caller.pool)
            if renewal.models_changed or added:
                await self.refresh()
        worker = renewal.worker
        return pb.RenewLeaseResponse(
            lease_expire_time=_timestamp(worker.lease_expires_at),
            drain=worker.asked_to_stop,  # not after its own drain (its preStop hook)
            mesh_models=mesh_models(renewal.others, placements),
            routed_versions=self.routed_versions(),
        )

    async def DrainWorker(
        self, request: pb.DrainWorkerRequest, context: Context
    ) -> pb.DrainWorkerResponse:
        # A worker drains only itself (the operator and admins drain any).
        caller = _worker_caller(request.lease_token, context)
        worker = await self.registry.drain(request.worker_id, caller)
        await self.refresh()
        return pb.DrainWorkerResponse(worker=worker_to_pb(worker))

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Context
    ) -> pb.ListWorkersResponse:
        workers = await self.registry.all(now())
        return pb.ListWorkersResponse(workers=[worker_to_pb(w) for w in workers])
