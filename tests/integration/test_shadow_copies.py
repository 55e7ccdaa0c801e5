"""Shadow copies on a real worker (mTLS as the edge, real Redis): what a copy may run, at
which priority, what it is compared as, and under which pair id.

The edge's headers are sent as the edge sends them: the live request routed to
version 1 and marked as shadowed, and Envoy's copy of it to version 2, with the
caller's identity and the request id the two share.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.api.httpbody_pb2 import HttpBody
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from gateway import model_routing
from services.core import contract
from services.core.errors import FailedPrecondition, ResourceExhausted
from services.core.redis_service import text
from services.inference import shadow
from services.inference.budget import Limits, TokenBudgets
from services.inference.service import InferenceService
from services.router.shadow_pairs import LIVE, Pair, PairStore, compare, pending_key, records_key
from tests.answer_headers import call_headers
from tests.integration.conftest import inference_settings, start_inference
from tests.prompts import unique_prompt
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

MODEL = "deterministic-test"
FALLBACK = "fallback-test"
Headers = dict[str, str]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def _worker(tmp_path: Path, redis_url: str, **overrides: Any) -> Any:
    return await start_inference(inference_settings(tmp_path, redis_url, **overrides))


def _key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


def _pair(identity: Headers, request_id: str = "") -> tuple[Headers, Headers]:
    """Returns what the edge sends for one request of MODEL shadowed to version 2: the
    live request's headers and its copy's."""
    live = {
        contract.TENANT_HEADER: "shadow-copies",
        model_routing.MODEL_HEADER: MODEL,
        model_routing.ROUTE_MODEL_HEADER: MODEL,
        model_routing.ROUTE_VERSION_HEADER: "1",
        shadow.REQUEST_ID_HEADER: request_id or str(uuid.uuid4()),
        contract.SHADOWED_HEADER: "2",
        **identity,
    }
    copy = {**live, contract.SHADOW_HEADER: "2"}
    del copy[contract.SHADOWED_HEADER]
    return live, copy


def _complete_request(prompt: str, tokens: int = 4, **fields: Any) -> pb.CompleteRequest:
    request = pb.CompleteRequest(model=MODEL, prompt=prompt, max_output_tokens=tokens, **fields)
    request.sampling.seed = 3
    return request


async def _complete(channel: grpc.aio.Channel, headers: Headers, **fields: Any) -> Any:
    request = _complete_request(fields.pop("prompt", unique_prompt("c")), **fields)
    stub = rpc.InferenceServiceStub(channel)
    return await stub.Complete(request, metadata=tuple(headers.items()))


def _reason(error: grpc.aio.AioRpcError) -> str:
    """Returns the ErrorInfo reason of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo detail")


async def _dropped(call: Any) -> tuple[grpc.StatusCode, str]:
    """Awaits a call (unary, or a stream read to its end) that must fail: (code, reason)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value.code(), _reason(info.value)


def _drops(reason: str) -> float:
    """Returns the copies of MODEL version 2 this process dropped for `reason`."""
    labels = {"model": MODEL, "version": "2", "reason": reason}
    return REGISTRY.get_sample_value("tokenmesh_shadow_copies_dropped_total", labels) or 0.0


def _skipped(model: str, version: str) -> float:
    """Returns the live records of a model version this process did not write."""
    labels = {"model": model, "version": version, "role": LIVE, "outcome": "skipped"}
    return REGISTRY.get_sample_value("tokenmesh_shadow_records_total", labels) or 0.0


async def _events_of(client: aioredis.Redis, stream: str, request_id: str) -> int:
    entries: Any = await client.xrange(stream)
    return sum(1 for _, fields in entries if text(fields[b"request_id"]) == request_id)


async def _wait_for_event(client: aioredis.Redis, stream: str, request_id: str) -> None:
    async with asyncio.timeout(10):
        while not await _events_of(client, stream, request_id):
            await asyncio.sleep(0.02)


# ---------------------------------------------------------------- per-caller limits


async def test_a_copy_runs_while_its_caller_has_room_and_is_dropped_once_refused(
    tmp_path: Path, redis_url: str, client: aioredis.Redis
) -> None:
    """A key of 2 requests a minute: the copies of its admitted requests run (read in its
    window, never counted), the copy of the request it was refused is not computed."""
    key = _key()
    identity = {contract.KEY_ID_HEADER: key, contract.RPM_HEADER: "2"}
    window = f"tm:ratelimit:rpm:{key}"
    async with await _worker(tmp_path, redis_url) as (service, channel):
        live, copy = _pair(identity)
        assert (await _complete(channel, live)).model.version == "1"
        assert (await _complete(channel, copy)).model.version == "2"
        assert await client.zcard(window) == 1  # the copy was read, not counted
        await _complete(channel, _pair(identity)[0])  # the key's second request: 2 of 2
        live, copy = _pair(identity)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _complete(channel, live)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        before = _drops("caller_limited")
        copy_id = uuid.uuid4().hex
        stub = rpc.InferenceServiceStub(channel)
        unary = stub.Complete(
            _complete_request(unique_prompt("c"), request_id=copy_id),
            metadata=tuple(copy.items()),
        )
        streamed = stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="a stream", max_output_tokens=4),
            metadata=tuple(copy.items()),
        )
        for call in (unary, streamed):
            assert await _dropped(call) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "SHADOW_CALLER_LIMITED",
            )
        assert _drops("caller_limited") - before == 2
        assert await client.zcard(window) == 2  # the dropped copies counted nothing either
        # Nothing was metered for the dropped copy: a later request's event is out,
        # the copy's never came.
        later = uuid.uuid4().hex
        await _complete(channel, {}, request_id=later)
        await _wait_for_event(client, service.settings.usage_stream, later)
        assert await _events_of(client, service.settings.usage_stream, copy_id) == 0


@pytest.mark.parametrize("budget", [contract.MONTHLY_TOKENS_HEADER, contract.TPM_HEADER])
async def test_a_copy_of_a_request_over_its_callers_token_budget_is_dropped_unreserved(
    tmp_path: Path, redis_url: str, client: aioredis.Redis, budget: str
) -> None:
    """A budget of two requests' tokens: the copy of the first runs and reserves nothing;
    once the key is refused for want of tokens, its request's copy is not computed."""
    key, prompt = _key(), unique_prompt("b")
    async with await _worker(tmp_path, redis_url) as (service, channel):
        # prompt + max_output_tokens, as admission reserves it (any prompt of this shape).
        measured = await _complete(channel, {}, prompt=unique_prompt("b"))
        needed = measured.usage.prompt_tokens + 4
        identity = {contract.KEY_ID_HEADER: key, budget: str(2 * needed)}
        budgets = TokenBudgets(client)
        window, amounts, month = budgets._keys(key, time.time())
        live, copy = _pair(identity)
        await _complete(channel, live, prompt=prompt)
        assert (await _complete(channel, copy, prompt=prompt)).model.version == "2"
        await _complete(channel, _pair(identity)[0], prompt=prompt)  # the rest of the budget
        live, copy = _pair(identity)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _complete(channel, live, prompt=prompt)
        assert _reason(refused.value) == "TOKEN_BUDGET_EXCEEDED"
        before = _drops("caller_budget")
        call = rpc.InferenceServiceStub(channel).Complete(
            _complete_request(prompt), metadata=tuple(copy.items())
        )
        assert await _dropped(call) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SHADOW_CALLER_OVER_BUDGET",
        )
        assert _drops("caller_budget") - before == 1
        # The key holds its two requests' tokens, none of its copies'.
        assert await client.zcard(window) == 2
        async with asyncio.timeout(10):  # reconciled in the background
            while int(await client.get(month) or 0) != 2 * needed:
                await asyncio.sleep(0.02)


async def test_the_copys_budget_read_sums_the_last_minute_as_the_reservation_does(
    client: aioredis.Redis,
) -> None:
    """The read sums the window's amounts at once (not one lookup per reservation): a
    reservation older than a minute that no reservation has trimmed yet is left out,
    as the next reservation's trim leaves it out, and the read trims nothing."""
    key, limits = _key(), Limits(tokens_per_minute=1000)
    budgets = TokenBudgets(client)
    for n in range(3):
        await budgets.reserve(key, limits, f"r{n}", 100)
    window, amounts, _ = budgets._keys(key, time.time())
    seconds, micros = await client.time()
    await client.zadd(window, {"stale": seconds * 1000 + micros // 1000 - 61_000})
    await client.hset(amounts, "stale", 900)
    peek, caller = shadow.CallerBudgets(budgets), shadow.CopyCaller(key, limits)
    before = _drops("caller_budget")
    await peek.check(caller, 700, MODEL, "2")  # 300 used: room for 700
    with pytest.raises(FailedPrecondition) as dropped:
        await peek.check(caller, 701, MODEL, "2")
    assert dropped.value.reason == "SHADOW_CALLER_OVER_BUDGET"
    assert _drops("caller_budget") - before == 1
    assert await client.zcard(window) == 4 and await client.hlen(amounts) == 4
    with pytest.raises(ResourceExhausted):  # the live reservation agrees
        await budgets.reserve(key, limits, "r3", 701)
    await budgets.reserve(key, limits, "r3", 700)


async def test_a_copy_whose_callers_windows_cannot_be_read_is_dropped_not_internal(
    tmp_path: Path, redis_url: str, client: aioredis.Redis
) -> None:
    """A window key of the wrong type: the live request is let through (the limiter's
    error is no outage, and fails open), and its copy, its caller's standing unknown, is
    dropped (reason unknown), never answered INTERNAL (the availability SLO's)."""
    key = _key()
    await client.set(f"tm:ratelimit:rpm:{key}", "not a window")
    identity = {contract.KEY_ID_HEADER: key, contract.RPM_HEADER: "5"}
    async with await _worker(tmp_path, redis_url) as (_, channel):
        live, copy = _pair(identity)
        assert (await _complete(channel, live)).model.version == "1"
        before = _drops("unknown")
        assert await _dropped(_complete(channel, copy)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SHADOW_CALLER_UNKNOWN",
        )
        assert _drops("unknown") - before == 1


async def test_copies_of_a_version_beyond_its_slots_on_the_worker_are_dropped(
    tmp_path: Path, redis_url: str
) -> None:
    """TOKENMESH_SHADOW_MAX_COPIES=1: a copy arriving while another runs is dropped (live
    requests are not bounded by it); once the first ends, copies run again."""
    async with await _worker(tmp_path, redis_url, shadow_max_copies=1) as (_, channel):
        stub = rpc.InferenceServiceStub(channel)
        _, copy = _pair({})
        running = stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="long", max_output_tokens=200),
            metadata=tuple(copy.items()),
        )
        await anext(aiter(running))  # it holds the slot now
        before = _drops("full")
        assert await _dropped(_complete(channel, _pair({})[1])) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SHADOW_COPIES_FULL",
        )
        assert _drops("full") - before == 1
        live_2 = {model_routing.ROUTE_MODEL_HEADER: MODEL, model_routing.ROUTE_VERSION_HEADER: "2"}
        assert (await _complete(channel, live_2)).model.version == "2"
        async for _ in running:  # the first copy ends: its slot is free again
            pass
        assert (await _complete(channel, _pair({})[1])).model.version == "2"


async def test_a_copys_slots_are_its_sequences(tmp_path: Path, redis_url: str) -> None:
    """TOKENMESH_SHADOW_MAX_COPIES counts sequences (prompts x n): counted per call, a
    caller's n=8 copies ran 8 times the batch sequences the bound promised."""
    async with await _worker(tmp_path, redis_url, shadow_max_copies=4) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        _, copy = _pair({})
        running = stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="long", max_output_tokens=200, n=3),
            metadata=tuple(copy.items()),
        )
        await anext(aiter(running))  # its 3 sequences hold 3 of the 4 slots
        assert service.shadow_copies.running(MODEL, "2") == 3
        full = (grpc.StatusCode.RESOURCE_EXHAUSTED, "SHADOW_COPIES_FULL")
        assert await _dropped(_complete(channel, _pair({})[1], n=2)) == full
        assert (await _complete(channel, _pair({})[1])).model.version == "2"  # 1 fits
        running.cancel()
        async with asyncio.timeout(5):
            while service.shadow_copies.running(MODEL, "2"):
                await asyncio.sleep(0.01)
        assert await _dropped(_complete(channel, _pair({})[1], n=5)) == full  # never fits
        assert len((await _complete(channel, _pair({})[1], n=4)).choices) == 4


async def test_a_copy_reuses_prompts_in_its_callers_scope(tmp_path: Path, redis_url: str) -> None:
    """A copy's prompt KV is reused among its caller's prompts, as its live side's: in one
    scope for every caller's copies, copies hit prompts their live sides never could
    (another tenant's), and the candidate read faster to start than it is."""
    async with await _worker(tmp_path, redis_url) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        _, copy = _pair({})  # tenant "shadow-copies"
        running = stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="long", max_output_tokens=200),
            metadata=tuple(copy.items()),
        )
        await anext(aiter(running))
        scheduler = service.registry.resolve(MODEL, "2").scheduler
        assert scheduler is not None
        assert [seq.cache_scope for seq in scheduler._running] == ["shadow-copies"]
        running.cancel()


# ---------------------------------------------------------------- priority and outcomes


async def test_a_copy_waits_behind_a_live_request_and_stays_out_of_its_versions_outcomes(
    tmp_path: Path, redis_url: str
) -> None:
    """One slot on version 2, taken: a copy queued first still runs after a live
    interactive request queued later (even one of a tenant served more), and only the
    live requests count in version 2's outcomes (its rollout gates, load reports)."""
    async with await _worker(tmp_path, redis_url, max_sequences=1) as (service, channel):
        model = service.registry.resolve(MODEL, "2")
        scheduler = model.scheduler
        assert scheduler is not None
        stub = rpc.InferenceServiceStub(channel)
        live_2 = {
            contract.TENANT_HEADER: "busy-tenant",
            model_routing.ROUTE_MODEL_HEADER: MODEL,
            model_routing.ROUTE_VERSION_HEADER: "2",
        }
        requests_before = model.outcomes.requests
        blocker = stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="blocker", max_output_tokens=100),
            metadata=tuple(live_2.items()),
        )
        await anext(aiter(blocker))  # running: the slot is taken

        async def waiting(count: int) -> None:
            async with asyncio.timeout(10):
                while scheduler.stats()["waiting"] < count:
                    await asyncio.sleep(0.005)

        finished: list[str] = []

        async def run(name: str, headers: Headers) -> None:
            await _complete(channel, headers)
            finished.append(name)

        copy_task = asyncio.create_task(run("copy", _pair({})[1]))
        await waiting(1)
        live_task = asyncio.create_task(run("live", live_2))
        await waiting(2)
        async for _ in blocker:
            pass
        await asyncio.gather(copy_task, live_task)
        assert finished == ["live", "copy"]
        # The blocker and the live request: the copy is not the version's live traffic.
        assert model.outcomes.requests - requests_before == 2


async def test_queued_copies_take_no_queue_place_from_live_requests(
    tmp_path: Path, redis_url: str
) -> None:
    """Version 2 with one slot (taken) and TOKENMESH_MAX_QUEUE=2: two copies fill the
    queue and a third is refused, while live interactive requests still get both places
    (their bound counts no copy; they were refused "worker queue is full") and run
    first; a third live request is refused."""
    settings = {"max_sequences": 1, "max_queue": 2, "test_engine_step_ms": 20.0}
    async with await _worker(tmp_path, redis_url, **settings) as (service, channel):
        scheduler = service.registry.resolve(MODEL, "2").scheduler
        assert scheduler is not None
        stub = rpc.InferenceServiceStub(channel)
        live_2 = {model_routing.ROUTE_MODEL_HEADER: MODEL, model_routing.ROUTE_VERSION_HEADER: "2"}
        blocker = stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="blocker", max_output_tokens=400),
            metadata=tuple(live_2.items()),
        )
        await anext(aiter(blocker))  # running: the slot is taken

        async def waiting(count: int) -> None:
            async with asyncio.timeout(10):
                while scheduler.stats()["waiting"] < count:
                    await asyncio.sleep(0.005)

        finished: list[str] = []

        async def run(name: str, headers: Headers) -> None:
            await _complete(channel, headers)
            finished.append(name)

        copies = [asyncio.create_task(run("copy", _pair({})[1])) for _ in range(2)]
        await waiting(2)
        full = (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
        assert await _dropped(_complete(channel, _pair({})[1])) == full
        lives = [asyncio.create_task(run("live", live_2)) for _ in range(2)]
        await waiting(4)
        assert await _dropped(_complete(channel, live_2)) == full
        blocker.cancel()
        await asyncio.gather(*copies, *lives)
        assert finished == ["live", "live", "copy", "copy"]


async def test_a_copy_stays_out_of_its_versions_outcomes(tmp_path: Path, redis_url: str) -> None:
    """Version 2's outcomes feed its rollout gates and load reports: a copy is no live
    request of it (a canary that is also the shadow was judged on its copies), nor in
    its request rate and duration on the dashboards."""

    def served() -> tuple[float, float]:
        labels = {"model": MODEL, "version": "2"}
        requests = REGISTRY.get_sample_value(
            "tokenmesh_requests_total", {**labels, "finish_reason": "length"}
        )
        timed = REGISTRY.get_sample_value("tokenmesh_request_duration_seconds_count", labels)
        return requests or 0.0, timed or 0.0

    async with await _worker(tmp_path, redis_url) as (service, channel):
        outcomes = service.registry.resolve(MODEL, "2").outcomes
        before, metrics_before = outcomes.requests, served()
        assert (await _complete(channel, _pair({})[1])).model.version == "2"
        assert outcomes.requests == before
        assert served() == metrics_before
        live_2 = {model_routing.ROUTE_MODEL_HEADER: MODEL, model_routing.ROUTE_VERSION_HEADER: "2"}
        await _complete(channel, live_2)
        assert outcomes.requests == before + 1
        assert served() == (metrics_before[0] + 1, metrics_before[1] + 1)


# ---------------------------------------------------------------- what is compared


async def _recorded(service: InferenceService) -> None:
    """Waits until every comparison record started is written."""
    await service.shadow_records.stop()


def _pairs_of(pairs: list[Pair], ids: set[str]) -> list[Pair]:
    return [p for p in pairs if p.request_id in ids]


async def test_with_the_cache_on_copies_compute_and_cached_live_sides_are_left_out(
    tmp_path: Path, redis_url: str, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded request sent twice: the second live request is a cache hit (a replay's
    timing, billed 0 completion tokens under prompt_only) and is not compared; each copy
    computes on the shadow version (no cache read or write), so the one pair compared
    shows the 4 tokens both versions produced and agrees."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    prompt, ids = unique_prompt("cached"), []
    async with await _worker(tmp_path, redis_url) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        statuses = []
        for _ in range(2):
            live, copy = _pair({})
            ids.append(live[shadow.REQUEST_ID_HEADER])
            for headers in (live, copy):
                call = stub.Complete(_complete_request(prompt), metadata=tuple(headers.items()))
                await call
                statuses.append((await call_headers(call))["x-tokenmesh-cache"])
        await _recorded(service)
    assert statuses == ["miss", "bypass", "hit", "bypass"]
    pairs = _pairs_of(await PairStore(client).pairs(MODEL, 0), set(ids))
    assert [p.request_id for p in pairs] == ids[:1]
    result = compare(pairs, "1", "2")
    assert result.baseline.output_tokens[4] == result.candidate.output_tokens[4] == 4
    assert (result.reproducible_pairs, result.agreeing_pairs) == (1, 1)
    # The hit's live record was never written: its copy's waits unpaired.
    assert await client.hget(records_key(MODEL), f"{ids[1]}|{LIVE}") is None


def _openai_body(prompts: list[str], stream: bool) -> HttpBody:
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 3, "seed": 5, "stream": stream}
    return HttpBody(content_type="application/json", data=json.dumps(body).encode())


@pytest.mark.parametrize("stream", [False, True], ids=["one-answer", "streamed"])
async def test_each_prompt_of_a_legacy_completion_pairs_under_an_id_of_its_own(
    tmp_path: Path, redis_url: str, client: aioredis.Redis, stream: bool
) -> None:
    """Three prompts, each a request of its own on both sides: three pairs, each live
    prompt with its own copy (the seeded texts agree pair by pair)."""
    prompts = [unique_prompt(f"p{n}") for n in range(3)]
    async with await _worker(tmp_path, redis_url) as (service, channel):
        stub = openai_rpc.OpenAIServiceStub(channel)
        live, copy = _pair({})
        for headers in (live, copy):
            call = stub.CreateCompletion(
                _openai_body(prompts, stream), metadata=tuple(headers.items())
            )
            answer = b"".join([m.data async for m in call])
            assert b'"error"' not in answer, answer
        await _recorded(service)
    edge_id = live[shadow.REQUEST_ID_HEADER]
    ids = {edge_id, f"{edge_id}:1", f"{edge_id}:2"}
    pairs = _pairs_of(await PairStore(client).pairs(MODEL, 0), ids)
    assert {p.request_id for p in pairs} == ids
    result = compare(pairs, "1", "2")
    assert (result.pairs, result.reproducible_pairs, result.agreeing_pairs) == (3, 3, 3)


async def test_a_live_request_a_fallback_served_writes_no_record(
    tmp_path: Path, redis_url: str, client: aioredis.Redis
) -> None:
    """The routed version is not on this worker and the fallback model serves: its
    record would wait under the fallback model for a copy that never comes there."""
    models = (f"{MODEL}:1", f"{MODEL}:2", f"{FALLBACK}:1")
    async with await _worker(tmp_path, redis_url, test_models=models) as (service, channel):
        live, _ = _pair({})
        live.update(
            {
                model_routing.ROUTE_VERSION_HEADER: "7",
                model_routing.FALLBACK_MODEL_HEADER: FALLBACK,
                model_routing.FALLBACK_VERSION_HEADER: "1",
            }
        )
        skipped = _skipped(FALLBACK, "1")
        assert (await _complete(channel, live)).model.name == FALLBACK
        await _recorded(service)
    edge_id = live[shadow.REQUEST_ID_HEADER]
    assert await client.zscore(pending_key(FALLBACK), edge_id) is None
    assert await client.zscore(pending_key(MODEL), edge_id) is None
    assert _skipped(FALLBACK, "1") - skipped == 1
