"""Token budgets against a real Redis: exact, never early, never over."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
import uuid
from typing import Any, cast

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.core.errors import ResourceExhausted
from services.inference.admission import Admission
from services.inference.budget import Limits, TokenBudgets
from services.inference.models import ModelRegistry
from services.launcher.mesh import spawn_redis
from tests import mtls
from tests.integration.conftest import inference_settings, month_charged, start_inference
from tests.integration.test_inference_v2 import _usage_event
from tests.prompts import unique_prompt
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.inference.v2 import inference_pb2 as v2_resources
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc


@pytest.fixture
async def budgets(redis_url):
    client = aioredis.from_url(redis_url)
    yield TokenBudgets(client)
    await client.aclose()


async def test_exactly_n_tokens_per_minute(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(tokens_per_minute=100)
    for i in range(4):
        await budgets.reserve(key, limits, f"r{i}", 25)  # 100 exactly: no early lock-out
    with pytest.raises(ResourceExhausted) as info:
        await budgets.reserve(key, limits, "r5", 1)
    assert info.value.reason == "TOKEN_BUDGET_EXCEEDED"
    assert 50 <= (info.value.retry_after_s or 0) <= 60
    await budgets.reconcile(key, "r0", 25, 5)  # r0 used only 5: 20 come back
    await budgets.reserve(key, limits, "r6", 20)
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "r7", 1)


async def test_a_worker_whose_clock_runs_ahead_cannot_empty_the_minute_window(budgets, monkeypatch):
    """The window was scored by each worker's clock: one 61 s ahead saw the others'
    reservations as expired and reserved past tokens_per_minute. Redis's clock now."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(tokens_per_minute=100)
    await budgets.reserve(key, limits, "on-time", 60)
    real_time = time.time
    monkeypatch.setattr("services.inference.budget.time.time", lambda: real_time() + 61)
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "ahead", 60)


async def test_monthly_quota_counts_actual_usage(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=30)
    await budgets.reserve(key, limits, "a", 30)
    await budgets.reconcile(key, "a", 30, 12)
    await budgets.reserve(key, limits, "b", 18)
    with pytest.raises(ResourceExhausted) as info:
        await budgets.reserve(key, limits, "c", 1)
    assert "monthly_tokens=30" in info.value.message


async def test_a_budget_at_80_percent_is_named_in_a_warning(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(tokens_per_minute=100, monthly_tokens=1000)
    assert (await budgets.reserve(key, limits, "a", 50)).warning == ""
    assert (await budgets.reserve(key, limits, "b", 30)).warning == "tokens_per_minute 80/100"
    assert (await budgets.reserve(key, Limits(monthly_tokens=100), "c", 5)).warning == (
        "monthly_tokens 85/100"
    )


async def test_a_stream_admitted_while_redis_was_down_ends_with_quota(tmp_path):
    """Budgets fail open; once Redis is back the stream is charged as it goes, and
    ends cleanly with finish_reason "quota" when the key's budget is gone."""
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    settings = inference_settings(tmp_path, url, test_engine_step_ms=20.0)
    key = f"key_{uuid.uuid4().hex[:8]}"
    # Room for the request's 401 tokens (more than a whole budget is refused before
    # Redis is asked): it runs out because another request takes the minute's tokens.
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-tpm", "1000")]
    try:
        async with await start_inference(settings) as (_, channel):
            child.terminate()
            child.wait(10)
            stub = rpc.InferenceServiceStub(channel)
            call = stub.Generate(
                pb.GenerateRequest(model="deterministic-test", prompt="a", max_tokens=400),
                metadata=identity,
            )
            first = await call.read()  # admitted although the budget could not be checked
            assert first.index == 0
            child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
            budgets = TokenBudgets(aioredis.from_url(url))
            await budgets.reserve(key, Limits(tokens_per_minute=1000), "other", 990)
            messages = [first]
            while (message := await call.read()) != grpc.aio.EOF:
                messages.append(message)
            final = messages[-1]
            assert final.finish_reason == "quota"
            sent = sum(len(m.token_ids) for m in messages)
            assert final.usage.completion_tokens == sent < 400
            assert final.usage.prompt_tokens == 1
            assert await call.code() == grpc.StatusCode.OK  # a clean end, not an error
            # Every token it sent is charged, the chunk the budget refused too.
            charged = await _wait_month_used(budgets, key, 990 + 1 + sent)
            await budgets.redis.aclose()
            assert charged == 990 + 1 + sent
    finally:
        child.terminate()
        child.wait(10)


async def _month_used(budgets: TokenBudgets, key: str) -> int:
    return await month_charged(budgets.redis, key)


async def test_the_same_request_id_reserved_twice_is_charged_once(budgets):
    """A job item replayed after its jobs replica died (same `<job>:<n>`) reserves and
    reconciles twice, possibly interleaved: the month is charged its use once."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=1000)
    await budgets.reserve(key, limits, "job-1:0", 100)  # the first run
    await budgets.reserve(key, limits, "job-1:0", 100)  # the replay, while the first runs
    assert await _month_used(budgets, key) == 100
    await budgets.reconcile(key, "job-1:0", 100, 30)  # the first run ends
    await budgets.reconcile(key, "job-1:0", 100, 30)  # the replay ends
    assert await _month_used(budgets, key) == 30
    await budgets.reserve(key, limits, "job-1:0", 100)  # a late replay: nothing more
    await budgets.reconcile(key, "job-1:0", 100, 30)
    assert await _month_used(budgets, key) == 30


async def test_a_cut_runs_late_reconcile_does_not_undo_the_finished_runs_charge(budgets):
    """A job item's cut run reconciles to 0 in the background; landing after the run
    that finished (its worker stalled: why its call timed out), it set the item's
    charge back to 0 and took the finished run's tokens off the month."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=1000)
    for first, second in (
        (("finished", 40), ("unfinished", 0)),
        (("unfinished", 0), ("finished", 40)),
    ):
        item = f"job-{first[0]}:0"
        await budgets.reserve(key, limits, item, 100)  # the cut run
        await budgets.reserve(key, limits, item, 100)  # the retry (a replay: no charge)
        for run, used in (first, second):
            await budgets.reconcile(key, item, 100, used, run=run)
    assert await _month_used(budgets, key) == 80  # 40 for each item, either order


async def test_a_job_item_run_twice_to_its_end_keeps_its_first_runs_charge(budgets):
    """A job item whose result was not stored (its jobs replica died between the
    worker's answer and the store) runs again under its id, to its end too, with
    another length (temperature > 0). The meter bills the id's first usage event and
    drops the second; the budget charged the last run's: 65 against 30 metered."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=1000)
    await budgets.reserve(key, limits, "job-4:0", 100)
    await budgets.reconcile(key, "job-4:0", 100, 30, run="finished")
    await budgets.reserve(key, limits, "job-4:0", 100)  # the second run: a replay
    await budgets.reconcile(key, "job-4:0", 100, 65, run="finished")
    assert await _month_used(budgets, key) == 30


async def test_a_cut_replay_of_a_finished_job_item_leaves_its_charge(budgets):
    """A replay of a finished item is admitted on its charge; its call cut while the
    reservation was sent (`forget`), it refunded the finished run's charge, and the
    month missed the run the meter billed."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=1000)
    await budgets.reserve(key, limits, "job-5:0", 100)
    await budgets.reconcile(key, "job-5:0", 100, 30, run="finished")
    replay = await budgets.reserve(key, limits, "job-5:0", 100, attempt="a2")
    assert not await budgets.forget(key, "job-5:0", replay.reserved_at, "a2")
    assert await _month_used(budgets, key) == 30


async def test_a_replay_of_a_request_is_admitted_although_the_budget_is_spent(budgets):
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=100)
    await budgets.reserve(key, limits, "job-2:0", 100)
    await budgets.reserve(key, limits, "job-2:0", 100)  # its own reservation covers it
    with pytest.raises(ResourceExhausted):
        await budgets.reserve(key, limits, "job-2:1", 1)


async def test_a_reused_request_id_is_charged_each_time(tmp_path, redis_url):
    """A request id is the caller's to choose: reused, every request after the first
    passed unchecked and uncharged. (The replay rule is the jobs service's: the same
    `<job>:<n>` is one item, test_the_same_request_id_reserved_twice_is_charged_once.)"""
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-tpm", "100000")]
    request = pb.CompleteRequest(
        model="deterministic-test", prompt="a", max_tokens=4, request_id="mine"
    )
    window = aioredis.from_url(redis_url)
    try:
        async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
            stub = rpc.InferenceServiceStub(channel)
            for _ in range(3):
                await stub.Complete(request, metadata=identity)
        assert await window.hlen(f"tm:budget:{key}:tpm:amounts") == 3
    finally:
        await window.aclose()


async def test_a_reservation_is_reconciled_in_the_month_it_was_made(budgets, monkeypatch):
    """Reserved before midnight on the 31st, reconciled after it: January is charged
    the use, February nothing (it got the difference: a negative, never-expiring key)."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    january, february = 1_801_439_999.0, 1_801_440_001.0  # 2027-01-31T23:59:59Z, +2 s
    monkeypatch.setattr("services.inference.budget.time.time", lambda: january)
    await budgets.reserve(key, Limits(monthly_tokens=1000), "r1", 100)
    monkeypatch.setattr("services.inference.budget.time.time", lambda: february)
    await budgets.reconcile(key, "r1", 100, 30, reserved_at=january)
    assert int(await budgets.redis.get(f"tm:budget:{key}:month:202701")) == 30
    assert not await budgets.redis.exists(f"tm:budget:{key}:month:202702")


async def test_a_request_the_worker_refuses_to_queue_gives_its_reservation_back(
    tmp_path, redis_url
):
    """A full queue (or a model unloading) refuses after the reservation: nothing ran,
    so the month keeps nothing (Envoy retries UNAVAILABLE: each try reserved anew)."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-monthly-tokens", "100000")]
    request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=40)
    budgets = TokenBudgets(aioredis.from_url(redis_url))
    try:
        # One slot, no queue beyond it: once a stream holds the slot, the next request
        # is refused (a zero queue still serves a free slot).
        settings = inference_settings(
            tmp_path, redis_url, max_queue=0, max_sequences=1, test_engine_step_ms=20.0
        )
        async with await start_inference(settings) as (_, channel):
            stub = rpc.InferenceServiceStub(channel)
            holder = stub.Generate(
                pb.GenerateRequest(model="deterministic-test", prompt="b", max_tokens=400)
            )
            await holder.read()  # it holds the only slot
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(request, metadata=identity)
            holder.cancel()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            deadline = time.monotonic() + 5
            while await _month_used(budgets, key) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # reconciled in the background
        assert await _month_used(budgets, key) == 0
    finally:
        await budgets.redis.aclose()


async def test_embeddings_spend_the_token_budgets_too(model_server, redis_url):
    """They skipped them: a key whose month was spent embedded on, uncounted."""
    _, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    key = f"key_{uuid.uuid4().hex[:8]}"
    request = pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["The LORD is my shepherd"])
    budgets = TokenBudgets(aioredis.from_url(redis_url))
    try:
        # The month nearly spent (3 tokens left): a request that fits a whole month waits.
        await budgets.reserve(key, Limits(monthly_tokens=1000), "earlier", 997)
        tight = [("x-tokenmesh-key-id", key), ("x-tokenmesh-monthly-tokens", "1000")]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Embed(request, metadata=tight)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        roomy = [("x-tokenmesh-key-id", key), ("x-tokenmesh-monthly-tokens", "2000")]
        reply = await stub.Embed(request, metadata=roomy)
        deadline = time.monotonic() + 5
        while await _month_used(budgets, key) != 997 + reply.usage.prompt_tokens:
            assert time.monotonic() < deadline, await _month_used(budgets, key)
            await asyncio.sleep(0.02)  # reconciled in the background
    finally:
        await budgets.redis.aclose()


async def _events_of(client, stream, request_id):
    from tokenmesh.inference.v1 import inference_pb2

    entries = await client.xrange(stream)
    events = [inference_pb2.UsageEvent.FromString(f[b"event"]) for _, f in entries]
    return [e for e in events if e.request_id == request_id]


async def test_a_job_item_tried_again_is_billed_its_finished_run(tmp_path, redis_url):
    """A job item's call that timed out (cancelled in the worker) is tried again under
    the same `<job>:<n>`. The meter keeps an id's first event: the cut attempt's
    tokens-so-far were the item's usage, the finished run's dropped, and the budget
    charged the same. Now the cut attempt is recorded apart, billed nothing."""
    from tokenmesh.inference.v2 import inference_pb2 as resources
    from tokenmesh.inference.v2 import inference_service_pb2 as v2
    from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = [
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-scopes", "inference:generate"),
        ("x-tokenmesh-monthly-tokens", "100000"),
    ]
    item = v2.CompleteRequest(
        model="deterministic-test",
        prompt="a",
        max_output_tokens=150,
        request_id="job-9:0",
        priority=resources.PRIORITY_BATCH,  # as the jobs service calls
    )
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=10.0)
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client)
    try:
        async with await start_inference(settings) as (service, _):
            port = service._running.port  # noqa: SLF001 - the bound port
            async with mtls.aio_channel(port, peer="worker", caller="jobs") as channel:
                stub = v2_rpc.InferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    await stub.Complete(item, metadata=owner, timeout=0.8)  # ~80 tokens in
                assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                events: list[Any] = []
                deadline = time.monotonic() + 10
                while not events and time.monotonic() < deadline:  # the cut run's event
                    events = await _events_of(client, settings.usage_stream, "job-9:0")
                    await asyncio.sleep(0.05)
                reply = await stub.Complete(item, metadata=owner)
                billed = reply.usage.total_tokens
                while len(events) < 2 and time.monotonic() < deadline:
                    events = await _events_of(client, settings.usage_stream, "job-9:0")
                    await asyncio.sleep(0.05)
                while await _month_used(budgets, key) != billed and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)  # reconciled in the background
        cut_run, finished = events
        assert cut_run.finish_reason == "cancelled"
        assert cut_run.event_id.startswith("job-9:0:unfinished:")
        assert cut_run.usage.total_tokens == 0
        assert 0 < cut_run.served_usage.completion_tokens < 150  # what it computed
        assert finished.event_id == "job-9:0"
        assert finished.usage.completion_tokens == reply.usage.completion_tokens == 150
        assert await _month_used(budgets, key) == billed
    finally:
        await client.aclose()


async def test_a_job_item_re_run_after_the_replay_ttl_is_still_charged_once(redis_url):
    """A job item may run again until its job's deadline (up to 7 days; the meter bills
    its id once for 7 days). Its charge was remembered an hour: a re-run after that
    was charged again. Now it lives as long as its job's deadline asks (here the
    budgets' own TTL is 1 s and the item's 60 s)."""
    client = aioredis.from_url(redis_url)
    budgets = TokenBudgets(client, replay_ttl_s=1)
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=1000)
    try:
        await budgets.reserve(key, limits, "job-7:0", 100, replay_ttl_s=60)
        await budgets.reconcile(key, "job-7:0", 100, 30, run="finished")
        await budgets.reserve(key, limits, "other", 10)  # a request of the budgets' TTL
        await budgets.reconcile(key, "other", 10, 10)
        deadline = time.monotonic() + 5
        while await client.exists(f"tm:budget:{key}:req:other"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await budgets.reserve(key, limits, "job-7:0", 100, replay_ttl_s=60)  # the re-run
        await budgets.reconcile(key, "job-7:0", 100, 65, run="finished")
        assert await _month_used(budgets, key) == 30 + 10
        assert await client.ttl(f"tm:budget:{key}:req:job-7:0") > 50  # not shortened
    finally:
        await client.aclose()


async def test_a_job_items_charge_is_kept_until_its_jobs_deadline(tmp_path, redis_url):
    """The jobs service sends each item's deadline (x-tokenmesh-replay-until); the
    worker keeps the item's charge until then and an hour, other callers' an hour."""
    from tokenmesh.inference.v2 import inference_service_pb2 as v2
    from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

    key = f"key_{uuid.uuid4().hex[:8]}"
    two_days = 2 * 86400
    owner = [
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-scopes", "inference:generate"),
        ("x-tokenmesh-monthly-tokens", "100000"),
        ("x-tokenmesh-replay-until", str(int(time.time()) + two_days)),
    ]
    item = v2.CompleteRequest(
        model="deterministic-test", prompt="a", max_output_tokens=4, request_id="job-8:0"
    )
    item.priority = v2_resources.PRIORITY_BATCH  # as the jobs service calls
    client = aioredis.from_url(redis_url)
    charge = f"tm:budget:{key}:req:job-8:0"
    try:
        async with await start_inference(inference_settings(tmp_path, redis_url)) as (service, _):
            port = service._running.port  # noqa: SLF001 - the bound port
            async with mtls.aio_channel(port, peer="worker", caller="jobs") as channel:
                reply = await v2_rpc.InferenceServiceStub(channel).Complete(item, metadata=owner)
            deadline = time.monotonic() + 10
            while await client.get(charge) != str(reply.usage.total_tokens).encode():
                assert time.monotonic() < deadline  # reconciled in the background
                await asyncio.sleep(0.05)
            assert two_days < await client.ttl(charge) <= two_days + 3600
            assert two_days < await client.ttl(f"{charge}:finished") <= two_days + 3600
    finally:
        await client.aclose()


async def test_a_reservation_forgotten_is_refunded_and_a_late_one_charges_nothing(budgets):
    """A reservation whose answer never came is taken back (its request, admitted
    unmetered or cancelled, would never settle it); one that reaches Redis only after
    being forgotten is taken for a replay and charges nothing."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(tokens_per_minute=1000, monthly_tokens=1000)
    now = time.time()
    await budgets.reserve(key, limits, "answered-late", 100, now)
    assert await budgets.forget(key, "answered-late", now)
    assert await _month_used(budgets, key) == 0
    assert await budgets.redis.hlen(f"tm:budget:{key}:tpm:amounts") == 0
    assert not await budgets.forget(key, "arrives-late", now)  # not reserved yet
    await budgets.reserve(key, limits, "arrives-late", 100, now)
    assert await _month_used(budgets, key) == 0


async def _wait_month_used(budgets: TokenBudgets, key: str, expected: int) -> int:
    deadline = time.monotonic() + 5
    while (used := await _month_used(budgets, key)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # taken back in the background
    return used


def _request(key: str, needed: int) -> Any:
    """What Admission.reserve and settle read of a request (admission.Request)."""
    return types.SimpleNamespace(
        key_id=key,
        limits=Limits(monthly_tokens=1000),
        usage_id=f"u-{uuid.uuid4().hex[:8]}",
        needed_tokens=needed,
        reserved_at=0.0,
        budget_warning="",
        unmetered=False,
        reserved_tokens=0,
        job_attempt=False,
        replay_ttl_s=None,
        budget_reserved=False,
        charged_tokens=0,
        chunks_sent=0,
        charging=None,
    )


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
async def test_a_reservation_whose_answer_never_came_is_taken_back(budgets, ending):
    """Redis ran the reservation, then the call timed out (a stall) or its caller left:
    the month stayed charged prompt + max_tokens on top of what the request used."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    script, ran = budgets._reserve, asyncio.Event()

    async def reserved_then_lost(*args: Any, **kwargs: Any) -> Any:
        await script(*args, **kwargs)
        ran.set()
        if ending == "timeout":
            raise TimeoutError("Timeout reading from 127.0.0.1:6379")
        await asyncio.Event().wait()

    budgets._reserve = reserved_then_lost
    request = _request(key, 100)
    reserving = asyncio.create_task(admission.reserve(request))
    await ran.wait()
    if ending == "cancel":
        reserving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reserving
    assert request.reserved_tokens == 0
    assert await _wait_month_used(budgets, key, 0) == 0


async def test_a_reconcile_that_fails_once_is_tried_again(budgets, monkeypatch):
    """A Redis blip failed the reconcile of a finished request: its whole reservation
    (prompt + max_tokens) stayed charged for the month."""
    monkeypatch.setattr("services.inference.admission.STORE_BACKOFF_S", 0.01, raising=False)
    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    request = _request(key, 100)
    await admission.reserve(request)
    assert await _month_used(budgets, key) == 100
    script, failures = budgets._reconcile, []

    async def blip_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RedisConnectionError("Connection reset by peer")
        return await script(*args, **kwargs)

    budgets._reconcile = blip_once
    admission.settle(request, 30)
    assert await _wait_month_used(budgets, key, 30) == 30
    assert failures == [1]


async def test_a_chunk_charged_while_its_answer_was_lost_does_not_swallow_the_next(
    budgets, monkeypatch
):
    """An unmetered stream's chunk reached Redis, then its call timed out (a stall): the
    next chunk went under the same id, was taken for the first one's replay and charged
    nothing, and so did the rest at record: the month held 30 of 50 tokens used."""
    monkeypatch.setattr("services.inference.admission.STORE_BACKOFF_S", 0.01, raising=False)
    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    request = _request(key, 0)
    request.unmetered, request.charged_tokens = True, 0
    script, lost = budgets._reserve, []

    async def charged_then_lost_once(*args: Any, **kwargs: Any) -> Any:
        reply = await script(*args, **kwargs)
        if not lost:
            lost.append(1)
            raise TimeoutError("Timeout reading from 127.0.0.1:6379")
        return reply

    budgets._reserve = charged_then_lost_once
    assert await admission.within_budget(request, 20)  # charged, its answer lost
    # (Not the month here: a background settlement of the lost call may run first.)
    assert lost == [1]
    assert await admission.within_budget(request, 40)
    admission.settle(request, 50)
    assert await _wait_month_used(budgets, key, 50) == 50
    assert lost == [1]


async def test_a_chunk_that_never_reached_redis_is_charged_with_the_next_one(budgets, monkeypatch):
    """An unmetered stream's chunk whose call failed (a lost connection: it never
    reached Redis) was left to a background charge of its own; once that ran out of
    tries (Redis away longer than ~7 s) its tokens were charged nowhere. They stay
    due now, and the next chunk charges them."""
    monkeypatch.setattr("services.inference.admission.STORE_BACKOFF_S", 0.01, raising=False)
    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    request = _request(key, 0)
    request.unmetered, request.charged_tokens = True, 0
    script, unreachable = budgets._reserve, []

    async def first_chunk_never_lands(*args: Any, **kwargs: Any) -> Any:
        charge_key = kwargs["keys"][3]
        if not unreachable or unreachable[0] == charge_key:
            unreachable[:1] = [charge_key]
            raise RedisConnectionError("Connection refused")
        return await script(*args, **kwargs)

    budgets._reserve = first_chunk_never_lands
    assert await admission.within_budget(request, 20)
    async with asyncio.timeout(5):  # every background try of that chunk has failed
        while admission._background:
            await asyncio.sleep(0.01)
    assert await admission.within_budget(request, 40)
    admission.settle(request, 50)
    assert await _wait_month_used(budgets, key, 50) == 50


async def _charging_held(budgets: TokenBudgets) -> tuple[asyncio.Event, asyncio.Event]:
    """Makes the next reserve call run in Redis, then wait for the second event (its
    answer held back); returns (ran, release)."""
    script, ran, release = budgets._reserve, asyncio.Event(), asyncio.Event()

    async def charged_then_held(*args: Any, **kwargs: Any) -> Any:
        reply = await script(*args, **kwargs)
        if not ran.is_set():
            ran.set()
            await release.wait()
        return reply

    cast(Any, budgets)._reserve = charged_then_held
    return ran, release


@pytest.mark.parametrize("ending", ["caller left", "recorded meanwhile"])
async def test_a_chunk_in_flight_when_its_request_ends_counts_once(budgets, monkeypatch, ending):
    """An unmetered stream's chunk reached Redis, and then its caller left (the call
    cancelled) or the request was recorded while the call was in flight (a coalesced
    leader): its tokens were charged by the chunk and again at record (cancelled), or
    the charge at record took the in-flight chunk's id and was taken for its replay
    (recorded meanwhile: under-charged)."""
    monkeypatch.setattr("services.inference.admission.STORE_BACKOFF_S", 0.01, raising=False)
    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    request = _request(key, 0)
    request.unmetered = True
    ran, release = await _charging_held(budgets)
    charging = asyncio.ensure_future(admission.within_budget(request, 20))
    await ran.wait()  # charged in Redis, its answer not back
    if ending == "caller left":
        charging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await charging
        admission.settle(request, 30)
    else:
        admission.settle(request, 30)
        release.set()
        await charging
    assert await _wait_month_used(budgets, key, 30) == 30
    async with asyncio.timeout(5):
        while admission._background:
            await asyncio.sleep(0.01)
    assert await _month_used(budgets, key) == 30


async def _computing(service: Any) -> None:
    """Waits until a sequence runs on the worker (its request was admitted)."""
    deadline = time.monotonic() + 5
    while not any(m.scheduler.stats()["running"] for m in service.registry.all() if m.scheduler):
        assert time.monotonic() < deadline, "nothing started computing"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("ending", ["length", "cancel", "complete"])
async def test_a_request_admitted_while_redis_was_down_is_charged_every_token(tmp_path, ending):
    """Admitted unmetered (budgets unreachable), a request is charged as it goes, in
    chunks of at least CHARGE_EVERY_TOKENS checked before each delta: the rest (under
    16 tokens, plus the last delta) was never charged, however it ended (at max
    tokens, its caller leaving mid-stream, a Complete). The month now holds what its
    usage event bills."""
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    settings = inference_settings(tmp_path, url, test_engine_step_ms=10.0)
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-monthly-tokens", "100000")]
    request = {"model": "deterministic-test", "prompt": "a", "max_output_tokens": 40}
    budgets = TokenBudgets(aioredis.from_url(url))
    try:
        async with await start_inference(settings) as (service, channel):
            child.terminate()
            child.wait(10)
            stub = v2_rpc.InferenceServiceStub(channel)
            if ending == "complete":
                answer = asyncio.ensure_future(
                    stub.Complete(v2_pb.CompleteRequest(**request), metadata=identity)
                )
                await _computing(service)  # admitted although the budget could not be checked
                child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
                reply = await answer
                request_id, received = reply.request_id, reply.usage.completion_tokens
            else:
                call = stub.Generate(v2_pb.GenerateRequest(**request), metadata=identity)
                first = await call.read()  # admitted although the budget could not be checked
                request_id, received = first.request_id, len(first.token_ids)
                child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
                while (message := await call.read()) != grpc.aio.EOF:
                    received += len(message.token_ids)
                    if ending == "cancel" and received >= 25:
                        call.cancel()
                        break
            event = await _usage_event(service, request_id)
            charged = await _wait_month_used(budgets, key, event.usage.total_tokens)
        assert event.usage.prompt_tokens == 1
        if ending == "cancel":
            assert 25 <= received <= event.usage.completion_tokens < 40
        else:
            assert received == event.usage.completion_tokens == 40
        assert charged == event.usage.total_tokens
    finally:
        await budgets.redis.aclose()
        child.terminate()
        child.wait(10)


@pytest.mark.parametrize("leader", ["stays", "leaves"])
async def test_an_unmetered_leaders_budget_does_not_cut_or_charge_its_waiters_stream(
    tmp_path, redis_url, monkeypatch, leader
):
    """A coalesced computation runs on its leader's request: admitted while budgets were
    unreachable, the leader was charged as it went for every token the computation
    made, after it had left and been recorded too (billed only what it received),
    and its budget running out ended every waiter's stream with "quota". Now only
    the leader's own stream ends so, and it is charged what its event bills."""
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)  # stays up
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    settings = inference_settings(tmp_path, url, test_engine_step_ms=25.0)
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-tpm", "1000")]  # room for 509
    request = v2_pb.GenerateRequest(
        model="deterministic-test", prompt=unique_prompt("shared"), max_output_tokens=500
    )
    request.sampling.seed = 3  # deterministic: cacheable, so identical requests coalesce
    budgets = TokenBudgets(aioredis.from_url(url))
    try:
        async with await start_inference(settings) as (service, channel):
            child.terminate()
            child.wait(10)
            stub = v2_rpc.InferenceServiceStub(channel)
            lead = stub.Generate(request, metadata=identity)
            first = await lead.read()  # admitted although the budget could not be checked
            lead_received = len(first.token_ids)
            follow = stub.Generate(request)  # another caller, no budget of its own
            assert dict(await follow.initial_metadata())["x-tokenmesh-cache"] == "coalesced"
            child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
            if leader == "leaves":
                lead.cancel()
                leader_event = await _usage_event(service, first.request_id)
            else:  # its tokens per minute are gone (another request took them)
                await budgets.reserve(key, Limits(), "other", 990)
            finals, received = [], 0
            async for message in follow:
                received += len(message.token_ids)
                if message.HasField("usage"):
                    finals.append(message)
            assert [f.finish_reason for f in finals] == [v2_resources.FINISH_REASON_LENGTH]
            assert received == 500
            if leader == "stays":
                lead_finals = []
                while (message := await lead.read()) != grpc.aio.EOF:
                    lead_received += len(message.token_ids)
                    if message.HasField("usage"):
                        lead_finals.append(message)
                assert [f.finish_reason for f in lead_finals] == [v2_resources.FINISH_REASON_QUOTA]
                leader_event = await _usage_event(service, first.request_id)
                assert leader_event.finish_reason == "quota"
                assert lead_received == leader_event.usage.completion_tokens < 500
            # The month holds what the leader's usage event bills ("other" aside).
            other = 990 if leader == "stays" else 0
            billed = leader_event.usage.total_tokens
            assert await _wait_month_used(budgets, key, other + billed) == other + billed
    finally:
        await budgets.redis.aclose()
        child.terminate()
        child.wait(10)


async def test_a_given_back_reservation_forgotten_again_charges_its_late_copy_nothing(budgets):
    """An id given back (an unfinished run: its charge is 0) whose next attempt's
    reservation was sent and then cancelled: forgetting it failed in Redis (`INCRBY
    month -0`: Lua's negative zero is no integer to Redis), so the attempt was never
    marked forgotten and its late copy charged prompt + max_tokens to the month."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    limits = Limits(monthly_tokens=10_000)
    now = time.time()
    await budgets.reserve(key, limits, "req", 500, now, attempt="a1")
    await budgets.reconcile(key, "req", 500, 0, now, run="unfinished")  # given back
    await budgets.forget(key, "req", now, attempt="a2")  # a2's reserve: sent, then cancelled
    await budgets.reserve(key, limits, "req", 500, now, attempt="a2")  # ... lands late
    assert await _month_used(budgets, key) == 0


async def test_a_job_items_unmetered_chunks_are_remembered_until_its_deadline(budgets):
    """A job item admitted while budgets were unreachable is charged in chunks; their
    ids were remembered an hour, so a re-run after that charged them again."""
    from services.inference.admission import _chunk_id

    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    request = _request(key, 0)
    request.unmetered, request.job_attempt, request.replay_ttl_s = True, True, 2 * 86400
    chunk = _chunk_id(request)
    assert await admission.within_budget(request, 20)
    assert await budgets.redis.ttl(f"tm:budget:{key}:req:{chunk}") > 86400


def _job_attempt(key: str, item: str, needed: int) -> Any:
    """An attempt at a job item (admission.Request as a job item's call makes it)."""
    attempt = _request(key, needed)
    attempt.usage_id, attempt.job_attempt, attempt.limits = item, True, Limits(1000, 1000)
    return attempt


async def _window_used(budgets: TokenBudgets, key: str) -> int:
    _, amounts, _ = budgets._keys(key, time.time())
    return sum(int(v) for v in await budgets.redis.hvals(amounts))


@pytest.mark.parametrize("ending", ["unfinished", "forgotten"])
async def test_an_attempt_that_ends_unfinished_leaves_the_charge_another_runs_on(redis_url, ending):
    """A job item tried again on worker B (its call to A timed out) is admitted on A's
    charge. A's attempt then ended unfinished (its reconcile landed late) or B's call
    was cut as it reserved (forgotten): either gave the whole charge back while the
    other attempt still ran on it, and the room was admitted twice: 1600 tokens
    against budgets of 1000."""
    client = aioredis.from_url(redis_url)
    try:
        key, item = f"key_{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:6]}:0"
        worker_a, worker_b = (
            Admission(ModelRegistry(), None, TokenBudgets(client, holder=f"{w}:{key}"), w)
            for w in ("wA", "wB")
        )
        first, second = _job_attempt(key, item, 800), _job_attempt(key, item, 800)
        await worker_a.reserve(first)
        await worker_b.reserve(second)  # a replay: admitted on the item's charge
        ended, running, runner = (
            (worker_a, worker_b, second) if ending == "unfinished" else (worker_b, worker_a, first)
        )
        if ending == "unfinished":
            ended.settle(first, 0, finished=False)
        else:
            ended._forget(second)
        await asyncio.gather(*ended._background)
        budgets = worker_a.budgets
        assert (await _month_used(budgets, key), await _window_used(budgets, key)) == (800, 800)
        with pytest.raises(ResourceExhausted):
            await worker_a.reserve(_job_attempt(key, f"job-other-{key}:0", 800))
        # The attempt still running ends: its use is what the item is charged.
        running.settle(runner, 300, finished=True)
        await asyncio.gather(*running._background)
        assert await _month_used(budgets, key) == 300
    finally:
        await client.aclose()


async def test_a_reconcile_is_tried_until_redis_answers(budgets, monkeypatch):
    """Tried 4 times over ~7 s and then given up: a Redis failover longer than that left
    the request's whole reservation charged for as long as the worker lived (no reaper
    takes back a live worker's), and the key was refused for tokens nobody used."""
    monkeypatch.setattr("services.inference.admission.STORE_BACKOFF_S", 0.01)
    monkeypatch.setattr("services.inference.admission.STORE_RETRY_EVERY_S", 0.02, raising=False)
    key = f"key_{uuid.uuid4().hex[:8]}"
    admission = Admission(ModelRegistry(), None, budgets, "w")
    request = _request(key, 900)
    await admission.reserve(request)
    script, failures = budgets._reconcile, []

    async def away_for_ten_tries(*args: Any, **kwargs: Any) -> Any:
        if len(failures) < 10:
            failures.append(1)
            raise RedisConnectionError("Connection refused")
        return await script(*args, **kwargs)

    budgets._reconcile = away_for_ten_tries
    admission.settle(request, 12)
    assert await _wait_month_used(budgets, key, 12) == 12
    assert len(failures) == 10
