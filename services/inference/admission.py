"""What every inference API version does around the model: routing, callers, budgets, usage.

Shared by the v1 and v2 servicers (services.inference.servicer,
services.inference.v2.servicer), so both versions pick the same model
version for the same headers, hold the same token budgets and write the same
usage events (one per request, tagged with the API version).

`Admission` is the worker's side of a request's life: `resolve` picks the
model version, `reserve` holds prompt + max_tokens in the caller's budget
before any compute, `within_budget` charges a stream admitted while budgets
were unreachable, and `record` writes the usage event and reconciles the
reservation with what was used (or charges such a stream the rest of it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from opentelemetry import trace
from redis.exceptions import RedisError

from gateway import model_routing
from services.core import contract
from services.core.breaker import BreakerOpen
from services.core.errors import (
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    TokenmeshError,
    Unavailable,
)
from services.core.identity import peer_identity
from services.core.interceptors import Context, request_headers
from services.core.model_access import allowed_models, check_model_allowed
from services.inference import metrics, shadow
from services.inference.budget import (
    REPLAY_TTL_S,
    Limits,
    Run,
    TokenBudgets,
    check_within_whole_budget,
)
from services.inference.engines.prefix_cache import private_scope
from services.inference.mesh_models import MeshModels
from services.inference.models import LoadedModel, ModelRegistry
from services.inference.pipeline.content import ContentStage
from services.inference.usage_log import UsageLog
from tokenmesh.inference.v1 import inference_pb2, inference_service_pb2
from tokenmesh.type.v1 import types_pb2

if TYPE_CHECKING:
    from services.inference.pipeline.cache import CacheStage
    from services.inference.v2.choices import Generation

logger = logging.getLogger(__name__)
_V1_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
KEY_ID_HEADER = contract.KEY_ID_HEADER
TENANT_HEADER = contract.TENANT_HEADER
MODELS_HEADER = contract.MODELS_HEADER
FALLBACK_FROM_HEADER = "x-tokenmesh-fallback-from"  # the model a fallback answer stands in for
#: Callers whose request id is the request's usage id (a replay is the same request):
#: the jobs service, and plaintext (development, benchmarks: no identities at all).
REPLAYING_CALLERS = frozenset({contract.JOBS, None})
#: How a job item's attempt ends when the jobs service will try it again (its call
#: timed out or its replica died: cancelled; the model unloaded under it: error).
UNFINISHED_ATTEMPT = frozenset({"cancelled", "error"})
CHARGE_EVERY_TOKENS = 16  # an unreserved stream is charged in chunks of at least this
# What a budgets call raises while Redis is away or hung (redis-py's errors, and a
# socket's own: budgets fail open on them).
BUDGETS_UNAVAILABLE = (RedisError, TimeoutError, OSError)
# Reconciling a reservation, or taking back one whose answer never came, runs in
# the background: tries 1 s, 2 s, 4 s apart (a Redis stall that timed the call out
# often outlasts one), then every STORE_RETRY_EVERY_S until Redis answers (the calls
# are idempotent). Given up after ~7 s, a reservation stayed charged whole for as
# long as the worker lived (no reaper takes back a live holder's): a key refused
# for tokens nobody used after every Redis failover longer than that.
STORE_ATTEMPTS = 4
STORE_BACKOFF_S = 1.0
STORE_RETRY_EVERY_S = 10.0


def token_usage(prompt_tokens: int, completion_tokens: int) -> types_pb2.TokenUsage:
    """Returns a TokenUsage with its total."""
    return types_pb2.TokenUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def visible_models(
    models: MeshModels, context: Context, page_token: str, page_size: int
) -> tuple[list[str], str]:
    """Returns one page of the mesh's model names the caller may use, and the next page token."""
    allowed = allowed_models(request_headers(context))
    names = [n for n in models.names() if n > page_token and (allowed is None or n in allowed)]
    page, rest = names[:page_size], names[page_size:]
    return page, page[-1] if rest else ""


def _int(value: object) -> int:
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


def _trace_id() -> str:
    """The request's trace id, for its usage event: only when it was traced (sampled),
    so that an audit entry never names a trace no collector holds."""
    context = trace.get_current_span().get_span_context()
    traced = context.is_valid and context.trace_flags.sampled
    return format(context.trace_id, "032x") if traced else ""


@dataclass(frozen=True)
class Target:
    """Target is the model version a request is served by."""

    model: LoadedModel
    fallback_from: str = ""  # the requested model, when its fallback serves instead
    worker_id: str = ""  # this worker, named in a response header for operators


def route_target(
    registry: ModelRegistry, headers: Mapping[str, str], name: str, version: str
) -> Target:
    """Picks the version to serve: the edge's routing decision, else the request's own.

    The edge names the version it routed to (weighted split, pin, alias) and
    the fallback to serve when this worker does not have that version (it
    was reached through the model's fallback cluster).
    """
    routed_model = headers.get(model_routing.ROUTE_MODEL_HEADER, "")
    # Before any lookup: a model outside the key's list is refused alike whether it
    # is served, unknown or unloading (its state is not the caller's to learn).
    check_model_allowed(headers, routed_model or name)
    routed_version = shadow.routed_version(headers)  # a shadow copy: the shadow version
    if routed_model:
        if registry.has(routed_model, routed_version):
            return Target(registry.resolve(routed_model, routed_version))
        fallback = headers.get(model_routing.FALLBACK_MODEL_HEADER, "")
        fallback_version = headers.get(model_routing.FALLBACK_VERSION_HEADER, "")
        if fallback and registry.has(fallback, fallback_version):
            # The model the edge routed, whose fallback this is (and whose key
            # permission it takes), not the body's name, should the two differ.
            target = registry.resolve(fallback, fallback_version)
            return Target(target, fallback_from=routed_model)
        # The edge's endpoints were stale (the version was just unloaded here):
        # UNAVAILABLE makes Envoy retry on another worker before any byte is sent.
        raise Unavailable(
            f"this worker no longer serves {routed_model!r} version {routed_version!r}",
            retry_after_s=0.1,
            reason="VERSION_NOT_ON_WORKER",
        )
    # Direct calls (no edge), or a version the catalogue does not route.
    return Target(registry.resolve(name, version or headers.get(model_routing.VERSION_HEADER, "")))


def replay_ttl(headers: Mapping[str, str]) -> int | None:
    """Returns how long a job item's charge must be remembered: until the deadline its
    jobs service sent (contract.REPLAY_UNTIL_HEADER), and an hour for an attempt
    still running then; None without a readable one (the budgets' own TTL)."""
    try:
        left_s = float(headers.get(contract.REPLAY_UNTIL_HEADER, "")) - time.time()
    except ValueError:
        return None
    return max(0, math.ceil(left_s)) + REPLAY_TTL_S if math.isfinite(left_s) else None


class Request:
    """Request is one validated RPC with its caller, model and usage bookkeeping.

    Args:
        context: the RPC's context (the edge's identity headers).
        target: the model version that serves it.
        request_id: the client's id; generated when empty.
        rpc: the full RPC name, recorded in the usage event.
        api_version: "v1" or "v2", recorded in the usage event.
        metadata: the request's usage tags (v2).
    """

    def __init__(
        self,
        context: Context,
        target: Target,
        request_id: str,
        rpc: str,
        api_version: str = "v1",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        headers = request_headers(context)
        model = target.model
        check_model_allowed(headers, target.fallback_from or model.name)
        self.model = model
        self.fallback_from = target.fallback_from
        self.worker_id = target.worker_id
        self.budget_warning = ""  # budgets at >= 80% after this request's reservation
        self.cache_status = ""  # x-tokenmesh-cache: how the response cache served it
        # The caller's id, else the edge's (x-request-id: in its access log and on
        # its error replies, so the one id a client quotes finds every record).
        self.request_id = request_id or _edge_request_id(headers) or uuid.uuid4().hex
        # What budgets and metering count this request under (its usage event's
        # event_id): the request id for the jobs service, whose replayed item is the
        # same `<job>:<n>` (charged and metered once), a fresh id for any other
        # caller: a request id is the caller's to choose, and reused it let every
        # request after the first pass unbudgeted and unmetered (the edge's is one
        # for a request and its shadow copy, and for each of Envoy's retries).
        caller = peer_identity(context) if request_id else None
        replays = bool(request_id) and caller in REPLAYING_CALLERS
        self.usage_id = request_id if replays else uuid.uuid4().hex
        # One attempt at a job item (`<job>:<n>`, the jobs service's own id).
        self.job_attempt = bool(request_id) and caller == contract.JOBS
        # How long its charge is remembered: its item may run again until the job's
        # deadline (remembered an hour, a re-run after it was charged twice).
        self.replay_ttl_s = replay_ttl(headers) if self.job_attempt else None
        self.rpc = rpc
        self.api_version = api_version
        if self.job_attempt and headers.get(contract.API_VERSION_HEADER) == "v1":
            # A v1 Complete handed over to the jobs service (it runs on v2's): metered
            # as v1, as its direct call is. Reports by API version missed it.
            self.rpc, self.api_version = _as_v1(rpc), "v1"
        self.metadata = dict(metadata or {})
        self.key_id = headers.get(KEY_ID_HEADER, "")
        self.tenant = headers.get(TENANT_HEADER, "")
        self.tier = headers.get(contract.TIER_HEADER, "")  # weighs its fair share
        # The edge's key for the prompt's head: counted per version, the router
        # pins busy heads to one worker each (services.router.prefix_pins).
        self.prefix = headers.get(model_routing.PREFIX_HEADER, "")
        self.limits = Limits(
            tokens_per_minute=_int(headers.get(contract.TPM_HEADER)),
            monthly_tokens=_int(headers.get(contract.MONTHLY_TOKENS_HEADER)),
        )
        # Shadow traffic (services.inference.shadow): the edge's mirrored copy of a
        # request is metered to the shadow account, never to the caller's key,
        # budgets or limits; it runs only while its caller's budgets have room
        # (`copy_of`: read at `reserve`, nothing reserved).
        self.shadow = shadow.mark_call(context, headers, self.request_id)
        self.copy_of: shadow.CopyCaller | None = None
        # Whose prompts its KV is reused among: a copy's are its caller's, as its live
        # side's (in one scope for every caller's copies, a copy reused prompts its
        # live side never could, and read faster than the version is).
        self._scope_tenant = self.tenant
        if self.shadow is not None and self.shadow.is_copy:
            self.copy_of = shadow.CopyCaller(self.key_id, self.limits)
            self.key_id, self.tenant, self.limits = "", contract.SHADOW_TENANT, Limits()
        self.trace_id = _trace_id()
        self.started = time.monotonic()
        # Token budgets (see Admission): what admission reserved for this request,
        # whether it runs unmetered (admitted while budgets were unreachable:
        # charged as it goes, once they are back) and what that charged so far.
        self.needed_tokens = 0
        self.reserved_tokens = 0
        self.reserved_at = 0.0  # time.time() of the reservation
        # Its reservation call's own id: a forgotten call that reaches Redis late
        # charges nothing, while the request id's next attempt reserves anew.
        self.reservation_attempt = ""
        self.unmetered = False
        self.charged_tokens = 0
        # An unmetered request's chunks (within_budget): each charge call sent has an
        # id of its own, and one charge call at a time.
        self.chunks_sent = 0
        self.charging: tuple[str, float] | None = None  # the chunk call in flight
        # `reserve` ran for it: a later call holds nothing more (a multi-prompt request
        # reserves every prompt's tokens before any of them runs).
        self.budget_reserved = False
        # None: `record` records its usage events as they come. A list: they are held
        # there until the request they belong to is answered, then recorded, or dropped
        # (with the reservation) if it was refused (services.inference.pipeline.
        # generate.GenerationPipeline.complete_all).
        self.held_events: list[inference_pb2.UsageEvent] | None = None
        # Cut by this worker's shutdown before its answer's headers went out: its
        # caller got a trailers-only UNAVAILABLE, which the edge tries again on
        # another worker (Admission.note_cancelled). Or refused by its version's
        # unload after one of its choices started, with nothing sent (pipeline.record):
        # tried again elsewhere too. Recorded apart, billed nothing.
        self.cut = False
        # A Generate stream that handed its caller a message: billed what it sent,
        # however it ends (pipeline.stream.produce).
        self.streamed = False

    @property
    def batch_priority(self) -> bool:
        """Whether it waits behind every interactive request (a generation that asked
        for batch priority: a job item's); an embedding request never does."""
        return False

    @property
    def prefix_scope(self) -> str:
        """The scope its prompt's KV is reused in (engines.prefix_cache): its tenant's,
        kept apart from a shared model's one scope when it asked for another model
        (that model's prompts are not public because its fallback's are)."""
        tenant = self._scope_tenant
        return private_scope(tenant) if self.fallback_from else tenant

    def model_ref(self) -> types_pb2.ModelRef:
        """Returns the serving model version as a protobuf message."""
        return types_pb2.ModelRef(name=self.model.name, version=self.model.version)

    async def send_headers(self, context: Context) -> None:
        """Sends the request id, serving version (and any fallback) as response headers."""
        headers = [("x-request-id", self.request_id), ("x-model-version", self.model.version)]
        if self.worker_id:
            headers.append(("x-tokenmesh-worker", self.worker_id))
        if self.budget_warning:
            headers.append(("x-tokenmesh-budget-warning", self.budget_warning))
        if self.cache_status:
            headers.append((contract.CACHE_HEADER, self.cache_status))
        if self.fallback_from:
            headers += [
                ("x-tokenmesh-model", self.model.name),
                (FALLBACK_FROM_HEADER, self.fallback_from),
            ]
        await context.send_initial_metadata(headers)

    def usage_event(
        self, usage: types_pb2.TokenUsage, finish_reason: str, timing: inference_pb2.Timing | None
    ) -> inference_pb2.UsageEvent:
        """Builds the usage record of this request."""
        return inference_pb2.UsageEvent(
            request_id=self.request_id,
            event_id=self.usage_id,
            key_id=self.key_id,
            tenant=self.tenant,
            model=self.model_ref(),
            usage=usage,
            finish_reason=finish_reason,
            timing=timing,
            trace_id=self.trace_id,
            rpc=self.rpc,
            finish_unix_ms=int(time.time() * 1000),
            metadata=self.metadata,
            api_version=self.api_version,
        )


def _as_v1(rpc: str) -> str:
    """Returns inference v1's name of the RPC named `rpc` (the same method's)."""
    return f"/{_V1_SERVICE}/{rpc.rsplit('/', 1)[-1]}"


def _edge_request_id(headers: Mapping[str, str]) -> str:
    """Returns the request's x-request-id when it is a well-formed request id, else ""."""
    value = headers.get(shadow.REQUEST_ID_HEADER, "")
    return value if contract.is_request_id(value) else ""


def _chunk_id(request: Request) -> str:
    """Returns the id of an unmetered request's next charge call (one id per call)."""
    return f"{request.usage_id}:chunk-{request.chunks_sent}"


def _cache_scope(request: Request) -> str:
    """Returns the prefix-cache scope `request`'s prompt was held in: its tenant's, or
    the one scope of a shared cache (or of an engine without a prefix cache)."""
    scheduler = request.model.scheduler
    cache = scheduler.engine.prefix_cache if scheduler is not None else None
    return cache.scope_of(request.prefix_scope) if cache is not None else ""


def set_attempt_apart(event: inference_pb2.UsageEvent) -> None:
    """Records an attempt that someone tries again beside the request, billed nothing.

    A job item's unfinished attempt: the jobs service tries the item again under
    the same id, and the meter keeps the first event of an id: this attempt's
    tokens-so-far would have been the item's usage, and the finished run's
    dropped. A call cut by its worker's shutdown before its headers went out
    (`Request.cut`): the edge tries it again on another worker, under a usage id
    of its own, which is billed. So the attempt gets an event id of its own,
    `usage` zero (nothing billed, budgets reconciled to zero) and `served_usage`
    what it computed. The run that finishes is billed, once.
    """
    if not event.cached:  # a cached answer's served_usage is what the caller received
        event.served_usage.CopyFrom(event.usage)
    event.usage.CopyFrom(token_usage(0, 0))
    event.cached_prompt_tokens = 0
    event.event_id = f"{event.event_id}{contract.UNFINISHED_ATTEMPT_MARK}{uuid.uuid4().hex}"


def check_whole_budget(requests: Sequence[Request]) -> None:
    """Refuses, for good, one caller's requests reserved together (a legacy completion's
    prompts: pipeline.generate.complete_all) that need more than a whole budget.

    Each is reserved on its own, and the budgets' own check (RequestOverBudget)
    sees one prompt's amount only: prompts that each fit, together over
    tokens_per_minute (or the month), were refused "retry in 60s" every time.

    Raises:
        RequestOverBudget: their tokens together exceed tokens_per_minute or
            monthly_tokens (FAILED_PRECONDITION, REQUEST_EXCEEDS_BUDGET).
    """
    reserving = [r for r in requests if r.needed_tokens and r.key_id and r.limits.any]
    if reserving:  # one caller's
        total = sum(r.needed_tokens for r in reserving)
        check_within_whole_budget(reserving[0].key_id, reserving[0].limits, total)


class Admission:
    """Admission resolves, budgets and records requests for every API version.

    Args:
        registry: the loaded model versions.
        usage_log: where every finished request's usage is recorded.
        budgets: the callers' token budgets (reserved at admission).
        worker_id: this worker's id, sent in the `x-tokenmesh-worker` response header.
    """

    def __init__(
        self, registry: ModelRegistry, usage_log: UsageLog, budgets: TokenBudgets, worker_id: str
    ) -> None:
        self.registry = registry
        self.usage_log = usage_log
        self.budgets = budgets
        self.worker_id = worker_id
        # Content policies and samples (services.inference.pipeline.content); the
        # service sets a stage backed by its policy cache, none by default.
        self.content = ContentStage()
        # Comparison records of shadowed models' requests (services.inference.shadow);
        # the service sets a recorder backed by Redis. None: none are kept.
        self.shadow_records: shadow.ShadowRecorder | None = None
        # The response cache (services.inference.pipeline.generate.CacheStage); the
        # service sets it when TOKENMESH_CACHE is on. None: not on the path at all.
        self.cache: CacheStage | None = None
        # What the whole mesh serves, for ListModels and GetModel: the service
        # feeds it the router's view of the other workers; until then, this one's.
        self.mesh_models = MeshModels(registry)
        # Whether a call cancelled now was cut by the worker's shutdown (its grace
        # over); the service sets it (InferenceService.cut_by_shutdown). Never, by default.
        self.cut_by_shutdown: Callable[[], bool] = lambda: False
        # The Generate streams running with their response headers out: the worker's
        # shutdown ends them in-band before its grace is over (pipeline.stream).
        self.open_streams: set[Generation] = set()
        # Set when that shutdown ended them: a stream that goes out after it is ended
        # at once (pipeline.stream.track).
        self.streams_ended_by: TokenmeshError | None = None
        self._background: set[asyncio.Task[None]] = set()

    @functools.cached_property
    def copy_budgets(self) -> shadow.CallerBudgets:
        """Returns the reader of shadow copies' callers' budgets (built at the first copy)."""
        return shadow.CallerBudgets(self.budgets)

    def resolve(self, context: Context, name: str, version: str, *, generative: bool) -> Target:
        """Returns the model version to serve; refuses work the usage spool cannot meter."""
        self.usage_log.check_capacity()
        target = replace(
            route_target(self.registry, request_headers(context), name, version),
            worker_id=self.worker_id,
        )
        model = target.model
        if (model.scheduler if generative else model.embedder) is None:
            kind = "a generative" if generative else "an embedding"
            raise InvalidArgument(
                [FieldViolation("model", f"{name!r} is not {kind} model")],
                reason="MODEL_KIND_MISMATCH",
            )
        return target

    async def reserve(self, request: Request) -> None:
        """Reserves `request.needed_tokens` in the caller's token budget, before any compute.

        Once per request: a request reserved already (with its siblings) holds it.
        """
        if request.budget_reserved:
            return
        request.budget_reserved = True
        if not (request.key_id and request.limits.any):
            if request.copy_of is not None:
                # A shadow copy (no key of its own): its caller's budgets are read, never
                # charged; it is dropped when they have no room for it (its live
                # request's fate).
                model = request.model
                await self.copy_budgets.check(
                    request.copy_of, request.needed_tokens, model.name, model.version
                )
            return
        # The month it is reserved in, and reconciled in (taken after the call, a
        # reservation at midnight on the 31st was reconciled into the next month).
        request.reserved_at = time.time()
        request.reservation_attempt = uuid.uuid4().hex
        try:
            reserved = await self.budgets.reserve(
                request.key_id,
                request.limits,
                request.usage_id,
                request.needed_tokens,
                request.reserved_at,
                request.reservation_attempt,
                listed=True,  # reconciled when it ends, or taken back if this worker dies
                replay_ttl_s=request.replay_ttl_s,
                # A job item tried again while an earlier attempt still runs: the
                # first to end unfinished gave back the charge the other ran on.
                attempts_share=request.job_attempt,
            )
            request.budget_warning = reserved.warning
            # A job item's retry admitted on an earlier attempt's charge reconciles it
            # in that charge's month (a retry past a month's end left the old month
            # charged all of it, and the new one negative: tokens over the budget).
            request.reserved_at = reserved.reserved_at
        except BUDGETS_UNAVAILABLE as exc:  # budgets fail open, like request limits
            logger.warning("token budgets unavailable (%s); admitting", type(exc).__name__)
            if not isinstance(exc, BreakerOpen):
                self._forget(request)  # sent: it may have reserved, and nobody settles it
            request.unmetered = True
            return
        except asyncio.CancelledError:
            self._forget(request)  # the caller left while it was sent
            raise
        request.reserved_tokens = request.needed_tokens

    async def within_budget(self, request: Request, used_tokens: int) -> bool:
        """Charges an unreserved stream for what it used so far; False once the budget is out.

        Only a stream admitted while Redis was unreachable gets here (every
        other stream reserved prompt + max_tokens up front and cannot run out).
        What the chunks leave uncharged is charged when it is recorded (`settle`).

        Args:
            request: the request.
            used_tokens: its prompt tokens plus the completion tokens it sent so far.
        """
        if not request.unmetered:
            return True
        due = used_tokens - request.charged_tokens
        # One charge at a time: a coalesced leader's stream and its own reads both
        # check it, and two calls under one chunk id charged once for both.
        if due < CHARGE_EVERY_TOKENS or request.charging is not None:
            return True
        chunk_id, now = _chunk_id(request), time.time()
        request.chunks_sent += 1  # its id is taken: the charge at record uses the next
        request.charging = (chunk_id, now)
        try:
            await self.budgets.reserve(
                request.key_id,
                request.limits,
                chunk_id,
                due,
                now,
                replay_ttl_s=request.replay_ttl_s,  # a job item's: until its deadline
            )
        except ResourceExhausted:
            return False
        except BreakerOpen:
            return True  # not sent: its tokens stay due, for the next chunk
        except asyncio.CancelledError:
            # The caller left while it was sent: it may have been charged, and its
            # tokens are charged at record. Taken back, so that they count once.
            self._forget_chunk(request.key_id, chunk_id, now)
            raise
        except BUDGETS_UNAVAILABLE:
            # Sent, and it may have been charged (a stall timed the call out) or not (a
            # lost connection). Its tokens stay due, for the next chunk or the charge at
            # record, under ids of their own (the next chunk under this id would be
            # taken for its replay, and charge nothing); this one is taken back in the
            # background, so that it counts once either way.
            self._forget_chunk(request.key_id, chunk_id, now)
            return True  # still unreachable: still open
        finally:
            request.charging = None
        request.charged_tokens += due
        return True

    def record(
        self, request: Request, event: inference_pb2.UsageEvent, computed: bool | None = None
    ) -> None:
        """Counts a finished request, appends its usage event and reconciles its reservation
        (held instead while its `held_events` is a list).

        computed: whether the version computed any of its answer (None: unless the event
        says it was served: an embed served partly from the cache computed the rest).
        """
        if request.held_events is not None:
            request.held_events.append(event)
            return
        unfinished = request.cut or (
            request.job_attempt and event.finish_reason in UNFINISHED_ATTEMPT
        )
        if unfinished:
            set_attempt_apart(event)
        if request.copy_of is None:
            # A shadow copy is no live traffic of its version: counted in, it made a
            # canary that is also the shadow pass (or fail) its rollout gates on copies,
            # and its request rate and p99 duration (a copy waits behind every live
            # request) on the dashboards (tokenmesh_shadow_records_total counts copies).
            labels = (request.model.name, request.model.version)
            metrics.REQUESTS.labels(*labels, event.finish_reason).inc()
            metrics.REQUEST_LATENCY.labels(*labels).observe(time.monotonic() - request.started)
            outcomes = request.model.outcomes
            if computed is None:
                computed = not event.cached
            if computed:
                # An answer served from the cache or another request's computation is no
                # computation of the version: counted in, each hit's 1-3 ms TTFT made a
                # canary read faster, and each success counted per caller while a shared
                # failure counted once (its error rate diluted by its callers).
                outcomes.observe(
                    event.finish_reason,
                    event.timing.time_to_first_token_ms,
                    batch=request.batch_priority,
                )
            # The prompt's length as served: a cache hit's billed usage may be 0.
            served = event.served_usage if event.HasField("served_usage") else event.usage
            outcomes.prefixes.observe(
                request.prefix, served.prompt_tokens, scope=_cache_scope(request)
            )
        used = event.usage.prompt_tokens + event.usage.completion_tokens
        try:
            self.usage_log.append(event)
        finally:
            # Settled when the spool refuses the event too (a full disk): left, its
            # reservation (prompt + max_tokens) stayed charged to the key's month under
            # a live holder, which no reaper takes back while this worker lives.
            self.settle(request, used, finished=not unfinished)
        if request.shadow is not None and self.shadow_records is not None:
            self.shadow_records.observe(request, request.shadow, event)

    def settle(self, request: Request, used: int, finished: bool = True) -> None:
        """Reconciles a request's reservation with the tokens it used (in the background;
        once: its reservation is then spent). An unmetered request has none: it is
        charged what its chunks did not charge (`_charge_rest`), and nothing more: a
        coalesced computation it led runs on for its waiters, and went on charging it
        for tokens only they received."""
        if request.unmetered:
            self._charge_rest(request, used)
            request.unmetered = False
        if request.reserved_tokens:
            # Given back ("unfinished"), whoever the caller: the id then holds nothing,
            # and a retry under it (a job item's, Envoy's of a plaintext request id)
            # reserves anew, checked against the limits.
            run: Run = "finished" if request.job_attempt else ""
            if not finished:
                run = "unfinished"
            # Idempotent (the id's charge becomes `used`): tried again after a blip,
            # which left the whole reservation charged for the month.
            reconcile = functools.partial(
                self.budgets.reconcile,
                request.key_id,
                request.usage_id,
                request.reserved_tokens,
                used,
                request.reserved_at,
                run,
                request.reservation_attempt,
            )
            self._in_background(reconcile, "reconcile a token reservation")
            request.reserved_tokens = 0

    def _charge_rest(self, request: Request, used: int) -> None:
        """Charges an unmetered request, in the background, the tokens it used beyond
        the chunks `within_budget` charged. Those are charged at least
        CHARGE_EVERY_TOKENS at a time, checked before each delta: the rest (under 16
        tokens, plus the last delta, which no check sees, or a chunk the budget
        refused) was never charged, however the request ended.

        Charged whatever the budget holds (no limits: the tokens were sent), under an
        id of its own: tried again, it is charged once. Once recorded, a request is
        charged nothing more (`settle` clears `unmetered`).
        """
        if request.charging is not None:
            # A chunk's call is still in flight (a coalesced leader recorded while its
            # computation charges it): its tokens are charged here, and it is taken
            # back (a refund if it lands first; nothing if it lands after).
            self._forget_chunk(request.key_id, *request.charging)
        due = used - request.charged_tokens
        if due <= 0:
            return
        self._charge_chunk(
            request.key_id, _chunk_id(request), due, time.time(), request.replay_ttl_s
        )
        request.chunks_sent += 1
        request.charged_tokens = used

    def _charge_chunk(
        self, key_id: str, chunk_id: str, amount: int, now: float, replay_ttl_s: int | None
    ) -> None:
        """Charges an unmetered request's chunk in the background, whatever the budget
        holds (no limits: its tokens were sent); tried again, it is charged once (a job
        item's chunk id is remembered until its job's deadline: `replay_ttl_s`)."""
        charge = functools.partial(
            self.budgets.reserve,
            key_id,
            Limits(),
            chunk_id,
            amount,
            now,
            replay_ttl_s=replay_ttl_s,
        )
        self._in_background(charge, "charge an unmetered request's tokens")

    def _forget_chunk(self, key_id: str, chunk_id: str, now: float) -> None:
        """Takes back, in the background, a chunk whose answer never came (a refund if it
        was charged; one reaching Redis later charges nothing). Should Redis stay away
        longer than the retries, a chunk that had landed stays charged as well as its
        tokens' next charge: over, never under, the budget."""
        forget = functools.partial(self.budgets.forget, key_id, chunk_id, now)
        self._in_background(forget, "take back an unmetered request's unanswered chunk")

    def note_cancelled(self, request: Request) -> None:
        """Marks `request` cut (`Request.cut`) if the worker's shutdown cancelled it.

        Only for a request whose answer's headers are still held (Complete, Embed,
        an OpenAI call without `stream`: services.core.interceptors' HeadersAtEnd,
        the OpenAI servicer's _ResponseContext; an OpenAI stream before its first
        chunk): once the grace is over, grpc ends it trailers-only UNAVAILABLE,
        which the edge's retry policy tries again on another worker, and that try
        is billed. Recorded, it was billed twice, budgets charged twice. A stream
        that sent its headers is not tried again: it is billed what it sent.
        """
        if self.cut_by_shutdown():
            self.note_retried(request)

    def note_retried(self, request: Request) -> None:
        """Marks `request` as one its caller (or the edge) tries again on another worker,
        its answer unsent: recorded apart, billed nothing (`Request.cut`). A shadow
        copy is not tried again: it stays metered to the shadow account."""
        if request.copy_of is None:
            request.cut = True

    def release(self, request: Request) -> None:
        """Gives a request's whole reservation back (it was refused before it ran)."""
        self.settle(request, 0, finished=False)

    def _forget(self, request: Request) -> None:
        """Takes back, in the background, a reservation whose answer never came: an
        unmetered request (the stream is charged as it goes) or a cancelled one would
        leave it charged for the month (prompt + max_tokens each)."""
        forget = functools.partial(
            self.budgets.forget,
            request.key_id,
            request.usage_id,
            request.reserved_at,
            request.reservation_attempt,
        )
        self._in_background(forget, "take back an unanswered token reservation")

    async def settled(self, timeout_s: float) -> bool:
        """Waits, at most `timeout_s`, for the budgets' calls running in the background
        (reconciles and take-backs of the last requests); returns whether they ended.

        The worker's stop awaits them before it closes Redis: a call cut by the stop
        records itself (its reservation given back) as its handler unwinds, and closed
        under it, the reconcile failed and left the reservation charged.
        """
        pending = set(self._background)
        if not pending:
            return True
        _, left = await asyncio.wait(pending, timeout=timeout_s)
        if left:
            logger.warning("%d budget calls still running at stop; left as they are", len(left))
        return not left

    def _in_background(self, call: Callable[[], Awaitable[object]], what: str) -> None:
        """Runs a budgets call in the background, tried again while Redis is away."""
        task = asyncio.create_task(self._with_retries(call, what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _with_retries(call: Callable[[], Awaitable[object]], what: str) -> None:
        attempt = 0
        while True:
            try:
                await call()
                if attempt >= STORE_ATTEMPTS:
                    logger.info("could %s once Redis was back", what)
                return
            except BUDGETS_UNAVAILABLE as exc:
                if attempt == STORE_ATTEMPTS - 1:
                    logger.warning(
                        "could not %s (%s); trying again every %.0f s",
                        what,
                        type(exc).__name__,
                        STORE_RETRY_EVERY_S,
                    )
                last = attempt >= STORE_ATTEMPTS - 1
                await asyncio.sleep(STORE_RETRY_EVERY_S if last else STORE_BACKOFF_S * 2**attempt)
                attempt += 1
