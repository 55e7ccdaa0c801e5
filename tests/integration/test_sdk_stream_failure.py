"""The Python SDK on a real worker whose stream fails after it started.

What Client.generate documents: every choice still running gets its final
message (finish_reason ERROR, `error` a google.rpc.Status) and is yielded;
then the call raises TokenmeshRpcError with the same status, as gRPC ends
the RPC. A caller keeps the partial text it read and learns of the failure
from the exception (or from the final messages).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import tokenmesh.client as sdk
from services.core.server import serving
from services.inference.service import InferenceService
from tests import mtls
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as resources


@pytest.fixture
async def plaintext_worker(tmp_path: Path, redis_url: str) -> AsyncIterator[int]:
    """A worker serving plaintext, every caller taken for the edge (as the SDK reaches
    a worker directly in development); yields its port."""
    settings = inference_settings(tmp_path, redis_url, pki_dir=None, insecure_peer_identity="edge")
    async with serving(InferenceService(settings), settings) as running:
        yield running.port


async def _unload(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await v1_rpc.InferenceAdminServiceStub(channel).UnloadModel(
            v1.UnloadModelRequest(model="deterministic-test", version="1"),
            metadata=mtls.EDGE_FOR_ADMIN,
            timeout=30,
        )


async def _read_until_raised(port: int, stream: AsyncIterator[Any]) -> tuple[list[Any], Any]:
    """Reads `stream`, unloading its model version after the first message; returns the
    messages and the TokenmeshRpcError raised."""
    received: list[Any] = []
    unloading: asyncio.Future[None] | None = None
    with pytest.raises(sdk.TokenmeshRpcError) as raised:
        async for message in stream:
            received.append(message)
            if unloading is None:
                # Unloading the version (1 s grace) fails the choices still running.
                unloading = asyncio.ensure_future(_unload(port))
    assert unloading is not None
    await unloading
    return received, raised.value


async def test_a_stream_failing_mid_way_yields_its_final_messages_then_raises(
    plaintext_worker: int,
) -> None:
    async with sdk.Client(f"127.0.0.1:{plaintext_worker}", timeout_s=60) as client:
        stream = client.generate(
            "deterministic-test", "long", version="1", n=2, max_output_tokens=400
        )
        received, raised = await _read_until_raised(plaintext_worker, stream)

    assert raised.code == grpc.StatusCode.UNAVAILABLE
    finals = [m for m in received if m.HasField("finish_reason")]
    assert sorted(m.choice_index for m in finals) == [0, 1]
    for final in finals:
        assert final.finish_reason == resources.FINISH_REASON_ERROR
        assert final.error.code == raised.code.value[0]
        assert final.error.message == raised.message
    # The partial text came before the failure, and was yielded.
    assert any(m.text for m in received if not m.HasField("finish_reason"))


async def test_a_v1_stream_failing_mid_way_yields_its_final_message_then_raises(
    plaintext_worker: int,
) -> None:
    async with sdk.V1Client(f"127.0.0.1:{plaintext_worker}", timeout_s=60) as client:
        stream = client.generate("deterministic-test", "long", version="1", max_tokens=400)
        received, raised = await _read_until_raised(plaintext_worker, stream)

    assert raised.code == grpc.StatusCode.UNAVAILABLE
    *partial, final = received
    assert final.finish_reason == "error"
    assert final.error.code == raised.code.name
    assert final.error.message == raised.message
    assert partial and all(not m.finish_reason for m in partial)
