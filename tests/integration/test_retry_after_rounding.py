"""Retry-After is rounded up, never down.

A token budget that frees in 2.5 s must not answer `Retry-After: 2`: a client
honouring it retries before the window frees and is refused again. Both
places that turn a domain error's retry_after_s into the header round up:
the error boundary (gRPC trailers, Retry-After behind the transcoder) and
ext_authz's denial (the failed-authentication limiter's 429).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.type.v3 import http_status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth.ext_authz import _denied
from services.core.errors import ResourceExhausted
from services.core.interceptors import BoundaryInterceptor
from services.core.server import SERVER_OPTIONS

CHECK = "/grpc.health.v1.Health/Check"


class Exhausted(health_pb2_grpc.HealthServicer):
    """Refuses every Check with a budget that frees in `service` seconds."""

    async def Check(  # noqa: N802 - the RPC's name
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        raise ResourceExhausted("token budget spent", retry_after_s=float(request.service))


@pytest.fixture
async def client() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[BoundaryInterceptor()], options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(Exhausted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _retry_after(client: grpc.aio.Channel, seconds: str) -> str:
    check = client.unary_unary(
        CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await check(health_pb2.HealthCheckRequest(service=seconds), timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(refused.value.trailing_metadata() or ())
    value = trailers["retry-after"]
    assert isinstance(value, str)
    return value


@pytest.mark.parametrize(
    ("seconds", "header"), [("2.5", "3"), ("2.1", "3"), ("2", "2"), ("0.2", "1"), ("0", "1")]
)
async def test_the_boundary_rounds_retry_after_up(
    client: grpc.aio.Channel, seconds: str, header: str
) -> None:
    assert await _retry_after(client, seconds) == header


@pytest.mark.parametrize(("seconds", "header"), [(2.5, "3"), (59.01, "60"), (0.3, "1")])
def test_the_auth_limiters_denial_rounds_retry_after_up(seconds: float, header: str) -> None:
    denial = _denied(ResourceExhausted("too many failures", retry_after_s=seconds))
    assert denial.denied_response.status.code == http_status_pb2.StatusCode.TooManyRequests
    headers = {h.header.key: h.header.value for h in denial.denied_response.headers}
    assert headers["retry-after"] == header
