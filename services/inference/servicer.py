"""InferenceService and InferenceAdminService servicers: protobuf at the edge,
domain objects inside."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from opentelemetry import trace
from redis.exceptions import RedisError

from gateway import model_routing
from services.core import contract
from services.core.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TokenmeshError,
    Unavailable,
)
from services.core.interceptors import Context, abort_with, request_headers, to_domain_error
from services.inference import metrics, validation
from services.inference.budget import Limits, TokenBudgets
from services.inference.generation import Delta, GenerationState, stream_deltas
from services.inference.models import LoadedModel, ModelRegistry
from services.inference.scheduler import PRIORITY_BATCH, PRIORITY_INTERACTIVE, Scheduler, Sequence_
from services.inference.usage_log import UsageLog
from tokenmesh.inference.v1 import inference_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.type.v1 import types_pb2

logger = logging.getLogger(__name__)
KEY_ID_HEADER = contract.KEY_ID_HEADER
TENANT_HEADER = contract.TENANT_HEADER
MODELS_HEADER = contract.MODELS_HEADER
FALLBACK_FROM_HEADER = "x-tokenmesh-fallback-from"  # the model a fallback answer stands in for
CHARGE_EVERY_TOKENS = 16  # an unreserved stream is charged in chunks of at least this
# Prompts up to this many characters are tokenized on the event loop (~40 µs
# here, less than a hop to a thread and back); longer ones in a thread.
INLINE_TOKENIZE_CHARS = 256
_PRIORITIES = {
    inference_pb2.PRIORITY_UNSPECIFIED: PRIORITY_INTERACTIVE,
    inference_pb2.PRIORITY_INTERACTIVE: PRIORITY_INTERACTIVE,
    inference_pb2.PRIORITY_BATCH: PRIORITY_BATCH,
}


def _usage(prompt_tokens: int, completion_tokens: int) -> types_pb2.TokenUsage:
    return types_pb2.TokenUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _stream_error(error: TokenmeshError) -> inference_pb2.StreamError:
    return inference_pb2.StreamError(
        code=error.code.name, message=error.message, reason=error.reason
    )


def allowed_models(headers: Mapping[str, str]) -> frozenset[str] | None:
    """Returns the models the caller may use (None: any), as the edge vouched."""
    value = headers.get(MODELS_HEADER, "").strip()
    return frozenset(m for m in value.split(",") if m) or None


def check_model_allowed(headers: Mapping[str, str], model: str) -> None:
    """Raises PERMISSION_DENIED when the caller's key does not cover `model`."""
    allowed = allowed_models(headers)
    if allowed is not None and model not in allowed:
        raise PermissionDenied(
            f"this key may not use model {model!r}",
            reason="MODEL_NOT_ALLOWED",
            metadata={"model": model},
        )


def _int(value: object) -> int:
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


def _trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


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
    routed_version = headers.get(model_routing.ROUTE_VERSION_HEADER, "")
    if routed_model:
        if registry.has(routed_model, routed_version):
            return Target(registry.resolve(routed_model, routed_version))
        fallback = headers.get(model_routing.FALLBACK_MODEL_HEADER, "")
        fallback_version = headers.get(model_routing.FALLBACK_VERSION_HEADER, "")
        if fallback and registry.has(fallback, fallback_version):
            return Target(registry.resolve(fallback, fallback_version), fallback_from=name)
        # The edge's endpoints were stale (the version was just unloaded here):
        # UNAVAILABLE makes Envoy retry on another worker before any byte is sent.
        raise Unavailable(
            f"this worker no longer serves {routed_model!r} version {routed_version!r}",
            retry_after_s=0.1,
            reason="VERSION_NOT_ON_WORKER",
        )
    # Direct calls (no edge), or a version the catalogue does not route.
    return Target(registry.resolve(name, version or headers.get(model_routing.VERSION_HEADER, "")))


class Request:
    """Request is one validated RPC with its caller, model and usage bookkeeping."""

    def __init__(self, context: Context, target: Target, request_id: str, rpc: str) -> None:
        headers = request_headers(context)
        model = target.model
        check_model_allowed(headers, target.fallback_from or model.name)
        self.model = model
        self.fallback_from = target.fallback_from
        self.worker_id = target.worker_id
        self.budget_warning = ""  # budgets at >= 80% after this request's reservation
        self.request_id = request_id or uuid.uuid4().hex
        self.rpc = rpc
        self.key_id = headers.get(KEY_ID_HEADER, "")
        self.tenant = headers.get(TENANT_HEADER, "")
        self.limits = Limits(
            tokens_per_minute=_int(headers.get(contract.TPM_HEADER)),
            monthly_tokens=_int(headers.get(contract.MONTHLY_TOKENS_HEADER)),
        )
        self.trace_id = _trace_id()
        self.started = time.monotonic()

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
            key_id=self.key_id,
            tenant=self.tenant,
            model=self.model_ref(),
            usage=usage,
            finish_reason=finish_reason,
            timing=timing,
            trace_id=self.trace_id,
            rpc=self.rpc,
            finish_unix_ms=int(time.time() * 1000),
        )


class Generation(Request):
    """Generation is an admitted Generate/Complete request, queued in a scheduler."""

    def __init__(
        self,
        context: Context,
        target: Target,
        request: validation.GenerationRequest,
        prompt_ids: list[int],
        rpc: str,
    ) -> None:
        super().__init__(context, target, request.request_id, rpc)
        model = target.model
        assert model.scheduler is not None
        self.scheduler: Scheduler = model.scheduler
        self.prompt_ids = prompt_ids
        self.params = validation.sampling_params(request, model.defaults)
        validation.check_context(len(self.prompt_ids), self.params.max_tokens, model.context_length)
        self.state = GenerationState(prompt_tokens=len(self.prompt_ids))
        self.priority = _PRIORITIES.get(request.priority, PRIORITY_INTERACTIVE)
        self.reserved_tokens = 0  # held in the caller's token budget until completion
        # Admitted while budgets were unreachable: charged as it goes, once they are back.
        self.unmetered = False
        self.charged_tokens = 0

    @property
    def needed_tokens(self) -> int:
        """Returns the most this request can use: prompt + max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    def submit(self, timeout_s: float | None) -> None:
        """Queues the request in its model version's scheduler."""
        self.seq: Sequence_ = self.scheduler.submit(
            self.prompt_ids, self.params, self.priority, timeout_s
        )

    def deltas(self) -> AsyncGenerator[Delta, None]:
        """Streams the generated text."""
        return stream_deltas(
            self.scheduler, self.seq, self.model.tokenizer, self.params.stop, self.state
        )

    def usage(self) -> types_pb2.TokenUsage:
        """Returns the tokens consumed so far."""
        return _usage(self.state.prompt_tokens, self.state.completion_tokens)

    def timing(self) -> inference_pb2.Timing:
        """Returns the request's timing."""
        return inference_pb2.Timing(
            queue_ms=self.state.queue_ms,
            time_to_first_token_ms=self.state.time_to_first_token_ms,
            total_ms=self.state.total_ms(),
        )


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """InferenceServicer serves InferenceService from a ModelRegistry.

    Args:
        registry: the loaded model versions.
        usage_log: where every finished request's usage is recorded.
        budgets: the callers' token budgets (reserved at admission).
        worker_id: this worker's id, sent in the `x-tokenmesh-worker` response header.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        usage_log: UsageLog,
        budgets: TokenBudgets,
        worker_id: str = "",
    ) -> None:
        self.worker_id = worker_id
        self.registry = registry
        self.usage_log = usage_log
        self.budgets = budgets
        self._background: set[asyncio.Task[None]] = set()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        page_size = validation.validate_page_size(request.page_size)
        allowed = allowed_models(request_headers(context))
        names = [
            n
            for n in self.registry.names()
            if n > request.page_token and (allowed is None or n in allowed)
        ]
        page, rest = names[:page_size], names[page_size:]
        return pb.ListModelsResponse(
            models=[self.registry.to_pb(n) for n in page],
            next_page_token=page[-1] if rest else "",
        )

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        validation.validate_model_name(request.model)
        check_model_allowed(request_headers(context), request.model)
        return pb.GetModelResponse(model=self.registry.to_pb(request.model))

    def _resolve(self, context: Context, name: str, version: str, *, generative: bool) -> Target:
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

    async def _admit(
        self, context: Context, request: validation.GenerationRequest, rpc: str
    ) -> Generation:
        validation.validate_generation(request)
        target = self._resolve(context, request.model, request.version, generative=True)
        # Long prompts take milliseconds to tokenize: keep those off the loop. A
        # short one costs less inline than the hop to a thread and back.
        encode = target.model.tokenizer.encode
        if len(request.prompt) <= INLINE_TOKENIZE_CHARS:
            prompt_ids = encode(request.prompt)
        else:
            prompt_ids = await asyncio.to_thread(encode, request.prompt)
        generation = Generation(context, target, request, prompt_ids, rpc)
        await self._reserve(generation)
        generation.submit(context.time_remaining())
        return generation

    async def _reserve(self, generation: Generation) -> None:
        """Reserves prompt + max_tokens in the caller's token budget, before any compute."""
        if not (generation.key_id and generation.limits.any):
            return
        try:
            generation.budget_warning = await self.budgets.reserve(
                generation.key_id,
                generation.limits,
                generation.request_id,
                generation.needed_tokens,
            )
        except RedisError as exc:  # budgets fail open, like request limits
            logger.warning("token budgets unavailable (%s); admitting", type(exc).__name__)
            generation.unmetered = True
            return
        generation.reserved_tokens = generation.needed_tokens

    async def _within_budget(self, generation: Generation, sent_tokens: int) -> bool:
        """Charges an unreserved stream for what it sent so far; False once the budget is out.

        Only a stream admitted while Redis was unreachable gets here (every
        other stream reserved prompt + max_tokens up front and cannot run out).
        """
        if not generation.unmetered:
            return True
        due = generation.state.prompt_tokens + sent_tokens - generation.charged_tokens
        if due < CHARGE_EVERY_TOKENS:
            return True
        try:
            await self.budgets.reserve(
                generation.key_id,
                generation.limits,
                f"{generation.request_id}:{generation.charged_tokens}",
                due,
            )
        except ResourceExhausted:
            return False
        except RedisError:
            return True  # still unreachable: still open
        generation.charged_tokens += due
        return True

    def _record(self, generation: Generation, finish_reason: str) -> None:
        labels = (generation.model.name, generation.model.version)
        metrics.REQUESTS.labels(*labels, finish_reason).inc()
        metrics.REQUEST_LATENCY.labels(*labels).observe(time.monotonic() - generation.started)
        event = generation.usage_event(generation.usage(), finish_reason, generation.timing())
        self.usage_log.append(event)
        if generation.reserved_tokens:
            used = generation.state.prompt_tokens + generation.state.completion_tokens
            task = asyncio.create_task(self._reconcile(generation, used))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _reconcile(self, generation: Generation, used: int) -> None:
        try:
            await self.budgets.reconcile(
                generation.key_id, generation.request_id, generation.reserved_tokens, used
            )
        except RedisError as exc:  # the reservation stands: conservative, never over budget
            logger.warning("token budget reconcile failed (%s)", type(exc).__name__)

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        generation = await self._admit(
            context, request, "/tokenmesh.inference.v1.InferenceService/Generate"
        )
        finish_reason = "cancelled"
        index = 0
        sent_tokens = 0  # in messages gRPC accepted: what a cancelling client got
        deltas = generation.deltas()
        try:
            await generation.send_headers(context)
            async for delta in deltas:
                if not await self._within_budget(generation, sent_tokens):
                    await deltas.aclose()  # frees the sequence's slot
                    finish_reason = "quota"
                    generation.state.completion_tokens = sent_tokens
                    final = pb.GenerateResponse(index=index, request_id=generation.request_id)
                    self._finish(final, generation, finish_reason)
                    yield final
                    return
                message = pb.GenerateResponse(
                    index=index,
                    text=delta.text,
                    token_ids=delta.token_ids,
                    request_id=generation.request_id,
                )
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
                    self._finish(message, generation, finish_reason)
                yield message
                index += 1
                sent_tokens += len(delta.token_ids)
        except asyncio.CancelledError:
            # The client went away: it is metered for the tokens it was sent.
            generation.state.completion_tokens = sent_tokens
            raise
        except Exception as exc:
            finish_reason = "error"
            if index == 0:
                raise  # nothing streamed yet: a plain status says it all
            error = to_domain_error(exc, "Generate")
            final = pb.GenerateResponse(
                index=index, request_id=generation.request_id, error=_stream_error(error)
            )
            self._finish(final, generation, finish_reason)
            yield final
            await abort_with(context, error)
        finally:
            self._record(generation, finish_reason)

    @staticmethod
    def _finish(message: pb.GenerateResponse, generation: Generation, finish_reason: str) -> None:
        message.finish_reason = finish_reason
        message.usage.CopyFrom(generation.usage())
        message.model.CopyFrom(generation.model_ref())
        message.timing.CopyFrom(generation.timing())

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        generation = await self._admit(
            context, request, "/tokenmesh.inference.v1.InferenceService/Complete"
        )
        finish_reason = "cancelled"
        texts: list[str] = []
        token_ids: list[int] = []
        deltas = generation.deltas()
        try:
            await generation.send_headers(context)
            async for delta in deltas:
                if not await self._within_budget(generation, len(token_ids)):
                    await deltas.aclose()
                    finish_reason = "quota"
                    generation.state.completion_tokens = len(token_ids)
                    break
                texts.append(delta.text)
                token_ids.extend(delta.token_ids)
                finish_reason = delta.finish_reason or finish_reason
        except asyncio.CancelledError:
            raise
        except Exception:
            finish_reason = "error"
            raise
        finally:
            self._record(generation, finish_reason)
        return pb.CompleteResponse(
            text="".join(texts),
            token_ids=token_ids,
            finish_reason=finish_reason,
            usage=generation.usage(),
            model=generation.model_ref(),
            timing=generation.timing(),
            request_id=generation.request_id,
        )

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        validation.validate_embed(request)
        target = self._resolve(context, request.model, request.version, generative=False)
        embedder = target.model.embedder
        assert embedder is not None  # _resolve checked the kind
        call = Request(
            context, target, request.request_id, "/tokenmesh.inference.v1.InferenceService/Embed"
        )
        encoded = await asyncio.to_thread(embedder.tokenize, request.inputs)
        usage = _usage(sum(len(ids) for ids in encoded), 0)
        finish_reason = "error"
        try:
            await call.send_headers(context)
            vectors = await embedder.embed(encoded)
            finish_reason = "stop"
        finally:
            timing = inference_pb2.Timing(total_ms=(time.monotonic() - call.started) * 1000)
            self.usage_log.append(call.usage_event(usage, finish_reason, timing))
        return pb.EmbedResponse(
            embeddings=[
                inference_pb2.Embedding(index=i, values=v.tolist()) for i, v in enumerate(vectors)
            ],
            model=call.model_ref(),
            usage=usage,
            request_id=call.request_id,
        )


class InferenceAdminServicer(inference_service_pb2_grpc.InferenceAdminServiceServicer):
    """InferenceAdminServicer loads and unloads model versions at run time.

    Args:
        registry: the loaded versions.
        load: loads (and warms up) a version, updating health.
        unload: drains and frees a version, updating health.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        load: Callable[[str, str], Awaitable[None]],
        unload: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.registry = registry
        self._load = load
        self._unload = unload

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: Context
    ) -> pb.LoadModelResponse:
        validation.validate_model_version(request.model, request.version)
        await self._load(request.model, request.version)
        return pb.LoadModelResponse(model=self.registry.to_pb(request.model))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Context
    ) -> pb.UnloadModelResponse:
        validation.validate_model_version(request.model, request.version)
        await self._unload(request.model, request.version)
        return pb.UnloadModelResponse()

    async def GetWorkerStats(
        self, request: pb.GetWorkerStatsRequest, context: Context
    ) -> pb.GetWorkerStatsResponse:
        totals = {
            "running": 0,
            "waiting": 0,
            "kv_tokens_used": 0,
            "kv_tokens_capacity": 0,
            "cancelled_total": 0,
        }
        for model in self.registry.all():
            if model.scheduler is not None:
                for key, value in model.scheduler.stats().items():
                    if key in totals:
                        totals[key] += value
        return pb.GetWorkerStatsResponse(
            running_sequences=totals["running"],
            queued_requests=totals["waiting"],
            kv_tokens_used=totals["kv_tokens_used"],
            kv_tokens_capacity=totals["kv_tokens_capacity"],
            cancelled_total=totals["cancelled_total"],
        )
