"""Bytes that are not the request message are INVALID_ARGUMENT at the error boundary.

Found by the hostile-input suite (tests/e2e/test_hostile_input.py): grpc
decodes requests before any interceptor runs and answered undecodable ones
with UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..."
(HTTP 500 through the edge's transcoder for `GET /v1/models/%ff`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.core.interceptors import BoundaryInterceptor

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    """A real grpc.aio server (the health servicer) behind the boundary interceptor."""
    server = grpc.aio.server(interceptors=[BoundaryInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as client:
        yield client
    await server.stop(None)


async def _status(call: grpc.aio.Call) -> tuple[grpc.StatusCode, str, list[str]]:
    status = await rpc_status.aio.from_call(call)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [f"{v.field}: {v.description}" for v in bad.field_violations]
    return await call.code(), await call.details(), fields


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x0a\x02\xff\xfe", "a string field is not UTF-8"),
        (b"\xff\xff\xff", "malformed"),
        (b"\x0b", "malformed"),  # a group start with no end
    ],
)
async def test_undecodable_unary_request_is_invalid_argument(channel, raw, problem) -> None:
    call = channel.unary_unary(CHECK)(raw, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    code, message, fields = await _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    expected = f"request: is not a valid grpc.health.v1.HealthCheckRequest ({problem})"
    assert message == expected
    assert fields == [expected]
    assert "class" not in message and "DecodeError" not in message


async def test_undecodable_request_of_a_server_stream_is_invalid_argument(channel) -> None:
    call = channel.unary_stream(WATCH)(b"\x0a\x01\xff", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in call:
            pass
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_valid_requests_still_decode(channel) -> None:
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    reply = await channel.unary_unary(CHECK)(request, timeout=5)
    assert health_pb2.HealthCheckResponse.FromString(reply).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
