"""Coalesced requests on a real worker (cache on, real Redis): what each caller of a shared
computation gets and is billed is its own, whoever else reads it.

- The computation is queued with no deadline: each caller leaves at its own, the last
  cancels it. Queued with its leader's, a follower's stream ended with the leader's
  DEADLINE_EXCEEDED.
- A served answer bills the tokens its caller received (TOKENMESH_CACHE_BILLING=full):
  a Complete follower was billed the tokens an output rule held back from it.
- A caller that left while its headers were sent holds nothing and is billed nothing:
  a leader kept counting as a reader (its computation ran on for nobody), a follower
  was billed its prompt.

The callers that leave while their headers are sent run the worker's own pipeline
(GenerationPipeline, wired as the service wires it) with a stand-in for grpc's
context whose header send raises CancelledError, as grpc's does when the caller has
gone: a real RPC cannot be cancelled at that await on purpose.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.inference.admission import Admission
from services.inference.budget import TokenBudgets
from services.inference.pipeline.cache import COMPUTED_SEQUENCES
from services.inference.pipeline.content import ContentStage
from services.inference.pipeline.generate import GenerationPipeline
from services.inference.service import InferenceService
from services.inference.v2.servicer import V2_SURFACE
from services.router.policies import PolicyCatalog
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_inference_v2 import _usage_event
from tests.integration.test_response_cache_policy_hits import (
    _attach_output_rule,
    _complete_request,
    _flight_open,
    _generate_request,
    _identity,
    _read_stream,
)
from tests.prompts import unique_prompt
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
ENDED_WELL = {inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH}


async def _worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, billing: str, **settings: Any
) -> Any:
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_BILLING", billing)
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    # 20 ms a step: a computation lasts long enough for a second request to join it.
    return await start_inference(
        inference_settings(tmp_path, redis_url, test_engine_step_ms=20.0, **settings)
    )


@pytest.fixture
async def one_slot_worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[InferenceService, Any]]:
    """A worker computing one sequence at a time (a request's second choice queues)."""
    async with await _worker(tmp_path, redis_url, monkeypatch, "full", max_sequences=1) as pair:
        service, channel = pair
        yield service, rpc.InferenceServiceStub(channel)


@pytest.fixture
async def full_billing_worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[InferenceService, Any]]:
    async with await _worker(tmp_path, redis_url, monkeypatch, "full") as pair:
        service, channel = pair
        yield service, rpc.InferenceServiceStub(channel)


@pytest.fixture
async def catalog(redis_url: str) -> AsyncIterator[PolicyCatalog]:
    client = aioredis.from_url(redis_url)
    yield PolicyCatalog(client)
    await client.aclose()


def _seeded(prompt: str, request_id: str, max_tokens: int, n: int = 1) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=MODEL, prompt=prompt, max_output_tokens=max_tokens, n=n, request_id=request_id
    )
    request.sampling.seed = 3
    return request


async def _scheduler_idle(service: InferenceService) -> None:
    """Waits until no sequence runs or waits on the worker."""
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    async with asyncio.timeout(10):
        while any(s.stats()["running"] or s.stats()["waiting"] for s in schedulers):
            await asyncio.sleep(0.01)


async def _usage_events(service: InferenceService, request_id: str) -> list[Any]:
    client = aioredis.from_url(service.settings.redis_url)
    try:
        entries: Any = await client.xrange(service.settings.usage_stream)
        return [f[b"event"] for _, f in entries if f[b"request_id"].decode() == request_id]
    finally:
        await client.aclose()


# ---------------------------------------------------------------- the leader's deadline


async def test_a_follower_outlives_its_leader_s_deadline(one_slot_worker):
    # One slot: the request's second choice queues behind its first. The leader's
    # deadline passes while it is queued: the scheduler ended it with the leader's
    # DEADLINE_EXCEEDED, and the follower (no deadline) got it in mid-stream.
    service, stub = one_slot_worker
    prompt = unique_prompt("deadline")
    leader = stub.Generate(_seeded(prompt, "leader", 60, n=2), timeout=1.0)
    assert dict(await leader.initial_metadata())[contract.CACHE_HEADER] == "miss"
    await leader.read()  # computing: the follower joins it
    follower = stub.Generate(_seeded(prompt, "follower", 60, n=2))
    status, finals = await _read_stream(follower)
    assert status == "coalesced"
    assert await follower.code() == grpc.StatusCode.OK
    assert sorted(m.choice_index for m in finals) == [0, 1]
    assert {m.finish_reason for m in finals} <= ENDED_WELL
    assert not any(m.HasField("error") for m in finals)
    assert await leader.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its own deadline
    await _scheduler_idle(service)


async def test_a_lone_caller_s_deadline_still_frees_its_queued_computation(one_slot_worker):
    # Queued with no deadline, the computation ends when its last reader leaves: a
    # caller whose deadline passed while it waited leaves nothing in the queue.
    service, stub = one_slot_worker
    busy = stub.Generate(_seeded(unique_prompt("busy"), "busy", 400))
    await busy.read()  # holds the only slot for ~8 s
    late = stub.Generate(_seeded(unique_prompt("late"), "late", 10), timeout=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as left:
        async for _ in late:
            pass
    assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    assert service.cache is not None
    async with asyncio.timeout(5):  # long before the busy stream ends
        while any(s.stats()["waiting"] for s in schedulers) or len(service.cache.streams) > 1:
            await asyncio.sleep(0.01)
    busy.cancel()
    await _scheduler_idle(service)


# ---------------------------------------------------------------- what a served answer bills


async def test_a_served_answer_bills_the_tokens_its_caller_received(full_billing_worker, catalog):
    # An output rule fires late: the computation generated tokens it never released.
    # The Complete follower was billed the computation's completion_tokens (what the
    # request that computed them pays), the Generate follower what it received.
    service, stub = full_billing_worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await _attach_output_rule(service, stub, catalog, tenant)

    lead = stub.Complete(_complete_request(f"lead-{tenant}"), metadata=_identity(tenant, "ka"))
    await _flight_open(service, completions=True)
    follow = stub.Complete(_complete_request(f"fol-{tenant}"), metadata=_identity(tenant, "kb"))
    computed, served = await asyncio.gather(lead, follow)
    received = sum(len(c.token_ids) for c in served.choices)
    assert served.choices[0].finish_reason == inference_pb2.FINISH_REASON_CONTENT_FILTER
    assert computed.usage.completion_tokens > received  # tokens held back, never sent
    event = await _usage_event(service, f"fol-{tenant}")
    assert event.cached
    assert event.served_usage.completion_tokens == received
    assert event.usage.completion_tokens == received  # billing=full: what it received

    stream = stub.Generate(_generate_request(f"glead-{tenant}"), metadata=_identity(tenant, "ka"))
    leading = asyncio.ensure_future(_read_stream(stream))
    await _flight_open(service)
    follower = stub.Generate(_generate_request(f"gfol-{tenant}"), metadata=_identity(tenant, "kb"))
    messages = [m async for m in follower]
    await leading
    streamed = sum(len(m.token_ids) for m in messages)
    event = await _usage_event(service, f"gfol-{tenant}")
    assert event.usage.completion_tokens == event.served_usage.completion_tokens == streamed


# ---------------------------------------------------------------- leaving while headers are sent


class _LeavingContext:
    """Stands in for grpc's context of a call whose caller leaves while its response
    headers are sent: grpc cancels the handler's task at that await."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer_identities(self) -> None:
        return None  # not one of the mesh's components

    def time_remaining(self) -> float | None:
        return None

    async def send_initial_metadata(self, metadata: Any) -> None:
        raise asyncio.CancelledError


def _pipeline(service: InferenceService) -> GenerationPipeline:
    """Returns the v2 pipeline as the service wires it (InferenceService.add_to_server)."""
    admission = Admission(service.registry, service.usage_log, TokenBudgets(service.redis), "w0")
    admission.content = ContentStage(service.policies, service.usage_log, service.redis)
    admission.cache = service.cache
    return GenerationPipeline(admission, service.templates, V2_SURFACE)


async def _leave_while_headers_are_sent(
    service: InferenceService, request: pb.GenerateRequest, tenant: str
) -> None:
    context = cast(Any, _LeavingContext(_identity(tenant, "k")))
    with pytest.raises(asyncio.CancelledError):
        async for _ in _pipeline(service).generate(context, request):
            pass


async def test_a_leader_that_left_while_its_headers_were_sent_leaves_nothing_running(
    full_billing_worker,
):
    # Its reader was taken before the headers and closed unstarted, which never
    # counted it out: the flight kept a reader nobody held, and its computation
    # ran to the end for nobody.
    service, stub = full_billing_worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    prompt = unique_prompt("leaves")
    await _leave_while_headers_are_sent(service, _seeded(prompt, f"gone-{tenant}", 200), tenant)
    assert service.cache is not None
    assert len(service.cache.streams) == 0  # nothing computes for it, nobody may join it
    await _scheduler_idle(service)
    after = stub.Generate(_seeded(prompt, f"next-{tenant}", 5), metadata=_identity(tenant, "k"))
    status, _ = await _read_stream(after)
    assert status == "miss"  # computed anew, as the first
    # Events ship in order: once the later one is in, the leaver's would be too.
    await _usage_event(service, f"next-{tenant}")
    assert await _usage_events(service, f"gone-{tenant}") == []


async def test_a_follower_that_left_while_its_headers_were_sent_is_not_billed(
    full_billing_worker,
):
    service, stub = full_billing_worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    prompt = unique_prompt("follows")
    leader = stub.Generate(_seeded(prompt, f"lead-{tenant}", 30), metadata=_identity(tenant, "k"))
    await leader.read()  # computing: the follower joins it
    await _leave_while_headers_are_sent(service, _seeded(prompt, f"gone-{tenant}", 30), tenant)
    final = await leader.read()
    while final is not grpc.aio.EOF and not final.HasField("finish_reason"):
        final = await leader.read()
    assert final is not grpc.aio.EOF and final.finish_reason in ENDED_WELL  # it read on
    await _usage_event(service, f"lead-{tenant}")
    assert await _usage_events(service, f"gone-{tenant}") == []


async def test_without_the_cache_a_caller_that_left_while_its_headers_were_sent_frees_its_slot(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    # The cache-off path (the default) never started reading a generation whose
    # headers could not be sent: its sequences ran to max_tokens for nobody.
    monkeypatch.setenv("TOKENMESH_CACHE", "off")
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=20.0)
    async with await start_inference(settings) as (service, _):
        assert isinstance(service, InferenceService) and service.cache is None
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        request = _seeded(unique_prompt("leaves"), f"gone-{tenant}", 200)  # ~4 s of steps
        await _leave_while_headers_are_sent(service, request, tenant)
        await _all_slots_free(service)
        # The same for a Complete (and so each prompt of a multi-prompt completion).
        context = cast(Any, _LeavingContext(_identity(tenant, "k")))
        complete = pb.CompleteRequest(
            model=MODEL, prompt=unique_prompt("leaves"), max_output_tokens=200
        )
        with pytest.raises(asyncio.CancelledError):
            await _pipeline(service).complete(context, complete)
        await _all_slots_free(service)


async def _all_slots_free(service: InferenceService) -> None:
    """Waits, 1.5 s at most, until nothing runs or waits (200 tokens take ~4 s)."""
    schedulers = [m.scheduler for m in service.registry.all() if m.scheduler is not None]
    async with asyncio.timeout(1.5):
        while any(s.stats()["running"] or s.stats()["waiting"] for s in schedulers):
            await asyncio.sleep(0.01)


# ------------------------------------------------------------ a computation that fails

WAITERS = 6


async def _waiters(service: InferenceService, count: int, completions: bool) -> None:
    """Waits until one flight has `count` waiters (its leader counts as one)."""
    assert service.cache is not None
    flights = service.cache.completions if completions else service.cache.streams
    async with asyncio.timeout(10):
        while not any(f.waiters >= count for f in flights._flights.values()):  # noqa: SLF001
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("method", ["Complete", "Generate"])
async def test_a_shared_computation_that_fails_fails_its_waiters_without_computing_again(
    one_slot_worker: tuple[InferenceService, Any], method: str
) -> None:
    # Each waiter computed again on its own: six identical requests to a failing model
    # made six computations, each waiting for the slot, where the docs say the
    # computation's error is every waiter's.
    service, stub = one_slot_worker
    blocker = _seeded(unique_prompt("blocker"), uuid.uuid4().hex, 200)
    held = stub.Generate(blocker, metadata=_identity("t", "k"))
    await held.read()  # it holds the one slot
    for model in service.registry.all():  # every prefill from now on fails
        if model.scheduler is not None:
            model.scheduler.engine.error_rate = 1.0  # type: ignore[attr-defined]
    before = COMPUTED_SEQUENCES.labels(MODEL)._value.get()
    versions = [m.outcomes for m in service.registry.all() if m.name == MODEL]
    errors_before = sum(v.errors for v in versions)
    prompt = unique_prompt("failing")

    async def one(request_id: str) -> str:
        try:
            if method == "Complete":
                request = pb.CompleteRequest(
                    model=MODEL, prompt=prompt, max_output_tokens=5, request_id=request_id
                )
                request.sampling.seed = 1
                await stub.Complete(request, metadata=_identity("t", "k"))
            else:
                call = stub.Generate(_seeded(prompt, request_id, 5), metadata=_identity("t", "k"))
                _ = [message async for message in call]
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    ids = [f"fails-{uuid.uuid4().hex[:8]}" for _ in range(WAITERS)]
    calls = [asyncio.ensure_future(one(request_id)) for request_id in ids]
    await _waiters(service, WAITERS, completions=method == "Complete")
    held.cancel()  # the slot frees: the shared computation starts, and fails
    outcomes = await asyncio.gather(*calls)
    assert COMPUTED_SEQUENCES.labels(MODEL)._value.get() - before == 1
    assert outcomes == ["INTERNAL"] * WAITERS, outcomes
    # Each caller's failure is recorded as its own (the waiters' were not: no usage
    # event, no audit entry), billed nothing beyond the leader's; the version's
    # outcomes count the one computation that failed (a waiter is no computation).
    events = [await _usage_event(service, request_id) for request_id in ids]
    assert [e.finish_reason for e in events] == ["error"] * WAITERS
    assert sum(not e.cached for e in events) == 1
    assert all(e.usage.completion_tokens == 0 for e in events)
    assert sum(v.errors for v in versions) - errors_before == 1


async def test_a_multi_prompt_completion_whose_prompt_shared_a_failed_computation_is_recorded(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A legacy completion [Y, X] whose X joined another request's computation, which
    # failed: the waiter raised with no usage event, read as "refused before it ran",
    # and the whole request was recorded as nothing (docs/openai.md: billed what ran).
    import json

    from google.api.httpbody_pb2 import HttpBody

    from tests.integration.test_openai_usage_billing import _key_events
    from tokenmesh.openai.v1 import openai_service_pb2_grpc as oai_rpc

    async with await _worker(tmp_path, redis_url, monkeypatch, "full", max_sequences=1) as pair:
        service, channel = pair
        stub, openai = rpc.InferenceServiceStub(channel), oai_rpc.OpenAIServiceStub(channel)
        held = stub.Generate(_seeded(unique_prompt("blocker"), "", 200))
        await held.read()  # it holds the one slot
        for model in service.registry.all():  # every prefill from now on fails
            if model.scheduler is not None:
                model.scheduler.engine.error_rate = 1.0
        x, y = unique_prompt("x"), unique_prompt("y")
        other_request = pb.CompleteRequest(model=MODEL, prompt=x, max_output_tokens=5)
        other_request.sampling.seed = 7
        other = asyncio.ensure_future(stub.Complete(other_request, metadata=_identity("t", "o")))
        await _waiters(service, 1, completions=True)
        key = f"key_{uuid.uuid4().hex[:8]}"
        body = {"model": MODEL, "prompt": [y, x], "max_tokens": 5, "seed": 7}

        async def multi() -> None:
            request = HttpBody(content_type="application/json", data=json.dumps(body).encode())
            call = openai.CreateCompletion(request, metadata=_identity("t", key))
            _ = [message async for message in call]

        answered = asyncio.ensure_future(multi())
        await _waiters(service, 2, completions=True)
        held.cancel()
        with pytest.raises(grpc.aio.AioRpcError):
            await answered
        with pytest.raises(grpc.aio.AioRpcError):
            await other
        client = aioredis.from_url(service.settings.redis_url)
        try:
            events = await _key_events(client, service.settings.usage_stream, key, 2)
        finally:
            await client.aclose()
        # X's failure is the request's; Y, its own computation on the failing model,
        # failed too or, still queued when X's error ended the request, was cancelled
        # (a race the slot's hand-over decides: CI saw both). Either way recorded.
        reasons = sorted(e.finish_reason for e in events)
        assert reasons in (["error", "error"], ["cancelled", "error"]), reasons
        assert all(e.usage.completion_tokens == 0 for e in events)
