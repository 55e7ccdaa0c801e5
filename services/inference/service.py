"""The inference service: settings, model loading and server wiring."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from services.core.server import RunningServer, Service
from services.core.settings import ServerSettings, env, require
from services.inference.models import ModelRegistry, deterministic_test_model
from services.inference.servicer import InferenceServicer
from tokenmesh.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass(frozen=True)
class InferenceSettings(ServerSettings):
    """InferenceSettings configure one inference worker."""

    test_models: tuple[str, ...] = env(
        "TOKENMESH_TEST_MODELS",
        ("deterministic-test:1",),
        "Comma-separated NAME:VERSION list served by the deterministic test engine.",
    )
    test_engine_step_ms: float = env(
        "TOKENMESH_TEST_ENGINE_STEP_MS", 20.0, "Simulated decode step of the test engine, in ms."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for entry in self.test_models:
            name, _, version = entry.partition(":")
            require(
                bool(name and version), "TOKENMESH_TEST_MODELS", f"{entry!r} is not NAME:VERSION"
            )
        require(self.test_engine_step_ms >= 0, "TOKENMESH_TEST_ENGINE_STEP_MS", "must be >= 0")


def model_health_name(name: str, version: str) -> str:
    """Returns the health-check name that reports one model version's readiness."""
    return f"{SERVICE_NAME}/{name}/{version}"


class InferenceService(Service):
    """InferenceService serves the models of one worker."""

    name = "inference"

    def __init__(self, settings: InferenceSettings) -> None:
        step_s = settings.test_engine_step_ms / 1000
        self.registry = ModelRegistry()
        for entry in settings.test_models:
            name, version = entry.split(":", 1)
            self.registry.add(deterministic_test_model(name, version, step_s=step_s))

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        servicer = InferenceServicer(self.registry)
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    async def start(self, running: RunningServer) -> None:
        for model in self.registry.all():
            await model.engine.warm_up()
            model.ready = True
            await running.set_serving([model_health_name(model.name, model.version)], serving=True)
            logger.info(
                "model %s version %s ready (%s)", model.name, model.version, model.engine.name
            )
