"""Calls between services carry their trace, and a cancelled call still reaches its callee.

OpenTelemetry's own grpc.aio client interceptors await the whole call inside
the interceptor: `call.cancel()` cancelled only that wait, and the callee ran
on (a cancelled job item's worker generated to its end and metered it). Ours
only adds the trace context and hands the call back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.core import telemetry
from services.core.identity import ClientChannel
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

SLOW_S = 5.0


class _Slow(rpc.InferenceServiceServicer):
    """A Complete that takes SLOW_S; records what became of each call and its traceparent."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.traceparents: list[str] = []

    async def Complete(
        self, request: v2.CompleteRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.CompleteResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.traceparents.append(str(metadata.get("traceparent", "")))
        try:
            await asyncio.sleep(SLOW_S)
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("finished")
        return v2.CompleteResponse()


@pytest.fixture
async def slow() -> AsyncIterator[tuple[_Slow, int]]:
    server = grpc.aio.server()
    servicer = _Slow()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    rpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(None)


@pytest.fixture
def tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_tracing", True)  # as a service with an OTLP endpoint


async def test_a_traced_call_carries_its_trace_and_its_cancel(slow, tracing) -> None:
    servicer, port = slow
    channel = ClientChannel(f"127.0.0.1:{port}", None, "worker")
    stub = rpc.InferenceServiceStub(channel.get())
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("job item") as span:
            call = stub.Complete(v2.CompleteRequest(), timeout=30)
            deadline = time.monotonic() + 10
            while not servicer.traceparents:
                assert time.monotonic() < deadline, "the call never reached the server"
                await asyncio.sleep(0.02)
            call.cancel()
        started = time.monotonic()
        while not servicer.outcomes and time.monotonic() - started < SLOW_S + 2:
            await asyncio.sleep(0.02)
    finally:
        await channel.close()
    assert servicer.outcomes == ["cancelled"]  # it ran to its end: "finished"
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert servicer.traceparents[0].split("-")[1] == trace_id
