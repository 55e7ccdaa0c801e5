"""InferenceService (v1) and InferenceAdminService servicers.

v1 is a translation onto v2, the one implementation of inference: each v1
RPC validates its request with v1's rules (v1's field names, messages and
order of violations are part of its contract), translates it
(services.inference.v1_translation), calls the v2 servicer configured for
the v1 surface (usage events say api_version "v1" and name the v1 RPC) and
translates the answer back.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import cast

from services.core.errors import InvalidArgument
from services.core.interceptors import Context
from services.inference import v1_translation as translate
from services.inference import validation
from services.inference.admission import Admission, Target, route_target
from services.inference.budget import TokenBudgets
from services.inference.models import ModelRegistry
from services.inference.usage_log import UsageLog
from services.inference.v2 import servicer as v2
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb

__all__ = ["InferenceAdminServicer", "InferenceServicer", "Target", "route_target"]


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """InferenceServicer serves tokenmesh.inference.v1.InferenceService by translation onto v2.

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
        # No template cache: a v1 request cannot name a prompt template.
        self.v2 = v2.InferenceServicer(self.admission, surface=translate.V1_SURFACE)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        v2_request = translate.list_models_request(request)
        return translate.list_models_response(await self.v2.ListModels(v2_request, context))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        v2_request = translate.get_model_request(request)
        return translate.get_model_response(await self.v2.GetModel(v2_request, context))

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        validation.validate_generation(request)
        # The v2 servicer's Generate is an async generator function.
        stream = cast(
            AsyncGenerator[v2_pb.GenerateResponse, None],
            self.v2.Generate(translate.generate_request(request), context),
        )
        index = 0  # v1 numbers the stream's messages (v2 numbers choices)
        try:
            async for message in stream:
                yield translate.generate_response(message, index)
                index += 1
        except InvalidArgument as error:  # raised before any message (e.g. the context length)
            raise translate.v1_error(error) from None
        finally:
            # A client that went away closes this generator: close v2's now, so that
            # it meters what was sent before this call returns.
            await stream.aclose()

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        validation.validate_generation(request)
        try:
            response = await self.v2.Complete(translate.complete_request(request), context)
        except InvalidArgument as error:
            raise translate.v1_error(error) from None
        return translate.complete_response(response)

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        validation.validate_embed(request)
        response = await self.v2.Embed(translate.embed_request(request), context)
        return translate.embed_response(response)


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
