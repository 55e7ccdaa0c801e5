"""tokenmesh.inference.v2.InferenceService: protobuf at the edge, the shared machinery inside.

Routing, caller checks, token budgets and usage events are those of v1
(services.inference.admission); generation runs n choices of one prompt
(services.inference.v2.choices) on the same schedulers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
from google.rpc import status_pb2

from services.core.errors import TokenmeshError
from services.core.interceptors import Context, abort_with, request_headers, to_domain_error
from services.inference import genai_spans, quality
from services.inference import validation as v1_validation
from services.inference.admission import (
    Admission,
    Request,
    check_model_allowed,
    token_usage,
    visible_models,
)
from services.inference.logprobs import TokenLogprob
from services.inference.models import ModelRegistry
from services.inference.surface import ApiSurface
from services.inference.template_cache import TemplateCache
from services.inference.tokenizer import Tokenizer
from services.inference.v2 import prompting, validation
from services.inference.v2.choices import Choice, ChoiceTiming, Generation
from services.inference.v2.validation import GenerationSpec
from tokenmesh.inference.v1 import inference_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v2 import inference_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
GENERATE_RPC = f"/{SERVICE_NAME}/Generate"
COMPLETE_RPC = f"/{SERVICE_NAME}/Complete"
EMBED_RPC = f"/{SERVICE_NAME}/Embed"
V2_SURFACE = ApiSurface(api_version="v2", service=SERVICE_NAME)
FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "error": inference_pb2.FINISH_REASON_ERROR,
    "quota": inference_pb2.FINISH_REASON_QUOTA,
    "content_filter": inference_pb2.FINISH_REASON_CONTENT_FILTER,
}


def usage_pb(generation: Generation, completion_tokens: int) -> inference_pb2.Usage:
    """Returns a v2 Usage: the prompt once, `completion_tokens`, and what the cache served."""
    return inference_pb2.Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=generation.prompt_tokens + completion_tokens,
        cached_prompt_tokens=generation.cached_prompt_tokens,
    )


def timing_pb(timing: ChoiceTiming) -> inference_pb2.Timing:
    """Returns a choice's timing as a protobuf message."""
    return inference_pb2.Timing(
        queue_ms=timing.queue_ms,
        prefill_ms=timing.prefill_ms,
        time_to_first_token_ms=timing.time_to_first_token_ms,
        decode_ms=timing.decode_ms,
        total_ms=timing.total_ms,
        output_tokens_per_second=timing.output_tokens_per_second,
    )


def logprobs_pb(
    items: Sequence[TokenLogprob], tokenizer: Tokenizer
) -> list[inference_pb2.TokenLogprob]:
    """Returns tokens' log-probabilities with their text (one token decoded alone)."""
    return [
        inference_pb2.TokenLogprob(
            token=tokenizer.decode([item.token_id]),
            token_id=item.token_id,
            logprob=item.logprob,
            top_logprobs=[
                inference_pb2.TopLogprob(
                    token=tokenizer.decode([token_id]), token_id=token_id, logprob=logprob
                )
                for token_id, logprob in item.top
            ],
        )
        for item in items
    ]


def status_pb(error: TokenmeshError) -> status_pb2.Status:
    """Returns the google.rpc.Status the error boundary would send for `error`."""
    return error.to_status()


def model_pb(registry: ModelRegistry, name: str) -> inference_pb2.Model:
    """Returns a model with its versions in the v2 shape (the v1 shape, renamed fields)."""
    v1 = registry.to_pb(name)
    chat_templates = {
        m.version: prompting.template_ref(m.chat_template_id)
        for m in registry.versions(name)
        if m.scheduler is not None
    }
    return inference_pb2.Model(
        name=v1.name,
        kind=int(v1.kind),  # type: ignore[arg-type]  # same numbers in both versions
        default_version=v1.default_version,
        description=v1.description,
        versions=[
            inference_pb2.ModelVersion(
                version=v.version,
                state=int(v.state),  # type: ignore[arg-type]
                engine=v.engine,
                context_length=v.context_length,
                max_output_tokens_default=v.max_tokens_default,
                embedding_dimensions=v.embedding_dimensions,
                message=v.message,
                chat_template=chat_templates.get(v.version),
            )
            for v in v1.versions
        ],
    )


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """InferenceServicer serves tokenmesh.inference.v2.InferenceService.

    Args:
        admission: routing, budgets and usage, shared with the v1 servicer.
        templates: the worker's prompt-template cache (None: requests naming a
            template fail with FAILED_PRECONDITION).
        surface: the API version it serves: v2, or v1 for the v1 servicer, which
            translates onto it (services.inference.v1_translation).
    """

    def __init__(
        self,
        admission: Admission,
        templates: TemplateCache | None = None,
        surface: ApiSurface = V2_SURFACE,
    ) -> None:
        self.admission = admission
        self.registry = admission.registry
        self.templates = templates
        self.surface = surface

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        page_size = v1_validation.validate_page_size(request.page_size)
        page, next_token = visible_models(self.registry, context, request.page_token, page_size)
        return pb.ListModelsResponse(
            models=[model_pb(self.registry, n) for n in page], next_page_token=next_token
        )

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        v1_validation.validate_model_name(request.model)
        check_model_allowed(request_headers(context), request.model)
        return pb.GetModelResponse(model=model_pb(self.registry, request.model))

    async def _admit(
        self, context: Context, request: pb.GenerateRequest | pb.CompleteRequest, rpc: str
    ) -> Generation:
        spec = GenerationSpec.from_pb(request)
        target = self.admission.resolve(context, spec.model, spec.version, generative=True)
        # Content policy on input: the model sees the redacted texts (or nothing: a block).
        api_version = self.surface.api_version
        spec, content = await self.admission.content.admit(context, target, spec, rpc, api_version)
        prompt = await prompting.prepare(spec, target.model, self.templates)
        generation = Generation(
            context,
            target,
            spec,
            prompt.token_ids,
            rpc,
            prompt.template,
            api_version=self.surface.api_version,
            token_logprobs=self.surface.token_logprobs,
        )
        generation.content = content
        await self.admission.reserve(generation)
        generation.submit(context.time_remaining())
        return generation

    def _record(self, generation: Generation) -> None:
        timings = [c.timing() for c in generation.choices]
        timing = v1_pb.Timing(
            queue_ms=min((t.queue_ms for t in timings), default=0.0),
            time_to_first_token_ms=min(
                (t.time_to_first_token_ms for t in timings if t.time_to_first_token_ms),
                default=0.0,
            ),
            total_ms=(time.monotonic() - generation.started) * 1000,
        )
        usage = token_usage(generation.prompt_tokens, generation.sent_tokens)
        event = generation.usage_event(usage, generation.finish_reason(), timing)
        event.cached_prompt_tokens = generation.cached_prompt_tokens  # priced apart in reports
        template = prompting.template_ref(generation.template)
        if template is not None:
            event.template.CopyFrom(template)
        generation.content.record(event, generation.content.outputs(len(generation.choices)))
        self.admission.record(generation, event)
        quality.observe_generation(generation)
        genai_spans.annotate_generation(generation)

    def _final(
        self,
        message: pb.GenerateResponse,
        generation: Generation,
        choice: Choice,
        reason: str,
        completion_tokens: int,
    ) -> pb.GenerateResponse:
        """Makes `message` the choice's final message: outcome, cumulative usage, timing."""
        choice.finish_reason = reason
        message.finish_reason = FINISH_REASONS[reason]
        message.finish_message = generation.content.finish_message(choice.index)
        message.usage.CopyFrom(usage_pb(generation, completion_tokens))
        message.timing.CopyFrom(timing_pb(choice.timing()))
        message.model.CopyFrom(generation.model_ref())
        template = prompting.template_ref(generation.template)
        if template is not None:
            message.template.CopyFrom(template)
        if choice.confidence.logprobs:
            message.confidence = choice.confidence.score
            message.mean_logprob = choice.confidence.mean_logprob
        return message

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        generation = await self._admit(context, request, self.surface.rpc("Generate"))
        deltas = generation.deltas()
        streamed = False
        try:
            await generation.send_headers(context)
            async for choice, delta in deltas:
                used = generation.prompt_tokens + generation.sent_tokens
                if not await self.admission.within_budget(generation, used):
                    await deltas.aclose()  # frees every sequence's slot
                    for final in self._finals(generation, "quota"):
                        yield final
                    return
                message = self._delta(generation, choice, delta.text, delta.token_ids)
                count = len(delta.token_ids)
                if delta.finish_reason:
                    total = generation.sent_tokens + count
                    self._final(message, generation, choice, delta.finish_reason, total)
                yield message
                streamed = True
                generation.sent_tokens += count
        except asyncio.CancelledError:
            generation.end_running("cancelled")
            raise
        except Exception as exc:
            if not streamed:
                generation.end_running("error")
                raise  # nothing streamed yet: a plain status says it all
            error = to_domain_error(exc, "Generate")
            for final in self._finals(generation, "error", error):
                yield final
            await abort_with(context, error)
        finally:
            await deltas.aclose()
            self._record(generation)

    def _finals(
        self, generation: Generation, reason: str, error: TokenmeshError | None = None
    ) -> list[pb.GenerateResponse]:
        """Returns a final message for every running choice (they end with `reason`)."""
        return [
            self._final(
                pb.GenerateResponse(
                    choice_index=running.index,
                    request_id=generation.request_id,
                    error=None if error is None else status_pb(error),
                ),
                generation,
                running,
                reason,
                generation.sent_tokens,
            )
            for running in generation.running()
        ]

    def _delta(
        self, generation: Generation, choice: Choice, text: str, token_ids: list[int]
    ) -> pb.GenerateResponse:
        message = pb.GenerateResponse(
            choice_index=choice.index,
            text=text,
            token_ids=token_ids,
            request_id=generation.request_id,
        )
        items = choice.take_logprobs(len(token_ids))
        if generation.spec.logprobs:
            message.logprobs.extend(logprobs_pb(items, generation.tokenizer))
        return message

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        generation = await self._admit(context, request, self.surface.rpc("Complete"))
        outputs = {c.index: pb_choice(c.index) for c in generation.choices}
        deltas = generation.deltas()
        try:
            await generation.send_headers(context)
            async for choice, delta in deltas:
                used = generation.prompt_tokens + generation.sent_tokens
                if not await self.admission.within_budget(generation, used):
                    generation.end_running("quota")
                    break
                self._collect(outputs[choice.index], generation, choice, delta.token_ids)
                outputs[choice.index].text += delta.text
                generation.sent_tokens += len(delta.token_ids)
                if delta.finish_reason:
                    choice.finish_reason = delta.finish_reason
        except asyncio.CancelledError:
            generation.end_running("cancelled")
            raise
        except Exception:
            generation.end_running("error")
            raise
        finally:
            await deltas.aclose()
            self._record(generation)
        for choice in generation.choices:
            _finish_choice(outputs[choice.index], choice)
            outputs[choice.index].finish_message = generation.content.finish_message(choice.index)
        return pb.CompleteResponse(
            choices=[outputs[i] for i in sorted(outputs)],
            usage=usage_pb(generation, generation.sent_tokens),
            model=generation.model_ref(),
            template=prompting.template_ref(generation.template),
            request_id=generation.request_id,
        )

    @staticmethod
    def _collect(
        output: inference_pb2.Choice, generation: Generation, choice: Choice, token_ids: list[int]
    ) -> None:
        output.token_ids.extend(token_ids)
        items = choice.take_logprobs(len(token_ids))
        if generation.spec.logprobs:
            output.logprobs.extend(logprobs_pb(items, generation.tokenizer))

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        validation.validate_embed(request)
        target = self.admission.resolve(context, request.model, request.version, generative=False)
        embedder = target.model.embedder
        assert embedder is not None  # resolve() checked the kind
        rpc, api_version = self.surface.rpc("Embed"), self.surface.api_version
        call = Request(context, target, request.request_id, rpc, api_version, request.metadata)
        inputs, content = await self.admission.content.check_texts(
            context, target, request.inputs, field_name="inputs",
            request_id=call.request_id, rpc=rpc, api_version=api_version,
        )  # fmt: skip
        truncate = request.truncate == inference_pb2.TRUNCATION_END
        if truncate:
            encoded, cut = await asyncio.to_thread(embedder.tokenize_truncated, inputs)
        else:
            encoded = await asyncio.to_thread(embedder.tokenize, inputs)
            cut = [False] * len(encoded)
        prompt_tokens = sum(len(ids) for ids in encoded)
        finish_reason = "error"
        try:
            await call.send_headers(context)
            vectors = await embedder.embed(encoded)
            finish_reason = "stop"
            quality.observe_embeddings(target.model, vectors)
            genai_spans.annotate_embedding(call, request.model, prompt_tokens)
        finally:
            timing = v1_pb.Timing(total_ms=(time.monotonic() - call.started) * 1000)
            usage = token_usage(prompt_tokens, 0)
            event = call.usage_event(usage, finish_reason, timing)
            content.record(event)
            self.admission.usage_log.append(event)
        base64_encoded = request.encoding == inference_pb2.EMBEDDING_ENCODING_BASE64
        return pb.EmbedResponse(
            embeddings=[
                embedding_pb(i, vector, len(encoded[i]), cut[i], base64_encoded)
                for i, vector in enumerate(vectors)
            ],
            model=call.model_ref(),
            usage=inference_pb2.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
            request_id=call.request_id,
        )


def pb_choice(index: int) -> inference_pb2.Choice:
    """Returns an empty Choice for index `index`."""
    return inference_pb2.Choice(index=index)


def _finish_choice(output: inference_pb2.Choice, choice: Choice) -> None:
    output.finish_reason = FINISH_REASONS[choice.finish_reason or "cancelled"]
    output.timing.CopyFrom(timing_pb(choice.timing()))
    if choice.confidence.logprobs:
        output.confidence = choice.confidence.score
        output.mean_logprob = choice.confidence.mean_logprob


def embedding_pb(
    index: int, vector: np.ndarray, tokens: int, truncated: bool, as_bytes: bool
) -> inference_pb2.Embedding:
    """Returns one embedding: float values, or little-endian float32 bytes."""
    embedding = inference_pb2.Embedding(index=index, prompt_tokens=tokens, truncated=truncated)
    if as_bytes:
        embedding.base64 = np.asarray(vector, dtype="<f4").tobytes()
    else:
        embedding.values.extend(vector.tolist())
    return embedding
