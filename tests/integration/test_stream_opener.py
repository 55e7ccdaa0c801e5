"""The error boundary iterates an inner interceptor's stream itself (STREAM_OPENER).

An inner interceptor's streaming handler may carry a coroutine that opens the
stream: the boundary then sends that stream's messages without the inner
layer's re-yield per message. What a client sees must not change: every
message, in order; an error inside the stream mapped by the boundary to its
status; the inner layer's setup run once, before the first message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import FailedPrecondition
from services.core.interceptors import STREAM_OPENER, BoundaryInterceptor

WATCH = "/grpc.health.v1.Health/Watch"
SERVING = health_pb2.HealthCheckResponse.SERVING


class Streamer(health_pb2_grpc.HealthServicer):
    """Streams three answers; the service "broken" fails after the first."""

    async def Watch(  # noqa: N802 - the RPC's name
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        for n in range(3):
            if n == 1 and request.service == "broken":
                raise FailedPrecondition("broken after one message")
            yield health_pb2.HealthCheckResponse(status=SERVING)


class OpeningInterceptor(grpc.aio.ServerInterceptor):
    """Wraps streams as RequestLimitInterceptor does: a generator with an opener."""

    def __init__(self) -> None:
        self.opened = 0
        self.re_yielded = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_stream is None:
            return handler
        behavior = handler.unary_stream

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async for message in await open_stream(request, context):
                self.re_yielded += 1
                yield message

        async def open_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            self.opened += 1
            stream_: AsyncIterator[Any] = behavior(request, context)
            return stream_

        setattr(stream, STREAM_OPENER, open_stream)
        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, OpeningInterceptor]]:
    inner = OpeningInterceptor()
    server = grpc.aio.server(interceptors=[BoundaryInterceptor(), inner])
    health_pb2_grpc.add_HealthServicer_to_server(Streamer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as client:
        yield client, inner
    await server.stop(None)


def _watch(client: grpc.aio.Channel, service: str) -> Any:
    return client.unary_stream(
        WATCH,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(health_pb2.HealthCheckRequest(service=service), timeout=5)


async def test_the_boundary_sends_the_opened_stream_itself(served) -> None:
    client, inner = served
    answers = [a.status async for a in _watch(client, "")]
    assert answers == [SERVING] * 3
    assert inner.opened == 1
    assert inner.re_yielded == 0  # the inner generator was not iterated


async def test_an_error_inside_an_opened_stream_is_mapped_by_the_boundary(served) -> None:
    client, _ = served
    call = _watch(client, "broken")
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for answer in call:
            received.append(answer.status)
    assert received == [SERVING]
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.details() == "broken after one message"
