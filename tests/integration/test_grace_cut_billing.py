"""A call still computing when its worker's shutdown grace ends, on a real worker.

A unary call's headers leave with its answer (services.core.interceptors,
HeadersAtEnd; the OpenAI servicer's _ResponseContext for a call without
`stream`), so the stop cuts it with a trailers-only UNAVAILABLE, which the
edge's retry policy tries again on another worker, billed there. The stopping
worker billed the cut run as well (its tokens so far), charged the key's budget
for it and kept its request count: one answer billed twice. It now records
the cut try apart (usage 0, `served_usage` what it computed), gives its
reservation and its count back; so does an Embed, an OpenAI stream that sent
no chunk yet (its headers held), and every prompt of a legacy completion's
several, one that had ended before the cut too. A v1/v2 stream sent its
headers when it started: Envoy does not retry it, and it stays billed what it
sent; the worker ends it in-band shortly before the grace is over (a final
message with `error`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import contract
from services.core.server import serving
from services.inference import embedder as embedder_module
from services.inference.budget import TokenBudgets
from services.inference.service import InferenceService
from tests import mtls
from tests.integration.conftest import inference_settings, month_charged, start_inference
from tests.integration.test_hung_engine import EMBEDDINGS, HeldCalls
from tests.integration.test_inference_model_lifecycle import _reason
from tests.prompts import unique_prompt
from tokenmesh.inference.v1 import inference_pb2 as usage_pb
from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as v2_inference_pb
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

MODEL = "deterministic-test"
MAX_TOKENS = 200  # 50 ms a step: 10 s, far past the grace
Call = Callable[[grpc.aio.Channel, list[tuple[str, str]]], Awaitable[Any]]


def _body(**fields: Any) -> HttpBody:
    return HttpBody(content_type="application/json", data=json.dumps(fields).encode())


async def _v1(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    request = v1_pb.CompleteRequest(model=MODEL, prompt=unique_prompt("v1"), max_tokens=MAX_TOKENS)
    return await v1_rpc.InferenceServiceStub(channel).Complete(request, metadata=identity)


async def _v2(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    request = v2_pb.CompleteRequest(
        model=MODEL, prompt=unique_prompt("v2"), max_output_tokens=MAX_TOKENS
    )
    request.sampling.seed = 3  # deterministic: with the cache on, it leads a computation
    return await v2_rpc.InferenceServiceStub(channel).Complete(request, metadata=identity)


async def _read_all(call: AsyncIterable[Any]) -> list[Any]:
    return [message async for message in call]


async def _openai_chat(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    messages = [{"role": "user", "content": unique_prompt("chat")}]
    body = _body(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
    stub = openai_rpc.OpenAIServiceStub(channel)
    return await _read_all(stub.CreateChatCompletion(body, metadata=identity))


async def _openai_prompts(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    # Several prompts: computed at once, their usage events held until all end.
    prompts = [unique_prompt("one"), unique_prompt("two")]
    body = _body(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS)
    stub = openai_rpc.OpenAIServiceStub(channel)
    return await _read_all(stub.CreateCompletion(body, metadata=identity))


def _identity(key: str) -> list[tuple[str, str]]:
    return [
        (contract.KEY_ID_HEADER, key),
        (contract.RPM_HEADER, "1000"),
        (contract.MONTHLY_TOKENS_HEADER, "1000000"),
    ]


async def _month_used(budgets: TokenBudgets, key: str) -> int:
    return await month_charged(budgets.redis, key)


async def _computing(budgets: TokenBudgets, service: InferenceService, key: str) -> None:
    """Waits until the key's call reserved its tokens and its first token was computed."""
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    async with asyncio.timeout(10):
        while not (
            await _month_used(budgets, key) > 0 and any(s.stats()["running"] for s in schedulers)
        ):
            await asyncio.sleep(0.01)


async def _key_events(client: aioredis.Redis, stream: str, key: str) -> list[Any]:
    entries: Any = await client.xrange(stream)
    events = [usage_pb.UsageEvent.FromString(f[b"event"]) for _, f in entries]
    return [e for e in events if e.key_id == key]


async def _running(service: InferenceService, count: int) -> None:
    """Waits until `count` sequences or more compute on the worker."""
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    async with asyncio.timeout(10):
        while sum(s.stats()["running"] for s in schedulers) < count:
            await asyncio.sleep(0.01)


#: Waits (given the key's budgets, the worker and the key) until the worker may stop.
Ready = Callable[[TokenBudgets, InferenceService, str], Awaitable[None]]


async def _cut_at_stop(
    tmp_path: Path,
    redis_url: str,
    call: Call,
    ready: Ready = _computing,
    beside: Sequence[Call] = (),
    **settings_overrides: Any,
) -> tuple[Any, list[Any], int, int]:
    """Runs `call` on a worker (grace 0.5 s, 50 ms a token) and stops the worker once
    `ready` (while it computes); returns what the caller got (its answer or error), the
    key's usage events (shipped before the worker stopped), its month and its request
    count. `beside`: calls of another key started with it."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {"grace_s": 0.5, "test_engine_step_ms": 50.0}
    overrides.update(settings_overrides)
    settings = inference_settings(tmp_path, redis_url, **overrides)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    service = InferenceService(settings)
    channel: grpc.aio.Channel | None = None
    others: list[asyncio.Future[Any]] = []
    try:
        async with serving(service, settings) as server:
            # Open past the block: the caller reads the stopping server's own answer.
            channel = mtls.aio_channel(server.port, peer="worker")
            other = _identity(f"key_{uuid.uuid4().hex[:8]}")
            others = [asyncio.ensure_future(c(channel, other)) for c in beside]
            await _running(service, len(beside))  # they hold their slots first
            task = asyncio.ensure_future(call(channel, _identity(key)))
            await ready(budgets, service, key)
        # Left: drained, the grace (0.5 s) ended with the call computing, stopped.
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        events = await _key_events(client, settings.usage_stream, key)
        window = int(await client.zcard(f"tm:ratelimit:rpm:{key}"))
        return outcome, events, await _month_used(budgets, key), window
    finally:
        await asyncio.gather(*others, return_exceptions=True)
        if channel is not None:
            await channel.close()
        await client.aclose()


@pytest.mark.parametrize(
    "call",
    [_v1, _v2, _openai_chat, _openai_prompts],
    ids=["v1-complete", "v2-complete", "openai-chat", "openai-completion-prompts"],
)
async def test_a_unary_call_cut_by_the_shutdown_is_billed_nothing_there(
    tmp_path: Path, redis_url: str, call: Call
) -> None:
    outcome, events, month, window = await _cut_at_stop(tmp_path, redis_url, call)
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    assert not outcome.initial_metadata()  # trailers-only: the edge tries it again
    # Recorded apart: audited with what it computed, billed nothing (the retry is).
    assert events, "the cut call recorded no usage event"
    assert all(e.usage.total_tokens == 0 for e in events), [e.usage for e in events]
    assert all(contract.UNFINISHED_ATTEMPT_MARK in e.event_id for e in events)
    assert sum(e.served_usage.completion_tokens for e in events) > 0
    assert month == 0  # its reservation given back
    assert window == 0  # its request count given back: the retry's counts


async def test_a_unary_call_leading_a_shared_computation_is_billed_nothing_there(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the response cache on, a deterministic Complete leads its computation."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    outcome, events, month, window = await _cut_at_stop(tmp_path, redis_url, _v2)
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    assert events and all(e.usage.total_tokens == 0 for e in events)
    assert (month, window) == (0, 0)


def _assert_cut_and_billed_nothing(
    outcome: Any, events: list[Any], month: int, window: int
) -> None:
    """A call the edge tries again: trailers-only UNAVAILABLE, every event of it apart
    with usage 0, its reservation and its request count given back."""
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    assert not outcome.initial_metadata()  # trailers-only: the edge tries it again
    assert events, "the cut call recorded no usage event"
    assert all(e.usage.total_tokens == 0 for e in events), [e.usage for e in events]
    assert all(contract.UNFINISHED_ATTEMPT_MARK in e.event_id for e in events)
    assert (month, window) == (0, 0)


# Fixed prompts: at temperature 0 their answers are the same every run.
PROMPTS = ["first prompt stops early", "second prompt runs on"]


async def _greedy_answers(tmp_path: Path, redis_url: str) -> list[str]:
    """Returns PROMPTS' answers at temperature 0 (a quick worker of its own)."""
    settings = inference_settings(
        tmp_path / "greedy", redis_url, usage_stream=f"usage-test:{uuid.uuid4().hex}"
    )
    async with await start_inference(settings) as (_, channel):
        body = _body(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
        parts = await _read_all(openai_rpc.OpenAIServiceStub(channel).CreateCompletion(body))
    return [c["text"] for c in json.loads(b"".join(p.data for p in parts))["choices"]]


def _stop_early(first: str, second: str) -> str:
    """Returns a stop sequence that ends the first answer after 4 tokens or more and
    never the second: a phrase of the first answer's words the second never says."""
    words = first.split()
    for length in range(1, 6):
        for start in range(3, len(words) - length):
            phrase = " " + " ".join(words[start : start + length])
            at = first.find(phrase)
            if phrase not in second and len(first[:at].split()) >= 3:
                return phrase
    raise AssertionError(f"no phrase of {first!r} that {second!r} never says")


async def _one_prompt_ended(budgets: TokenBudgets, service: InferenceService, key: str) -> None:
    """Waits until both prompts computed and then one of them ended (stopped), the
    other still computing."""
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    both = False
    async with asyncio.timeout(10):
        while True:
            running = sum(s.stats()["running"] for s in schedulers)
            both = both or running == 2
            if both and running == 1:
                return
            await asyncio.sleep(0.005)


async def test_a_completion_of_several_prompts_cut_after_one_ended_is_billed_nothing_there(
    tmp_path: Path, redis_url: str
) -> None:
    """The edge tries all of its prompts again: the one that had ended before the cut
    was billed here as well (held, then recorded as any answered prompt)."""
    first, second = await _greedy_answers(tmp_path, redis_url)
    stop = _stop_early(first, second)

    async def call(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
        body = _body(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
        stub = openai_rpc.OpenAIServiceStub(channel)
        return await _read_all(stub.CreateCompletion(body, metadata=identity))

    outcome, events, month, window = await _cut_at_stop(
        tmp_path, redis_url, call, _one_prompt_ended
    )
    assert sorted(e.finish_reason for e in events) == ["cancelled", "stop"], events
    _assert_cut_and_billed_nothing(outcome, events, month, window)


async def _busy(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    """Holds version 1's only slot (max_sequences=1) past the grace."""
    request = v2_pb.CompleteRequest(
        model=MODEL, version="1", prompt=unique_prompt("busy"), max_output_tokens=MAX_TOKENS
    )
    return await v2_rpc.InferenceServiceStub(channel).Complete(request, metadata=identity)


async def _waiting_for_the_slot(budgets: TokenBudgets, service: InferenceService, key: str) -> None:
    """Waits until the key's call reserved its tokens and waits behind the busy one."""
    scheduler = service.registry.resolve(MODEL, "1").scheduler
    assert scheduler is not None
    async with asyncio.timeout(10):
        while not (await _month_used(budgets, key) > 0 and scheduler.stats()["waiting"] == 1):
            await asyncio.sleep(0.01)


async def test_an_openai_stream_cut_before_its_first_chunk_is_billed_nothing_there(
    tmp_path: Path, redis_url: str
) -> None:
    """Its headers wait for its first chunk: cut before it (queued, or in its prefill),
    it ends trailers-only, and the edge tries it again elsewhere. It was billed its
    prompt here (all of a long prompt computed in its prefill), and there."""

    async def stream(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
        messages = [{"role": "user", "content": unique_prompt("waits")}]
        body = _body(model=f"{MODEL}@1", messages=messages, max_tokens=50, stream=True)
        stub = openai_rpc.OpenAIServiceStub(channel)
        return await _read_all(stub.CreateChatCompletion(body, metadata=identity))

    outcome, events, month, window = await _cut_at_stop(
        tmp_path, redis_url, stream, _waiting_for_the_slot, beside=[_busy], max_sequences=1
    )
    _assert_cut_and_billed_nothing(outcome, events, month, window)


async def test_an_embed_cut_by_the_shutdown_is_billed_nothing_there(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its request count was given back (trailers-only: the edge tries it again), but
    it stayed billed every input token."""
    monkeypatch.setattr(embedder_module, "CHUNK_WAIT_S", 0.5)  # the stop's wait for it
    gate = HeldCalls()  # its engine call outlives the grace
    gated = asyncio.Event()

    async def embed(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
        await gated.wait()
        request = v1_pb.EmbedRequest(model=EMBEDDINGS, inputs=[unique_prompt("embed")])
        return await v1_rpc.InferenceServiceStub(channel).Embed(request, metadata=identity)

    async def held(budgets: TokenBudgets, service: InferenceService, key: str) -> None:
        embedder = service.registry.resolve(EMBEDDINGS, "1").embedder
        assert embedder is not None
        monkeypatch.setattr(embedder.engine, "embed", gate.wrap(embedder.engine.embed))
        gated.set()
        async with asyncio.timeout(10):
            while not (gate.holding.is_set() and await _month_used(budgets, key) > 0):
                await asyncio.sleep(0.01)

    try:
        outcome, events, month, window = await _cut_at_stop(
            tmp_path, redis_url, embed, held, models=(f"{EMBEDDINGS}:1",), test_models=()
        )
    finally:
        gate.release.set()
    assert [e.finish_reason for e in events] == ["cancelled"]
    assert events[0].served_usage.prompt_tokens > 0  # audited: what it was to embed
    _assert_cut_and_billed_nothing(outcome, events, month, window)


async def test_an_embed_cut_by_its_versions_unload_is_billed_nothing_there(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embed computing when its version unloads ends MODEL_UNLOADED with its headers
    held (they leave with its vectors): trailers-only, which the edge tries again on
    another worker (`retry_on: unavailable`). It was billed every input token here
    too, and its budget charged: one answer billed twice."""
    monkeypatch.setattr(embedder_module, "CHUNK_WAIT_S", 0.5)  # the unload's wait for it
    key = f"key_{uuid.uuid4().hex[:8]}"
    settings = inference_settings(
        tmp_path, redis_url, grace_s=0.5, models=(f"{EMBEDDINGS}:1",), test_models=()
    )
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    gate = HeldCalls()  # its engine call outlives the unload's drain
    service = InferenceService(settings)
    try:
        async with serving(service, settings) as server:
            embedder = service.registry.resolve(EMBEDDINGS, "1").embedder
            assert embedder is not None
            monkeypatch.setattr(embedder.engine, "embed", gate.wrap(embedder.engine.embed))
            async with mtls.aio_channel(server.port, peer="worker") as channel:
                request = v1_pb.EmbedRequest(model=EMBEDDINGS, inputs=[unique_prompt("embed")])
                call = v1_rpc.InferenceServiceStub(channel).Embed(request, metadata=_identity(key))
                task = asyncio.ensure_future(call)
                async with asyncio.timeout(10):
                    while not (gate.holding.is_set() and await _month_used(budgets, key) > 0):
                        await asyncio.sleep(0.01)
                await service.unload(EMBEDDINGS, "1")
                outcome = (await asyncio.gather(task, return_exceptions=True))[0]
            gate.release.set()
            async with asyncio.timeout(10):  # shipped, and its reservation settled
                while not (
                    await _key_events(client, settings.usage_stream, key)
                    and not any([await client.hlen(k) async for k in _open_keys(client)])
                ):
                    await asyncio.sleep(0.02)
        events = await _key_events(client, settings.usage_stream, key)
        window = int(await client.zcard(f"tm:ratelimit:rpm:{key}"))
        month = await _month_used(budgets, key)
    finally:
        gate.release.set()
        await client.aclose()
    _assert_cut_and_billed_nothing(outcome, events, month, window)
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert _reason(outcome) == "MODEL_UNLOADED"
    assert events[0].served_usage.prompt_tokens > 0  # audited: what it was to embed


def _open_keys(client: aioredis.Redis) -> Any:
    """The holders' open reservations (a reconcile or a release empties its field)."""
    return client.scan_iter(match="tm:budget:open:*")


async def _read_stream(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError | None]:
    """Returns a stream's messages and the error it ended with (None: it ended OK)."""
    messages: list[Any] = []
    try:
        async for message in call:
            messages.append(message)
    except grpc.aio.AioRpcError as error:
        return messages, error
    return messages, None


async def _v2_stream(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    request = v2_pb.GenerateRequest(
        model=MODEL, prompt=unique_prompt("stream"), max_output_tokens=MAX_TOKENS
    )
    stub = v2_rpc.InferenceServiceStub(channel)
    return await _read_stream(stub.Generate(request, metadata=identity))


async def _v1_stream(channel: grpc.aio.Channel, identity: list[tuple[str, str]]) -> Any:
    request = v1_pb.GenerateRequest(
        model=MODEL, prompt=unique_prompt("v1 stream"), max_tokens=MAX_TOKENS
    )
    stub = v1_rpc.InferenceServiceStub(channel)
    return await _read_stream(stub.Generate(request, metadata=identity))


def _in_band_reason(message: Any) -> str:
    """Returns the ErrorInfo reason of a final message's in-band error (v1 or v2)."""
    error = message.error
    if isinstance(error, usage_pb.StreamError):
        return str(error.reason)
    for detail in error.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


@pytest.mark.parametrize(
    ("call", "error_reason"),
    [(_v2_stream, v2_inference_pb.FINISH_REASON_ERROR), (_v1_stream, "error")],
    ids=["v2-generate", "v1-generate"],
)
async def test_a_stream_still_running_at_the_grace_end_ends_in_band_billed_what_it_sent(
    tmp_path: Path, redis_url: str, call: Call, error_reason: Any
) -> None:
    """Its headers went out when it started: Envoy does not try it again. grpc cut it
    at the grace's end (UNAVAILABLE "Cancelling all calls", no final message, as a
    crash); the worker now ends it shortly before, with a final message."""
    outcome, events, month, window = await _cut_at_stop(tmp_path, redis_url, call)
    messages, error = outcome
    assert messages and error is not None, outcome
    last = messages[-1]
    assert last.finish_reason == error_reason, last
    assert last.HasField("error") and _in_band_reason(last) == "WORKER_STOPPING", last
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(error) == "WORKER_STOPPING", error.details()
    # Billed what it sent, as before (the client sends it again, billed again).
    assert [e.finish_reason for e in events] == ["error"]
    billed = events[0].usage
    assert billed.completion_tokens == sum(len(m.token_ids) for m in messages) > 0
    assert contract.UNFINISHED_ATTEMPT_MARK not in events[0].event_id
    assert month == billed.total_tokens
    assert window == 1


async def _stopping(channel: grpc.aio.Channel) -> None:
    """Waits until the worker drained and its server stops: its health is NOT_SERVING,
    or the stopping server refuses the check."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # grpcio's stubs are untyped
    async with asyncio.timeout(10):
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest())
            except grpc.aio.AioRpcError:
                return
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            await asyncio.sleep(0.01)


async def test_a_call_its_client_cancels_while_the_worker_drains_stays_billed(
    tmp_path: Path, redis_url: str
) -> None:
    """Only the grace's end cuts: a client that gives up during it is not retried by
    the edge, and its call is billed what it computed, as any cancelled call."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    settings = inference_settings(tmp_path, redis_url, grace_s=20.0, test_engine_step_ms=50.0)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    service = InferenceService(settings)
    leave = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def worker() -> None:
        async with serving(service, settings) as server:
            port.set_result(server.port)
            await leave.wait()

    running = asyncio.ensure_future(worker())
    try:
        async with mtls.aio_channel(await port, peer="worker") as channel:
            request = v1_pb.CompleteRequest(
                model=MODEL, prompt=unique_prompt("left"), max_tokens=MAX_TOKENS
            )
            call = v1_rpc.InferenceServiceStub(channel).Complete(request, metadata=_identity(key))
            await _computing(budgets, service, key)
            leave.set()
            await _stopping(channel)
            call.cancel()
            async with asyncio.timeout(15):  # the server stops once no call is left
                await running
        events = await _key_events(client, settings.usage_stream, key)
        assert [e.finish_reason for e in events] == ["cancelled"]
        assert events[0].usage.total_tokens > 0
        assert contract.UNFINISHED_ATTEMPT_MARK not in events[0].event_id
        assert await _month_used(budgets, key) == events[0].usage.total_tokens
        assert await client.zcard(f"tm:ratelimit:rpm:{key}") == 1
    finally:
        leave.set()
        await asyncio.gather(running, return_exceptions=True)
        await client.aclose()


async def test_the_stop_waits_for_the_cut_calls_budget_reconcile_before_closing_redis(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut call gives its reservation back in a background reconcile as its handler
    unwinds, during the worker's stop. The stop closed Redis and returned without
    waiting for it (the process then exits): only a quick reconcile landed. A slow
    Redis round trip (0.5 s here) must not leave the reservation charged."""
    reconcile = TokenBudgets.reconcile

    async def slow_round_trip(self: TokenBudgets, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await reconcile(self, *args, **kwargs)

    monkeypatch.setattr(TokenBudgets, "reconcile", slow_round_trip)
    key = f"key_{uuid.uuid4().hex[:8]}"
    settings = inference_settings(tmp_path, redis_url, grace_s=0.5, test_engine_step_ms=50.0)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    service = InferenceService(settings)
    channel: grpc.aio.Channel | None = None
    try:
        async with serving(service, settings) as server:
            channel = mtls.aio_channel(server.port, peer="worker")
            task = asyncio.ensure_future(_v1(channel, _identity(key)))
            await _computing(budgets, service, key)
        # The worker has stopped: what it left in Redis is what it leaves at exit.
        assert await _month_used(budgets, key) == 0
        await asyncio.gather(task, return_exceptions=True)
    finally:
        if channel is not None:
            await channel.close()
        await client.aclose()


async def test_a_cache_leader_stream_queued_at_the_grace_end_ends_in_band(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the response cache on, a seeded stream leads a shared computation, which
    the pipeline tracked only from its first message: still queued when the worker
    ended its streams, it took the slot they freed, streamed, and grpc cut it at the
    grace's end ("Cancelling all calls", no final message)."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(
        tmp_path, redis_url, grace_s=2.0, test_engine_step_ms=50.0, max_sequences=1
    )
    service = InferenceService(settings)
    identity = _identity(f"key_{uuid.uuid4().hex[:8]}")
    running = v2_pb.GenerateRequest(model=MODEL, prompt=unique_prompt("runs"))
    running.max_output_tokens = MAX_TOKENS
    running.sampling.temperature = 0.7  # its own computation
    leader = v2_pb.GenerateRequest(model=MODEL, prompt=unique_prompt("leads"))
    leader.max_output_tokens = MAX_TOKENS
    leader.sampling.seed = 3  # deterministic: it leads a shared computation
    channel: grpc.aio.Channel | None = None
    try:
        async with serving(service, settings) as server:
            channel = mtls.aio_channel(server.port, peer="worker")
            stub = v2_rpc.InferenceServiceStub(channel)
            first = asyncio.ensure_future(_read_stream(stub.Generate(running, metadata=identity)))
            schedulers = [m.scheduler for m in service.registry.all() if m.scheduler]
            async with asyncio.timeout(10):
                while not (busy := [s for s in schedulers if s.stats()["running"]]):
                    await asyncio.sleep(0.01)
            (scheduler,) = busy
            second = asyncio.ensure_future(_read_stream(stub.Generate(leader, metadata=identity)))
            async with asyncio.timeout(10):
                while scheduler.stats()["waiting"] < 1:  # queued behind the first
                    await asyncio.sleep(0.01)
        for messages, error in (await first, await second):
            assert messages and error is not None
            assert messages[-1].HasField("error"), messages[-1]
            assert _in_band_reason(messages[-1]) == "WORKER_STOPPING"
            assert _reason(error) == "WORKER_STOPPING", error.details()
    finally:
        if channel is not None:
            await channel.close()


async def test_a_coalesced_stream_whose_leader_left_ends_in_band_at_the_grace_end(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower of a shared computation whose leader left: the leader's exit took the
    computation out of the streams the worker's stop ends in-band, so grpc cut the
    follower at the grace's end (UNAVAILABLE "Cancelling all calls", no final message)."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    settings = inference_settings(tmp_path, redis_url, grace_s=1.0, test_engine_step_ms=50.0)
    service = InferenceService(settings)
    request = v2_pb.GenerateRequest(
        model=MODEL, prompt=unique_prompt("shared"), max_output_tokens=MAX_TOKENS
    )
    request.sampling.seed = 3  # deterministic: cached, so coalesced
    identity = _identity(f"key_{uuid.uuid4().hex[:8]}")
    channel: grpc.aio.Channel | None = None
    try:
        async with serving(service, settings) as server:
            # Open past the block: the follower reads the stopping server's own end.
            channel = mtls.aio_channel(server.port, peer="worker")
            stub = v2_rpc.InferenceServiceStub(channel)
            leader = stub.Generate(request, metadata=identity)
            assert dict(await leader.initial_metadata())[contract.CACHE_HEADER] == "miss"
            await leader.read()
            follower = stub.Generate(request, metadata=identity)
            assert dict(await follower.initial_metadata())[contract.CACHE_HEADER] == "coalesced"
            reading = asyncio.ensure_future(_read_stream(follower))
            leader.cancel()
            assert service.cache is not None
            flights = service.cache.streams._flights  # noqa: SLF001 - its readers
            async with asyncio.timeout(10):  # the leader has left; the follower reads on
                while [f.waiters for f in flights.values()] != [1]:
                    await asyncio.sleep(0.01)
        # Left: drained, the grace (1 s) ended with the shared computation running.
        messages, error = await reading
    finally:
        if channel is not None:
            await channel.close()
    assert messages and error is not None
    last = messages[-1]
    assert last.HasField("error") and _in_band_reason(last) == "WORKER_STOPPING", last
