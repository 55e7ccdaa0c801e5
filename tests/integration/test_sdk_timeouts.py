"""The Python SDK's deadlines: the client's default, each call's own `timeout_s`
(None: none), a stream's covering the whole stream, and DeadlineExceeded.

Each call took only the client's deadline (600 s by default): one call could not
fail sooner, nor wait longer, without a second client, and a call past its
deadline raised a bare TokenmeshRpcError that only its `code` told from any other.
The stalls are a real worker's slow engine steps and, for every call of both
clients, a gRPC server that never answers (a hung upstream).
"""

from __future__ import annotations

import asyncio
import math
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import tokenmesh.client as sdk
from services.core.server import serving
from services.inference.service import InferenceService
from services.launcher.processes import reserve_port
from tests.integration.conftest import inference_settings

LM = "deterministic-test"
STEP_MS = 200.0  # the slow worker's engine step: one token each
SHORT_S = 0.5  # a deadline well under the slow worker's longer answers
LONG = 400  # max_output_tokens of an answer that takes 80 s on the slow worker
BOUND_S = 30.0  # a call still running after this has no working deadline


class _Hung(grpc.GenericRpcHandler):
    """Answers no call of the inference services (a server stuck behind its own upstream)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if not method.startswith("/tokenmesh.inference."):
            return None

        async def hang(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await asyncio.Event().wait()
            return b""

        async def hang_stream(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            await asyncio.Event().wait()
            yield b""

        if method.endswith("/Generate"):
            return grpc.unary_stream_rpc_method_handler(hang_stream)
        return grpc.unary_unary_rpc_method_handler(hang)


@pytest.fixture
async def hung() -> AsyncIterator[str]:
    port = reserve_port()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Hung(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def slow_worker(tmp_path: Path, redis_url: str) -> AsyncIterator[str]:
    """A real plaintext worker whose engine takes STEP_MS a token; yields its target."""
    settings = inference_settings(
        tmp_path,
        redis_url,
        pki_dir=None,
        insecure_peer_identity="edge",
        test_engine_step_ms=STEP_MS,
    )
    async with serving(InferenceService(settings), settings) as running:
        yield f"127.0.0.1:{running.port}"


def _assert_deadline_exceeded(error: BaseException) -> None:
    """The typed error, as every TokenmeshRpcError: a code, a text, and it pickles."""
    assert isinstance(error, sdk.DeadlineExceeded)
    assert isinstance(error, sdk.TokenmeshRpcError)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(error).startswith("DEADLINE_EXCEEDED: ")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is sdk.DeadlineExceeded and copy.__dict__ == error.__dict__


async def _read_all(stream: sdk.Stream[Any]) -> list[Any]:
    return [message async for message in stream]


async def test_a_lookup_waits_at_most_the_lookup_deadline_however_long_the_calls(
    hung: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default deadline became 600 s (a non-streamed answer may take that long);
    # a lookup, which answers at once, would have waited as long behind a hung server.
    monkeypatch.setattr(sdk, "LOOKUP_TIMEOUT_S", 0.3)
    for timeout_s in (sdk.DEFAULT_TIMEOUT_S, None):  # also under a client without a deadline
        async with sdk.Client(hung, timeout_s=timeout_s) as client:
            with pytest.raises(sdk.DeadlineExceeded) as raised:
                await asyncio.wait_for(client.list_models(), timeout=BOUND_S)
        _assert_deadline_exceeded(raised.value)
    assert sdk.DEFAULT_TIMEOUT_S == 600


#: Every call of both clients, with its own timeout_s.
CALLS: dict[str, Callable[[Any, float], Awaitable[Any]]] = {
    "list_models": lambda c, t: c.list_models(timeout_s=t),
    "get_model": lambda c, t: c.get_model(LM, timeout_s=t),
    "complete": lambda c, t: c.complete(LM, "hi", max_output_tokens=2, timeout_s=t),
    "embed": lambda c, t: c.embed(LM, "hi", timeout_s=t),
    "generate": lambda c, t: _read_all(c.generate(LM, "hi", max_output_tokens=2, timeout_s=t)),
}
V1_CALLS: dict[str, Callable[[Any, float], Awaitable[Any]]] = {
    "v1.list_models": lambda c, t: c.list_models(timeout_s=t),
    "v1.complete": lambda c, t: c.complete(LM, "hi", max_tokens=2, timeout_s=t),
    "v1.generate": lambda c, t: _read_all(c.generate(LM, "hi", max_tokens=2, timeout_s=t)),
}


@pytest.mark.parametrize("name", [*CALLS, *V1_CALLS])
async def test_every_call_takes_its_own_timeout_before_the_clients(hung: str, name: str) -> None:
    """A call's timeout_s ends it behind a server that never answers, under the
    client's 600 s default: each call of Client and V1Client."""
    client_type = sdk.V1Client if name.startswith("v1.") else sdk.Client
    call = {**CALLS, **V1_CALLS}[name]
    async with client_type(hung) as client:
        with pytest.raises(sdk.DeadlineExceeded) as raised:
            await asyncio.wait_for(call(client, 0.3), timeout=BOUND_S)
    _assert_deadline_exceeded(raised.value)
    assert raised.value.status is None  # the client's own deadline: nothing from a server


async def test_a_stalled_completion_ends_at_its_own_timeout(slow_worker: str) -> None:
    async with sdk.Client(slow_worker) as client:  # 600 s by default
        with pytest.raises(sdk.DeadlineExceeded) as raised:
            await asyncio.wait_for(
                client.complete(LM, "long", max_output_tokens=LONG, timeout_s=SHORT_S),
                timeout=BOUND_S,
            )
    _assert_deadline_exceeded(raised.value)


async def test_the_clients_deadline_applies_unless_a_call_passes_its_own(
    slow_worker: str,
) -> None:
    async with sdk.Client(slow_worker, timeout_s=SHORT_S) as client:
        with pytest.raises(sdk.DeadlineExceeded) as raised:
            await asyncio.wait_for(
                client.complete(LM, "long", max_output_tokens=LONG), timeout=BOUND_S
            )
        _assert_deadline_exceeded(raised.value)
        # Six tokens take six engine steps, 1.2 s: past the client's 0.5 s deadline,
        # within a call's longer one, and with none at all (timeout_s=None).
        assert 6 * STEP_MS / 1000 > SHORT_S
        for timeout_s in (BOUND_S, None):
            answer = await client.complete(LM, "long", max_output_tokens=6, timeout_s=timeout_s)
            assert answer.usage.completion_tokens == 6
    async with sdk.V1Client(slow_worker, timeout_s=None) as v1:  # no deadline by default
        old = await v1.complete(LM, "long", max_tokens=6)
        assert old.usage.completion_tokens == 6


async def test_a_streams_deadline_covers_the_whole_stream(slow_worker: str) -> None:
    """Messages arrive every 200 ms, well inside the deadline: they do not extend it,
    as a gRPC deadline (a stream of 400 tokens takes 80 s)."""
    read: list[Any] = []
    async with sdk.Client(slow_worker) as client:
        with pytest.raises(sdk.DeadlineExceeded) as raised:
            async with asyncio.timeout(BOUND_S):
                async with client.generate(
                    LM, "long", max_output_tokens=LONG, timeout_s=3.0
                ) as stream:
                    async for message in stream:
                        read.append(message)
    _assert_deadline_exceeded(raised.value)
    assert read and all(not m.HasField("finish_reason") for m in read)


@pytest.mark.parametrize("timeout_s", [0, -1.0, math.inf, math.nan])
async def test_a_timeout_that_grpc_would_misread_is_refused(timeout_s: float) -> None:
    """gRPC takes 0 for no deadline and math.inf for one already passed: None says none."""
    with pytest.raises(ValueError, match="None for no deadline"):
        sdk.Client("127.0.0.1:1", timeout_s=timeout_s)
    async with sdk.Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="None for no deadline"):
            await client.complete(LM, "hi", timeout_s=timeout_s)
        with pytest.raises(ValueError, match="None for no deadline"):
            client.generate(LM, "hi", timeout_s=timeout_s)  # at once, before any read
