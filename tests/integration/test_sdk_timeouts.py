"""The Python SDK's deadlines: a model lookup fails in seconds behind a hung server."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest

import tokenmesh.client as sdk
from services.launcher.processes import reserve_port

HUNG = "/tokenmesh.inference.v2.InferenceService/ListModels"


class _Hung(grpc.GenericRpcHandler):
    """Answers ListModels never (a server stuck behind its own upstream)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method != HUNG:
            return None

        async def hang(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await asyncio.Event().wait()
            return b""

        return grpc.unary_unary_rpc_method_handler(hang)


async def test_a_lookup_waits_at_most_the_lookup_deadline_however_long_the_calls(monkeypatch):
    # The default deadline became 600 s (a non-streamed answer may take that long);
    # a lookup, which answers at once, would have waited as long behind a hung server.
    monkeypatch.setattr(sdk, "LOOKUP_TIMEOUT_S", 0.3)
    port = reserve_port()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Hung(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with sdk.Client(f"127.0.0.1:{port}") as client:
            assert client._timeout_s == sdk.DEFAULT_TIMEOUT_S == 600
            with pytest.raises(sdk.TokenmeshRpcError) as raised:
                await asyncio.wait_for(client.list_models(), timeout=10)
            assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(None)
