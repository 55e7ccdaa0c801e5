"""tokenmesh.inference.v2.InferenceService: a transport adapter over the request pipeline.

Generate and Complete run through services.inference.pipeline.generate
(validate -> content policy -> cache / coalesce -> budget -> schedule ->
stream -> record); Embed through services.inference.pipeline.embed. This
module turns their results into RPC answers: messages out, a late stream
error as the RPC's status. The v1 servicer and the OpenAI surface call it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.rpc import status_pb2

from services.core.errors import TokenmeshError
from services.core.interceptors import Context, abort_with, request_headers
from services.core.model_access import check_model_allowed
from services.inference import validation as v1_validation
from services.inference.admission import Admission, visible_models
from services.inference.pipeline.embed import EmbeddingPipeline
from services.inference.pipeline.embed import embedding_pb as embedding_pb
from services.inference.pipeline.generate import GenerationPipeline
from services.inference.pipeline.stream import FINISH_REASONS as FINISH_REASONS
from services.inference.pipeline.stream import StreamAborted
from services.inference.pipeline.stream import logprobs_pb as logprobs_pb
from services.inference.pipeline.stream import timing_pb as timing_pb
from services.inference.pipeline.stream import usage_pb as usage_pb
from services.inference.surface import ApiSurface
from services.inference.template_cache import TemplateCache
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
GENERATE_RPC = f"/{SERVICE_NAME}/Generate"
COMPLETE_RPC = f"/{SERVICE_NAME}/Complete"
EMBED_RPC = f"/{SERVICE_NAME}/Embed"
V2_SURFACE = ApiSurface(api_version="v2", service=SERVICE_NAME)


def status_pb(error: TokenmeshError) -> status_pb2.Status:
    """Returns the google.rpc.Status the error boundary would send for `error`."""
    return error.to_status()


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
        self.pipeline = GenerationPipeline(admission, templates, surface)
        self.embeddings = EmbeddingPipeline(admission, surface)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        page_size = v1_validation.validate_page_size(request.page_size)
        models = self.admission.mesh_models
        page, next_token = visible_models(models, context, request.page_token, page_size)
        return pb.ListModelsResponse(
            models=[models.describe(n) for n in page], next_page_token=next_token
        )

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        v1_validation.validate_model_name(request.model)
        check_model_allowed(request_headers(context), request.model)
        return pb.GetModelResponse(model=self.admission.mesh_models.describe(request.model))

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for message in self.pipeline.generate(context, request):
                yield message
        except StreamAborted as aborted:  # its final messages, with the error, were sent
            await abort_with(context, aborted.error)

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        return await self.pipeline.complete(context, request)

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        return await self.embeddings.embed(context, request)
