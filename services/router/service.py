"""The router service's wiring. The catalogue, worker registry and xDS land
with the router issue; until then its RPCs answer UNIMPLEMENTED.

The router also answers server reflection for the whole public mesh API: the
edge routes reflection here, so one generic client (grpcurl, Postman, ghz)
discovers every public service through a single port.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio

from services.core.redis_service import RedisBackedService
from services.core.server import unimplemented
from tokenmesh.auth.v1 import auth_service_pb2
from tokenmesh.inference.v1 import inference_service_pb2
from tokenmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from tokenmesh.usage.v1 import usage_service_pb2

ROUTER_SERVICE = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
REGISTRY_SERVICE = router_service_pb2.DESCRIPTOR.services_by_name["WorkerRegistryService"].full_name
PUBLIC_SERVICES = (
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    ROUTER_SERVICE,
    inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
)


class RouterService(RedisBackedService):
    """RouterService serves tokenmesh.router.v1 and mesh-wide reflection."""

    name = "router"

    def service_names(self) -> Sequence[str]:
        return [ROUTER_SERVICE, REGISTRY_SERVICE]

    def reflection_names(self) -> Sequence[str]:
        return [*PUBLIC_SERVICES, REGISTRY_SERVICE]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        router_service_pb2_grpc.add_RouterServiceServicer_to_server(
            unimplemented(router_service_pb2_grpc.RouterServiceServicer), server
        )
        router_service_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(
            unimplemented(router_service_pb2_grpc.WorkerRegistryServiceServicer), server
        )
