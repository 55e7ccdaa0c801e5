"""A hung engine call on a real worker: unloads and exits stay bounded, requests end.

An engine call that never returns (a wedged kernel, a deadlocked runtime) must not
hold an unload or the worker's exit for good, leave its requests waiting forever,
or bill tokens nothing produced. The engines are the worker's own (the
deterministic test engine, the real all-minilm-l6-v2); their calls are held on a
threading.Event that only the test's teardown sets.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.server import run
from services.inference import embedder as embedder_module
from services.inference.models import LoadedModel
from services.inference.scheduler import Scheduler
from services.inference.service import InferenceService
from tests import mtls
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_inference_model_lifecycle import _engine_threads, _reason, _until
from tests.integration.test_openai_usage_billing import _key_events
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc

P = ParamSpec("P")
T = TypeVar("T")

LM, EMBEDDINGS = "deterministic-test", "all-minilm-l6-v2"
GRACE_S = 0.2  # the worker's drain timeout: the held call outlives it
CHUNK_WAIT_S = 0.5  # embedder.CHUNK_WAIT_S (30 s) for these tests
SCHEDULER_JOIN_S = 1.0  # Scheduler.STOP_JOIN_S (10 s) for these tests
SLACK_S = 3.0  # scheduling and RPC overhead on a loaded 2-core machine


@pytest.fixture(autouse=True)
def _short_engine_join(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Scheduler, "STOP_JOIN_S", SCHEDULER_JOIN_S)


class HeldCalls:
    """Lets an engine method's first `free` calls through; the later ones wait for `release`.

    Only the engine's own thread calls the wrapped method (one call at a time).
    """

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.holding = threading.Event()  # a call waits for release now
        self.release = threading.Event()

    def wrap(self, call: Callable[P, T]) -> Callable[P, T]:
        def held(*args: P.args, **kwargs: P.kwargs) -> T:
            if self.free > 0:
                self.free -= 1
            else:
                self.holding.set()
                self.release.wait()
            return call(*args, **kwargs)

        return held

    async def held(self) -> bool:
        return self.holding.is_set()


def _identity(key: str) -> tuple[tuple[str, str], ...]:
    return ((contract.KEY_ID_HEADER, key),)


def _key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


def _generate(version: str, max_tokens: int = 50) -> v1.GenerateRequest:
    return v1.GenerateRequest(model=LM, version=version, prompt="a", max_tokens=max_tokens)


def _unloading(model: LoadedModel) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return model.unloading

    return check


def _embed_threads() -> int:
    """Returns the embedders' compute threads alive."""
    return sum(t.name == "embedder" for t in threading.enumerate())


async def _shipped_events(
    redis_url: str, stream: str, key: str, channel: grpc.aio.Channel
) -> list[Any]:
    """Returns the usage events of `key`, once one of a request made now has shipped
    (the worker ships its events in order: any of `key`'s are then shipped too)."""
    after = _key()
    await v1_rpc.InferenceServiceStub(channel).Complete(
        v1.CompleteRequest(model=LM, version="2", prompt="z", max_tokens=1),
        metadata=_identity(after),
    )
    client = aioredis.from_url(redis_url)
    try:
        return await _key_events(client, stream, key, 0, until=after)
    finally:
        await client.aclose()


# ------------------------------------------------------------------ generative versions


async def _hold_a_running_stream(
    service: InferenceService, channel: grpc.aio.Channel, key: str, monkeypatch: Any
) -> tuple[LoadedModel, HeldCalls, Any, int]:
    """Starts a stream on deterministic-test 1 whose third engine step never returns
    (until released); returns the version, the gate, the stream and the tokens it got."""
    model = service.registry.resolve(LM, "1")
    assert model.scheduler is not None
    engine = model.scheduler.engine
    gate = HeldCalls(free=2)  # its prefill and one decode step run
    monkeypatch.setattr(engine, "forward", gate.wrap(engine.forward))
    stream = v1_rpc.InferenceServiceStub(channel).Generate(_generate("1"), metadata=_identity(key))
    received = 0
    while received < 2:
        message = await stream.read()
        assert isinstance(message, v1.GenerateResponse)
        received += len(message.token_ids)
    await _until(gate.held)
    return model, gate, stream, received


async def test_an_unload_returns_within_its_bound_while_an_engine_step_hangs(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scheduler.stop gives a step that never returns SCHEDULER_JOIN_S, then returns:
    # the version is gone, new requests were refused retryably meanwhile, and what
    # the held stream got is all it is billed.
    settings = inference_settings(tmp_path, redis_url, grace_s=GRACE_S)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        stub = v1_rpc.InferenceServiceStub(channel)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        key, late = _key(), _key()
        model, gate, stream, received = await _hold_a_running_stream(
            service, channel, key, monkeypatch
        )
        try:
            unloading = asyncio.ensure_future(
                admin.UnloadModel(
                    v1.UnloadModelRequest(model=LM, version="1"), metadata=mtls.EDGE_FOR_ADMIN
                )
            )
            await _until(_unloading(model))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(_generate("1"), metadata=_identity(late)).read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _reason(refused.value) == "MODEL_UNLOADING"
            await asyncio.wait_for(unloading, GRACE_S + SCHEDULER_JOIN_S + SLACK_S)
            assert not service.registry.has(LM, "1")
            assert _engine_threads(LM, "1") == 1  # still in its call: released below
            # The unload ended the held stream (MODEL_UNLOADED): billed what it got.
            events = await _shipped_events(redis_url, settings.usage_stream, key, channel)
            assert [(e.finish_reason, e.usage.completion_tokens) for e in events] == [
                ("error", received)
            ]
            late_events = await _shipped_events(redis_url, settings.usage_stream, late, channel)
            assert late_events == []  # refused: nothing ran, nothing billed
        finally:
            gate.release.set()

        async def thread_ended() -> bool:
            return _engine_threads(LM, "1") == 0

        await _until(thread_ended, 5)  # its call returned: the thread is not left running


async def test_a_stream_held_by_a_hung_engine_step_ends_unloaded_with_its_unload(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The unload returned and the version is gone, but the stream it held waited
    # for good (only the caller's deadline ended it), even once the step returned.
    settings = inference_settings(tmp_path, redis_url, grace_s=GRACE_S)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        key = _key()
        _, gate, stream, received = await _hold_a_running_stream(service, channel, key, monkeypatch)
        try:
            await asyncio.wait_for(
                admin.UnloadModel(
                    v1.UnloadModelRequest(model=LM, version="1"), metadata=mtls.EDGE_FOR_ADMIN
                ),
                GRACE_S + SCHEDULER_JOIN_S + SLACK_S,
            )
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                final = await asyncio.wait_for(stream.read(), SLACK_S)
                assert final.finish_reason == "error"
                assert final.usage.completion_tokens == received
                await asyncio.wait_for(stream.read(), SLACK_S)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _reason(ended.value) == "MODEL_UNLOADED"
            events = await _shipped_events(redis_url, settings.usage_stream, key, channel)
            assert [(e.finish_reason, e.usage.completion_tokens) for e in events] == [
                ("error", received)
            ]
        finally:
            stream.cancel()
            gate.release.set()


# ------------------------------------------------------------------ embedding versions


async def test_an_unload_ends_an_embed_whose_engine_call_hangs(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Embedder.stop gave up on the held chunk after CHUNK_WAIT_S, but the embed
    # waiting for it was left waiting for good (only its caller's deadline ended it).
    monkeypatch.setattr(embedder_module, "CHUNK_WAIT_S", CHUNK_WAIT_S)
    settings = inference_settings(
        tmp_path, redis_url, models=(f"{EMBEDDINGS}:1",), test_models=(), grace_s=GRACE_S
    )
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        stub = v1_rpc.InferenceServiceStub(channel)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        model = service.registry.resolve(EMBEDDINGS, "1")
        embedder = model.embedder
        assert embedder is not None
        gate = HeldCalls()
        monkeypatch.setattr(embedder.engine, "embed", gate.wrap(embedder.engine.embed))
        try:
            held = asyncio.ensure_future(
                stub.Embed(v1.EmbedRequest(model=EMBEDDINGS, inputs=["held", "inputs"]))
            )
            await _until(gate.held)
            threads = _embed_threads()  # its compute thread among them, in the held call
            unloading = asyncio.ensure_future(
                admin.UnloadModel(
                    v1.UnloadModelRequest(model=EMBEDDINGS, version="1"),
                    metadata=mtls.EDGE_FOR_ADMIN,
                )
            )
            await _until(_unloading(model))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Embed(v1.EmbedRequest(model=EMBEDDINGS, inputs=["late"]))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _reason(refused.value) == "MODEL_UNLOADING"
            await asyncio.wait_for(unloading, GRACE_S + CHUNK_WAIT_S + SLACK_S)
            assert not service.registry.has(EMBEDDINGS, "1")
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(held, SLACK_S)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _reason(ended.value) == "MODEL_UNLOADED"
            assert embedder.in_flight == 0 and _embed_threads() == threads
        finally:
            gate.release.set()

        async def thread_ended() -> bool:
            return _embed_threads() == threads - 1

        await _until(thread_ended, 5)


async def test_an_embed_refused_by_an_unloading_version_bills_nothing(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A generation refused MODEL_UNLOADING releases its reservation, no event; an
    # embed refused alike was billed every input token.
    monkeypatch.setattr(embedder_module, "CHUNK_WAIT_S", CHUNK_WAIT_S)
    settings = inference_settings(tmp_path, redis_url, models=(f"{EMBEDDINGS}:1",), grace_s=GRACE_S)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        stub = v1_rpc.InferenceServiceStub(channel)
        model = service.registry.resolve(EMBEDDINGS, "1")
        assert model.embedder is not None
        gate = HeldCalls()
        engine = model.embedder.engine
        monkeypatch.setattr(engine, "embed", gate.wrap(engine.embed))
        late = _key()
        try:
            held = asyncio.ensure_future(
                stub.Embed(v1.EmbedRequest(model=EMBEDDINGS, inputs=["held"]))
            )
            await _until(gate.held)
            unloading = asyncio.ensure_future(
                v1_rpc.InferenceAdminServiceStub(channel).UnloadModel(
                    v1.UnloadModelRequest(model=EMBEDDINGS, version="1"),
                    metadata=mtls.EDGE_FOR_ADMIN,
                )
            )
            await _until(_unloading(model))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Embed(
                    v1.EmbedRequest(model=EMBEDDINGS, inputs=["late input"]),
                    metadata=_identity(late),
                )
            assert _reason(refused.value) == "MODEL_UNLOADING"
            events = await _shipped_events(redis_url, settings.usage_stream, late, channel)
            assert sum(e.usage.total_tokens for e in events) == 0
        finally:
            gate.release.set()
            await asyncio.gather(held, unloading, return_exceptions=True)


# ------------------------------------------------------------------ the worker's exit


def hung_worker(redis_url: str, tmp: str) -> None:
    """Serves both kinds of version with a held engine call and a request in each, then
    leaves as a SIGTERM does; prints "held" once both calls hang (a child process)."""
    embedder_module.CHUNK_WAIT_S = CHUNK_WAIT_S
    Scheduler.STOP_JOIN_S = SCHEDULER_JOIN_S
    run(lambda: _serve_held(redis_url, Path(tmp)))


async def _serve_held(redis_url: str, tmp: Path) -> None:
    settings = inference_settings(
        tmp,
        redis_url,
        models=(f"{EMBEDDINGS}:1",),
        test_models=(f"{LM}:1",),
        grace_s=GRACE_S,
    )
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        gates = []
        for model in service.registry.all():
            gate = HeldCalls()  # never released
            if model.scheduler is not None:
                model.scheduler.engine.forward = gate.wrap(  # type: ignore[method-assign]
                    model.scheduler.engine.forward
                )
            if model.embedder is not None:
                model.embedder.engine.embed = gate.wrap(  # type: ignore[method-assign]
                    model.embedder.engine.embed
                )
            gates.append(gate)
        stub = v1_rpc.InferenceServiceStub(channel)
        calls = [
            stub.Generate(_generate("1")),
            stub.Embed(v1.EmbedRequest(model=EMBEDDINGS, inputs=["held"])),
        ]
        for gate in gates:
            await _until(gate.held)
        print("held", flush=True)
        for call in calls:
            call.cancel()


async def test_a_worker_exits_within_its_bound_while_engine_calls_hang(
    tmp_path: Path, redis_url: str
) -> None:
    # The embedder's bounded wait left a thread of the loop's default executor
    # joining the held compute thread: asyncio.run's shutdown then waited for it
    # for good, and the interpreter's exit joined the compute thread too.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from tests.integration.test_hung_engine import hung_worker; "
        "hung_worker(sys.argv[1], sys.argv[2])",
        redis_url,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"held\n"
        left = time.monotonic()
        code = await asyncio.wait_for(
            child.wait(), GRACE_S + SCHEDULER_JOIN_S + CHUNK_WAIT_S + 2 * SLACK_S
        )
        assert code == 0, f"exit status {code} after {time.monotonic() - left:.1f}s"
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
