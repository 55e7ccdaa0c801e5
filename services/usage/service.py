"""The usage service's wiring. Its RPCs land with the usage issue; until then
they answer UNIMPLEMENTED (never a fake result)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio

from services.core.redis_service import RedisBackedService
from services.core.server import unimplemented
from tokenmesh.usage.v1 import usage_service_pb2, usage_service_pb2_grpc

SERVICE_NAME = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name


class UsageService(RedisBackedService):
    """UsageService serves tokenmesh.usage.v1.UsageService."""

    name = "usage"

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            unimplemented(usage_service_pb2_grpc.UsageServiceServicer), server
        )
