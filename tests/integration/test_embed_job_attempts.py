"""A job item's Embed attempt that is cut is recorded apart; the run that answers is billed.

The jobs service tries an item again under the same `<job>:<n>` id, and the meter
keeps the first event of an id. Embed appended its usage event directly (not
through Admission.record, which sets a cut job attempt apart): the cut attempt took
the item's id with its full prompt billed, and the meter dropped the retry that
answered. A real worker (the real all-minilm-l6-v2), its usage stream in a real
Redis and the real meter; the engine's call is held (or fails) to cut an attempt.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.inference.budget import TokenBudgets
from services.inference.service import InferenceService
from services.usage.meter import Meter, Retention, bucket_key, bucket_start
from tests import mtls
from tests.integration.conftest import inference_settings, month_charged, start_inference
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

P = ParamSpec("P")
T = TypeVar("T")

EMBEDDINGS = "all-minilm-l6-v2"
TIMEOUT_S = 20.0  # for the conditions below, on a loaded 2-core machine


class FirstCall:
    """Holds (or fails) an engine method's first call; lets the later ones through.

    Only the embedder's compute thread calls the wrapped method (one call at a time).
    """

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.entered = threading.Event()  # the first call began
        self.release = threading.Event()  # a held first call may go on

    def wrap(self, call: Callable[P, T]) -> Callable[P, T]:
        def first(*args: P.args, **kwargs: P.kwargs) -> T:
            if not self.entered.is_set():
                self.entered.set()
                if self.fail:
                    raise RuntimeError("the engine failed")  # as a broken runtime would
                self.release.wait()
            return call(*args, **kwargs)

        return first


async def _until(condition: Callable[[], Any], what: str) -> Any:
    """Returns `await condition()` once truthy, polling up to TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (result := await condition()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)
    return result


async def _events(client: aioredis.Redis, stream: str, request_id: str) -> list[Any]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream))
    events = [inference_pb2.UsageEvent.FromString(f[b"event"]) for _, f in entries]
    return [e for e in events if e.request_id == request_id]


async def _month_used(budgets: TokenBudgets, key: str) -> int:
    return await month_charged(budgets.redis, key)


@pytest.mark.parametrize("cut", ["deadline", "engine error"])
async def test_a_job_embed_cut_then_tried_again_is_billed_its_served_run(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    item_id = f"job-{uuid.uuid4().hex[:8]}:0"  # the meter's dedupe markers outlive a test
    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = [
        (contract.KEY_ID_HEADER, key),
        ("x-tokenmesh-scopes", "inference:embed"),
        (contract.MONTHLY_TOKENS_HEADER, "100000"),
    ]
    item = v2.EmbedRequest(model=EMBEDDINGS, inputs=["hello world"] * 4, request_id=item_id)
    settings = inference_settings(tmp_path, redis_url, models=(f"{EMBEDDINGS}:1",), test_models=())
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    gate = FirstCall(fail=cut == "engine error")
    try:
        async with await start_inference(settings) as (service, _):
            assert isinstance(service, InferenceService)
            embedder = service.registry.resolve(EMBEDDINGS, "1").embedder
            assert embedder is not None
            monkeypatch.setattr(embedder.engine, "embed", gate.wrap(embedder.engine.embed))
            assert service._running is not None  # noqa: SLF001
            port = service._running.port  # noqa: SLF001 - the bound port
            async with mtls.aio_channel(port, peer="worker", caller="jobs") as channel:
                stub = v2_rpc.InferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as first:
                    # The jobs service's call timeout ends a held attempt.
                    await stub.Embed(item, metadata=owner, timeout=1.0)
                expected = "DEADLINE_EXCEEDED" if cut == "deadline" else "INTERNAL"
                assert first.value.code().name == expected
                stream = settings.usage_stream
                await _until(lambda: _events(client, stream, item_id), "the cut attempt's event")
                gate.release.set()
                reply = await stub.Embed(item, metadata=owner)
                events = await _until(
                    lambda: _has(client, stream, item_id, 2), "the served run's event"
                )
        prompt_tokens = reply.usage.prompt_tokens
        assert prompt_tokens > 0
        cut_run, served = events
        assert cut_run.finish_reason == ("cancelled" if cut == "deadline" else "error")
        assert cut_run.event_id.startswith(f"{item_id}{contract.UNFINISHED_ATTEMPT_MARK}")
        assert cut_run.usage.total_tokens == 0
        assert cut_run.served_usage.prompt_tokens == prompt_tokens  # what it was given
        assert (served.event_id, served.finish_reason) == (item_id, "stop")
        assert served.usage.prompt_tokens == prompt_tokens

        # The meter bills the item once, its served run (it kept the cut one).
        meter = Meter(client, stream, "meter", "c1", Retention())
        await meter.ensure_group()

        async def applied() -> bool:
            await meter.run_once(block_ms=50)
            return meter.applied_total == 2

        await _until(applied, "both events metered")
        day = bucket_key(f"key:{key}", "day", bucket_start(served.finish_unix_ms / 1000, "day"))
        counts = cast(dict[bytes, bytes], await client.hgetall(day))
        row = {k.decode(): int(v) for k, v in counts.items()}
        model = f"{EMBEDDINGS}|1"
        assert row[f"{model}|requests"] == 1
        assert row[f"{model}|prompt"] == prompt_tokens
        assert row[f"{model}|fr:stop"] == 1
        assert f"{model}|fr:{cut_run.finish_reason}" not in row
        # The budget, reconciled in the background, agrees with the meter.
        await _until(
            lambda: _charged(budgets, key, prompt_tokens), "the budget charged the served run"
        )
    finally:
        gate.release.set()
        await client.aclose()


async def test_an_embed_whose_caller_left_is_recorded_cancelled(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a job item: its own usage id, billed its inputs as before, but recorded as
    `cancelled` (it read `error`: a caller's deadline counted as a worker failure)."""
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    key = f"key_{uuid.uuid4().hex[:8]}"
    request = v2.EmbedRequest(model=EMBEDDINGS, inputs=["left early"], request_id=request_id)
    settings = inference_settings(tmp_path, redis_url, models=(f"{EMBEDDINGS}:1",), test_models=())
    client = aioredis.from_url(redis_url)
    gate = FirstCall(fail=False)
    try:
        async with await start_inference(settings) as (service, channel):
            assert isinstance(service, InferenceService)
            embedder = service.registry.resolve(EMBEDDINGS, "1").embedder
            assert embedder is not None
            monkeypatch.setattr(embedder.engine, "embed", gate.wrap(embedder.engine.embed))
            stub = v2_rpc.InferenceServiceStub(channel)
            metadata = [(contract.KEY_ID_HEADER, key), ("x-tokenmesh-scopes", "inference:embed")]
            with pytest.raises(grpc.aio.AioRpcError) as left:
                await stub.Embed(request, metadata=metadata, timeout=1.0)
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = settings.usage_stream
            events = await _until(lambda: _events(client, stream, request_id), "its event")
            gate.release.set()
        (event,) = events
        assert event.finish_reason == "cancelled"
        assert event.event_id != request_id  # an edge caller's id is not its usage id
        assert contract.UNFINISHED_ATTEMPT_MARK not in event.event_id
        assert event.usage.prompt_tokens > 0
    finally:
        gate.release.set()
        await client.aclose()


async def _has(client: aioredis.Redis, stream: str, request_id: str, count: int) -> list[Any]:
    events = await _events(client, stream, request_id)
    return events if len(events) >= count else []


async def _charged(budgets: TokenBudgets, key: str, tokens: int) -> bool:
    return await _month_used(budgets, key) == tokens
