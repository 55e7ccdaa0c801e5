"""InferenceService servicer: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from services.core.errors import FieldViolation, InvalidArgument, TokenmeshError
from services.core.interceptors import Context, abort_with, to_domain_error
from services.inference import validation
from services.inference.generation import GenerationState, generate
from services.inference.models import LoadedModel, ModelRegistry
from tokenmesh.inference.v1 import inference_pb2, inference_service_pb2_grpc
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.type.v1 import types_pb2

logger = logging.getLogger(__name__)
GENERATE_METHOD = "/tokenmesh.inference.v1.InferenceService/Generate"


def _usage(state: GenerationState) -> types_pb2.TokenUsage:
    return types_pb2.TokenUsage(
        prompt_tokens=state.prompt_tokens,
        completion_tokens=state.completion_tokens,
        total_tokens=state.prompt_tokens + state.completion_tokens,
    )


def _timing(state: GenerationState) -> inference_pb2.Timing:
    timings = state.timings
    return inference_pb2.Timing(
        queue_ms=timings.queue_ms,
        time_to_first_token_ms=timings.time_to_first_token_ms,
        total_ms=timings.since_admission_ms(),
    )


def _stream_error(error: TokenmeshError) -> inference_pb2.StreamError:
    return inference_pb2.StreamError(
        code=error.code.name, message=error.message, reason=error.reason
    )


class Admitted:
    """Admitted is a validated generation request, resolved to a model version."""

    def __init__(self, registry: ModelRegistry, request: validation.GenerationRequest) -> None:
        validation.validate_generation(request)
        self.model: LoadedModel = registry.resolve(request.model, request.version)
        if self.model.kind != inference_pb2.MODEL_KIND_GENERATIVE:
            raise InvalidArgument(
                [FieldViolation("model", f"{request.model!r} is not a generative model")],
                reason="MODEL_KIND_MISMATCH",
            )
        self.prompt_ids = self.model.tokenizer.encode(request.prompt)
        self.params = validation.sampling_params(request, self.model.defaults)
        validation.check_context(
            len(self.prompt_ids), self.params.max_tokens, self.model.context_length
        )
        self.request_id = request.request_id or uuid.uuid4().hex
        self.state = GenerationState(prompt_tokens=len(self.prompt_ids))

    def model_ref(self) -> types_pb2.ModelRef:
        """Returns the serving model version as a protobuf message."""
        return types_pb2.ModelRef(name=self.model.name, version=self.model.version)

    async def send_headers(self, context: Context) -> None:
        """Sends the request id and serving version as response headers."""
        await context.send_initial_metadata(
            (("x-request-id", self.request_id), ("x-model-version", self.model.version))
        )


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """InferenceServicer serves InferenceService from a ModelRegistry."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        page_size = validation.validate_page_size(request.page_size)
        names = [n for n in self.registry.names() if n > request.page_token]
        page, rest = names[:page_size], names[page_size:]
        return pb.ListModelsResponse(
            models=[self.registry.to_pb(n) for n in page],
            next_page_token=page[-1] if rest else "",
        )

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        validation.validate_model_name(request.model)
        return pb.GetModelResponse(model=self.registry.to_pb(request.model))

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        admitted = Admitted(self.registry, request)
        await admitted.send_headers(context)
        index = 0
        try:
            async for delta in generate(
                admitted.model, admitted.prompt_ids, admitted.params, admitted.state
            ):
                message = pb.GenerateResponse(
                    index=index,
                    text=delta.text,
                    token_ids=delta.token_ids,
                    request_id=admitted.request_id,
                )
                if delta.finish_reason:
                    self._finish(message, admitted, delta.finish_reason)
                yield message
                index += 1
        except asyncio.CancelledError:
            logger.info(
                "request %s cancelled after %d tokens",
                admitted.request_id,
                admitted.state.completion_tokens,
            )
            raise
        except Exception as exc:
            if index == 0:
                raise  # nothing streamed yet: a plain status says it all
            error = to_domain_error(exc, GENERATE_METHOD)
            final = pb.GenerateResponse(
                index=index, request_id=admitted.request_id, error=_stream_error(error)
            )
            self._finish(final, admitted, "error")
            yield final
            await abort_with(context, error)

    @staticmethod
    def _finish(message: pb.GenerateResponse, admitted: Admitted, finish_reason: str) -> None:
        message.finish_reason = finish_reason
        message.usage.CopyFrom(_usage(admitted.state))
        message.model.CopyFrom(admitted.model_ref())
        message.timing.CopyFrom(_timing(admitted.state))

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        admitted = Admitted(self.registry, request)
        await admitted.send_headers(context)
        texts: list[str] = []
        token_ids: list[int] = []
        finish_reason = ""
        async for delta in generate(
            admitted.model, admitted.prompt_ids, admitted.params, admitted.state
        ):
            texts.append(delta.text)
            token_ids.extend(delta.token_ids)
            finish_reason = delta.finish_reason
        return pb.CompleteResponse(
            text="".join(texts),
            token_ids=token_ids,
            finish_reason=finish_reason,
            usage=_usage(admitted.state),
            model=admitted.model_ref(),
            timing=_timing(admitted.state),
            request_id=admitted.request_id,
        )

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        validation.validate_embed(request)
        model = self.registry.resolve(request.model, request.version)
        if model.kind != inference_pb2.MODEL_KIND_EMBEDDING:
            raise InvalidArgument(
                [FieldViolation("model", f"{request.model!r} is not an embedding model")],
                reason="MODEL_KIND_MISMATCH",
            )
        # No embedding engine ships before the inference issue lands.
        raise NotImplementedError
