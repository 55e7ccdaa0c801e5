"""InferenceService and InferenceAdminService servicers: protobuf at the edge,
domain objects inside."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from services.core.errors import TokenmeshError
from services.core.interceptors import Context, abort_with, request_headers, to_domain_error
from services.inference import validation
from services.inference.admission import (
    Admission,
    Request,
    Target,
    check_model_allowed,
    route_target,
    token_usage,
    visible_models,
)
from services.inference.budget import TokenBudgets
from services.inference.generation import Delta, GenerationState, stream_deltas
from services.inference.models import ModelRegistry
from services.inference.scheduler import PRIORITY_BATCH, PRIORITY_INTERACTIVE, Scheduler, Sequence_
from services.inference.usage_log import UsageLog
from tokenmesh.inference.v1 import inference_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.type.v1 import types_pb2

__all__ = ["InferenceAdminServicer", "InferenceServicer", "Target", "route_target"]

logger = logging.getLogger(__name__)
# Prompts up to this many characters are tokenized on the event loop (~40 µs
# here, less than a hop to a thread and back); longer ones in a thread.
INLINE_TOKENIZE_CHARS = 256
_PRIORITIES = {
    inference_pb2.PRIORITY_UNSPECIFIED: PRIORITY_INTERACTIVE,
    inference_pb2.PRIORITY_INTERACTIVE: PRIORITY_INTERACTIVE,
    inference_pb2.PRIORITY_BATCH: PRIORITY_BATCH,
}
_usage = token_usage


def _stream_error(error: TokenmeshError) -> inference_pb2.StreamError:
    return inference_pb2.StreamError(
        code=error.code.name, message=error.message, reason=error.reason
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
        # The most this request can use, held in the caller's token budget until completion.
        self.needed_tokens = len(self.prompt_ids) + self.params.max_tokens

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
        self.admission = Admission(registry, usage_log, budgets, worker_id)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        page_size = validation.validate_page_size(request.page_size)
        page, next_token = visible_models(self.registry, context, request.page_token, page_size)
        return pb.ListModelsResponse(
            models=[self.registry.to_pb(n) for n in page], next_page_token=next_token
        )

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        validation.validate_model_name(request.model)
        check_model_allowed(request_headers(context), request.model)
        return pb.GetModelResponse(model=self.registry.to_pb(request.model))

    def _resolve(self, context: Context, name: str, version: str, *, generative: bool) -> Target:
        """Returns the model version to serve; refuses work the usage spool cannot meter."""
        return self.admission.resolve(context, name, version, generative=generative)

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
        await self.admission.reserve(generation)

    async def _within_budget(self, generation: Generation, sent_tokens: int) -> bool:
        """Charges an unreserved stream for what it sent so far; False once the budget is out."""
        used = generation.state.prompt_tokens + sent_tokens
        return await self.admission.within_budget(generation, used)

    def _record(self, generation: Generation, finish_reason: str) -> None:
        event = generation.usage_event(generation.usage(), finish_reason, generation.timing())
        self.admission.record(generation, event)

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
