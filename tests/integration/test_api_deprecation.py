"""The error boundary announces a deprecated API version and refuses a retired one.

A real grpc.aio server behind `BoundaryInterceptor`, serving handlers under
inference v1's and v2's service names (raw bytes: what is tested is the
boundary, not the servicers), with a clock the test sets.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.core import contract
from services.core.api_versions import DeprecationSchedule
from services.core.errors import NotFound
from services.core.interceptors import BoundaryInterceptor
from tests.answer_headers import call_headers

V1 = "tokenmesh.inference.v1.InferenceService"
V2 = "tokenmesh.inference.v2.InferenceService"
ADMIN_V1 = "tokenmesh.inference.v1.InferenceAdminService"
SUNSET = datetime.datetime(2027, 6, 30, tzinfo=datetime.UTC).timestamp()
DEPRECATION_HEADERS = {"deprecation", "sunset", "link"}


class Clock:
    """Unix time as the test sets it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Calls:
    """How often the handlers ran."""

    def __init__(self) -> None:
        self.count = 0


def _handlers(calls: Calls) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    async def plain(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        calls.count += 1
        return b"ok"

    async def own_headers(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        calls.count += 1
        await context.send_initial_metadata((("x-request-id", "r-1"),))
        return b"ok"

    async def fails(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        calls.count += 1
        raise NotFound("no such model")

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        calls.count += 1
        for chunk in (b"a", b"b"):
            yield chunk

    unary: Callable[..., grpc.RpcMethodHandler[Any, Any]] = grpc.unary_unary_rpc_method_handler
    return {
        "Plain": unary(plain),
        "OwnHeaders": unary(own_headers),
        "Fails": unary(fails),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, Clock, Calls]]:
    """A server for v1, v2 and v1's admin service; v1 is deprecated until SUNSET."""
    clock, calls = Clock(SUNSET - 60), Calls()
    schedule = DeprecationSchedule.parse(["v1=2027-06-30"], "https://docs.example.com/docs")
    server = grpc.aio.server(interceptors=[BoundaryInterceptor(None, schedule, clock)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, _handlers(calls))
            for name in (V1, V2, ADMIN_V1)
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, clock, calls
    await server.stop(None)


def _keys(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


async def test_every_v1_response_announces_the_deprecation(served) -> None:
    channel, _clock, _calls = served
    for rpc in ("Plain", "OwnHeaders"):
        call = channel.unary_unary(f"/{V1}/{rpc}")(b"", timeout=5)
        assert await call == b"ok"
        headers = _keys((await call_headers(call)).items())
        assert headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
        assert headers["deprecation"].startswith("@")
        assert headers["link"] == (
            '<https://docs.example.com/docs/migration/v1-to-v2.md>; rel="deprecation"'
        )
    # The handler's own headers are kept beside them.
    assert headers["x-request-id"] == "r-1"


async def test_a_v1_stream_announces_it_in_its_response_headers(served) -> None:
    channel, _clock, _calls = served
    call = channel.unary_stream(f"/{V1}/Stream")(b"", timeout=5)
    assert [chunk async for chunk in call] == [b"a", b"b"]
    assert DEPRECATION_HEADERS <= _keys(await call.initial_metadata()).keys()


async def test_a_v1_error_before_any_response_carries_it_with_the_status(served) -> None:
    channel, _clock, _calls = served
    call = channel.unary_unary(f"/{V1}/Fails")(b"", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    # A trailers-only response: REST clients behind the edge see these as headers.
    assert DEPRECATION_HEADERS <= _keys(failed.value.trailing_metadata()).keys()


async def test_v2_and_services_without_a_successor_are_not_announced(served) -> None:
    channel, _clock, _calls = served
    for service in (V2, ADMIN_V1):
        call = channel.unary_unary(f"/{service}/Plain")(b"", timeout=5)
        assert await call == b"ok"
        assert not DEPRECATION_HEADERS & _keys(await call.initial_metadata()).keys()


async def _retired_status(
    call: grpc.aio.Call,
) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo]:
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return await call.code(), info


async def test_after_the_sunset_v1_is_unimplemented_naming_v2_and_runs_nothing(served) -> None:
    channel, clock, calls = served
    clock.now = SUNSET
    for rpc, kind in (("Plain", "unary"), ("Stream", "stream")):
        if kind == "unary":
            call: Any = channel.unary_unary(f"/{V1}/{rpc}")(b"", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call
        else:
            call = channel.unary_stream(f"/{V1}/{rpc}")(b"", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in call:
                    pass
        code, info = await _retired_status(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert info.reason == "API_VERSION_SUNSET" and info.domain == "tokenmesh.dev"
        assert info.metadata["successor"] == "tokenmesh.inference.v2"
        assert "tokenmesh.inference.v2" in (failed.value.details() or "")
        trailers = _keys(failed.value.trailing_metadata())
        # The edge answers REST clients 410 Gone from this header.
        assert trailers[contract.HTTP_STATUS_HEADER] == "410"
        assert DEPRECATION_HEADERS <= trailers.keys()
    assert calls.count == 0
    # v2 is unaffected; extending the sunset (a later clock here) is configuration only.
    assert await channel.unary_unary(f"/{V2}/Plain")(b"", timeout=5) == b"ok"


async def test_requests_are_counted_by_api_version_and_rpc(served) -> None:
    channel, clock, _calls = served

    def count(version: str) -> float:
        labels = {"api": "inference", "api_version": version, "rpc": "Plain"}
        return REGISTRY.get_sample_value("tokenmesh_api_requests_total", labels) or 0.0

    before = {version: count(version) for version in ("v1", "v2")}
    await channel.unary_unary(f"/{V1}/Plain")(b"", timeout=5)
    await channel.unary_unary(f"/{V2}/Plain")(b"", timeout=5)
    await channel.unary_unary(f"/{V2}/Plain")(b"", timeout=5)
    clock.now = SUNSET  # calls to a retired version count too: who still calls it
    with pytest.raises(grpc.aio.AioRpcError):
        await channel.unary_unary(f"/{V1}/Plain")(b"", timeout=5)
    assert count("v1") - before["v1"] == 2
    assert count("v2") - before["v2"] == 2
