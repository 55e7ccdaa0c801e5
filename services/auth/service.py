"""The auth service's wiring. Its RPCs land with the auth issue; until then
they answer UNIMPLEMENTED (never a fake result)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio

from services.core.redis_service import RedisBackedService
from services.core.server import unimplemented
from tokenmesh.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

SERVICE_NAME = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class AuthService(RedisBackedService):
    """AuthService serves tokenmesh.auth.v1.AuthService."""

    name = "auth"

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
            unimplemented(auth_service_pb2_grpc.AuthServiceServicer), server
        )
