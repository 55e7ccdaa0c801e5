"""Calls that end because their deadline passed or their client left count by that code.

grpc cancels the handler then and sets no status on its context: the error
boundary counted such calls tokenmesh_rpc_total{code="OK"}. The availability
SLO (deploy/observability/prometheus/alerts.yml: DEADLINE_EXCEEDED is a
server-side fault there) never saw a worker too slow for its callers, and
calls the client cancelled showed as successes. Real grpc.aio server with the
real BoundaryInterceptor, handlers that never finish by themselves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client import REGISTRY

from services.core.interceptors import BoundaryInterceptor

SERVICE = "tokenmesh.test.v1.Slow"
TIMEOUT_S = 0.2
# A message large enough that a client reading one leaves the server blocked in
# flow control, its stream suspended at a `yield` (the GeneratorExit path).
LARGE = b"x" * (256 * 1024)


class Slow:
    """Handlers that run until grpc cancels them; `seen` names how each one ended."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.seen: list[str] = []

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.seen.append("CancelledError")
            raise
        return b""

    async def wait_after_one(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            self.started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.seen.append("CancelledError")
            raise

    async def flood(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            while True:
                yield LARGE
                self.started.set()
        except GeneratorExit:
            self.seen.append("GeneratorExit")
            raise


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, Slow, str]]:
    """A channel to a server of Slow behind the boundary; its methods' prefix (fresh per
    test, so that no other call moves their counters)."""
    slow = Slow()
    service = f"{SERVICE}{uuid.uuid4().hex[:8]}"
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Wait": grpc.unary_unary_rpc_method_handler(slow.wait),
        "WaitAfterOne": grpc.unary_stream_rpc_method_handler(slow.wait_after_one),
        "Flood": grpc.unary_stream_rpc_method_handler(slow.flood),
    }
    server = grpc.aio.server(interceptors=[BoundaryInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, slow, f"/{service}/"
    finally:
        await server.stop(None)


def _count(method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    return REGISTRY.get_sample_value("tokenmesh_rpc_total", labels) or 0.0


async def _counted(method: str, code: str, timeout_s: float = 5.0) -> None:
    """Waits until the call to `method` is counted with `code` (a stream closed at a
    `yield` is finished when its generator is collected)."""
    deadline = time.monotonic() + timeout_s
    while _count(method, code) < 1:
        assert time.monotonic() < deadline, (method, code, _codes(method))
        await asyncio.sleep(0.01)


def _codes(method: str) -> dict[str, float]:
    names = ("OK", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNKNOWN")
    return {name: _count(method, name) for name in names}


async def test_a_unary_call_past_its_deadline_counts_deadline_exceeded(served):
    channel, slow, prefix = served
    method = prefix + "Wait"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method)(b"", timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _counted(method, "DEADLINE_EXCEEDED")
    assert _count(method, "OK") == 0 and _count(method, "CANCELLED") == 0
    assert slow.seen == ["CancelledError"]


@pytest.mark.parametrize("name", ["WaitAfterOne", "Flood"])
async def test_a_stream_past_its_deadline_counts_deadline_exceeded(served, name):
    channel, _, prefix = served
    method = prefix + name
    call = channel.unary_stream(method)(b"", timeout=TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _counted(method, "DEADLINE_EXCEEDED")
    assert _count(method, "OK") == 0 and _count(method, "CANCELLED") == 0


async def test_a_unary_call_its_client_cancelled_counts_cancelled(served):
    channel, slow, prefix = served
    method = prefix + "Wait"
    call = channel.unary_unary(method)(b"", timeout=30)
    await slow.started.wait()
    call.cancel()
    await _counted(method, "CANCELLED")
    assert _count(method, "OK") == 0 and _count(method, "DEADLINE_EXCEEDED") == 0


@pytest.mark.parametrize(
    ("name", "ended"), [("WaitAfterOne", "CancelledError"), ("Flood", "GeneratorExit")]
)
async def test_a_stream_its_client_cancelled_counts_cancelled(served, name, ended):
    channel, slow, prefix = served
    method = prefix + name
    call = channel.unary_stream(method)(b"", timeout=30)
    await call.read()
    await slow.started.wait()
    call.cancel()
    await _counted(method, "CANCELLED")
    assert _count(method, "OK") == 0 and _count(method, "DEADLINE_EXCEEDED") == 0
    assert slow.seen == [ended]  # both ways a stream is stopped are covered
