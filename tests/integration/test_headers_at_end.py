"""A unary answer's response headers leave with it, in one batch (services.core.interceptors).

A real grpc.aio server behind the error boundary; the edge's half (lifting
them back into the headers) is tested through Envoy in
tests/e2e/test_edge_grpc.py and tests/e2e/test_answer_headers.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from services.core import contract
from services.core.errors import NotFound
from services.core.interceptors import BoundaryInterceptor
from services.core.server import SERVER_OPTIONS

SERVICE = "tokenmesh.test.v1.Answers"
HEADERS = (("x-request-id", "r-1"), ("x-ratelimit-warning", "a"), ("x-ratelimit-warning", "b"))
Context = grpc.aio.ServicerContext[Any, Any]


async def _small(request: bytes, context: Context) -> bytes:
    await context.send_initial_metadata(HEADERS)
    return b"ok"


async def _large(request: bytes, context: Context) -> bytes:
    await context.send_initial_metadata(HEADERS)
    return b"x" * (contract.HEADERS_AT_END_MAX_BYTES + 1)


async def _large_without_headers(request: bytes, context: Context) -> bytes:
    return b"x" * (contract.HEADERS_AT_END_MAX_BYTES + 1)


async def _medium(request: bytes, context: Context) -> bytes:
    await context.send_initial_metadata(HEADERS)
    return b"x" * (contract.REST_HEADERS_AT_END_MAX_BYTES + 1)


async def _fails_first(request: bytes, context: Context) -> bytes:
    raise NotFound("no such model")


async def _fails_after_headers(request: bytes, context: Context) -> bytes:
    await context.send_initial_metadata(HEADERS)
    raise NotFound("no such model")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[BoundaryInterceptor()], options=SERVER_OPTIONS)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(behaviour)
        for name, behaviour in {
            "Small": _small,
            "Large": _large,
            "LargeWithoutHeaders": _large_without_headers,
            "Medium": _medium,
            "FailsFirst": _fails_first,
            "FailsAfterHeaders": _fails_after_headers,
        }.items()
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as connected:
        yield connected
    await server.stop(None)


def _call(channel: grpc.aio.Channel, method: str) -> Any:
    call: Any = channel.unary_unary(f"/{SERVICE}/{method}")
    return call(b"", timeout=5)


async def test_a_unary_answers_headers_ride_its_trailers_named_for_the_edge(channel) -> None:
    # Before, they went out as a batch of their own (200 µs per ListModels at the
    # edge): the client saw them as initial metadata, before the answer.
    call = _call(channel, "Small")
    assert await call == b"ok"
    assert not [k for k, _ in await call.initial_metadata() if not k.startswith(":")]
    trailing = list(await call.trailing_metadata())
    assert [pair for pair in trailing if pair[0] != contract.RESPONSE_HEADERS_TRAILER] == list(
        HEADERS
    )
    named = dict(trailing)[contract.RESPONSE_HEADERS_TRAILER]
    assert named == "x-request-id,x-ratelimit-warning"  # each name once, repeats kept


async def test_a_large_answer_sends_its_headers_first_marked_sent(channel) -> None:
    # The edge buffers an answer to lift its headers: one over the bound says it
    # need not (its buffer limit would turn it into a 500).
    for method, headers in (("Large", HEADERS), ("LargeWithoutHeaders", ())):
        call = _call(channel, method)
        assert len(await call) == contract.HEADERS_AT_END_MAX_BYTES + 1
        initial = list(await call.initial_metadata())
        assert initial == [*headers, (contract.RESPONSE_HEADERS_TRAILER, contract.HEADERS_SENT)]
        trailing = dict(await call.trailing_metadata())
        assert contract.RESPONSE_HEADERS_TRAILER not in trailing


async def test_an_error_after_headers_sends_them_first_so_envoy_does_not_retry_it(
    channel,
) -> None:
    # Trailers-only, an UNAVAILABLE or CANCELLED after the work started was retried
    # by Envoy on another worker (the route's retry_on), and run and billed again.
    call = _call(channel, "FailsAfterHeaders")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert list(failed.value.initial_metadata()) == list(HEADERS)
    assert contract.RESPONSE_HEADERS_TRAILER not in dict(failed.value.trailing_metadata())
    assert failed.value.details() == "no such model"


async def test_an_error_before_any_header_is_trailers_only(channel) -> None:
    call = _call(channel, "FailsFirst")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert not list(failed.value.initial_metadata())


async def test_a_transcoded_calls_bound_is_lower(channel) -> None:
    # The edge buffers a REST answer as JSON, up to ~8x its protobuf size.
    call: Any = channel.unary_unary(f"/{SERVICE}/Medium")
    plain = call(b"", timeout=5)
    assert await plain
    assert contract.RESPONSE_HEADERS_TRAILER in dict(await plain.trailing_metadata())
    rest = call(b"", timeout=5, metadata=(("x-envoy-original-path", "/v1/medium"),))
    assert await rest
    initial = dict(await rest.initial_metadata())
    assert initial[contract.RESPONSE_HEADERS_TRAILER] == contract.HEADERS_SENT
