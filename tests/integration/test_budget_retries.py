"""A request id's next attempt after its reservation was given back is budgeted anew.

A job item is tried again under the same `<job>:<n>`. Its reservation was held as
the item's (a replay of it is charged once), but one given back (refused before it
ran, an attempt cut, a reservation forgotten) left a charge of 0 that still counted
as held: the retry was admitted as a replay, unchecked and unreserved, and a key
went past its monthly and per-minute caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
import uuid
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core.errors import ResourceExhausted
from services.inference.admission import Admission
from services.inference.budget import Limits, TokenBudgets
from services.inference.models import ModelRegistry
from tests import mtls
from tests.integration.conftest import inference_settings, month_charged, start_inference
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

LIMITS = {"monthly": Limits(monthly_tokens=100), "tpm": Limits(tokens_per_minute=100)}


@pytest.fixture
async def budgets(redis_url):
    client = aioredis.from_url(redis_url)
    yield TokenBudgets(client)
    await client.aclose()


def _request(key: str, usage_id: str, limits: Limits, *, job: bool = True) -> Any:
    """What Admission.reserve and settle read of a request (admission.Request)."""
    return types.SimpleNamespace(
        key_id=key,
        limits=limits,
        usage_id=usage_id,
        needed_tokens=100,
        reserved_at=0.0,
        budget_warning="",
        unmetered=False,
        reserved_tokens=0,
        charged_tokens=0,
        job_attempt=job,
        replay_ttl_s=None,
        budget_reserved=False,
    )


async def _month_used(budgets: TokenBudgets, key: str) -> int:
    return await month_charged(budgets.redis, key)


async def _minute_used(budgets: TokenBudgets, key: str) -> int:
    _, amounts, _ = budgets._keys(key, time.time())
    return sum(int(v) for v in await budgets.redis.hvals(amounts))


async def _settled(admission: Admission) -> None:
    """Waits for the background reconciles and forgets (they run once, Redis being up)."""
    await asyncio.gather(*admission._background)


async def _give_back(admission: Admission, attempt: Any, how: str) -> None:
    """Ends a reserved attempt without the item finishing."""
    if how == "released":  # refused at submit (QUEUE_FULL): generate.schedule
        admission.release(attempt)
    elif how == "unfinished":  # its call cut: recorded apart, reconciled to 0
        admission.settle(attempt, 0, finished=False)
    else:  # "forgotten": its reservation's answer never came (a stall, a cancel)
        admission._forget(attempt)
        attempt.reserved_tokens = 0
    await _settled(admission)


@pytest.mark.parametrize("how", ["released", "unfinished", "forgotten"])
@pytest.mark.parametrize("budget", ["monthly", "tpm"])
async def test_a_retry_after_its_reservation_was_given_back_is_checked(budgets, budget, how):
    """The review's sequence: a 100-token budget, a job item reserved then given back,
    another request takes the 100: the item's retry is refused, not a free replay."""
    key, limits = f"key_{uuid.uuid4().hex[:8]}", LIMITS[budget]
    admission = Admission(ModelRegistry(), None, budgets, "w")
    first = _request(key, "job-7:0", limits)
    await admission.reserve(first)
    await _give_back(admission, first, how)
    assert await _month_used(budgets, key) == 0
    await admission.reserve(_request(key, f"direct-{uuid.uuid4().hex}", limits, job=False))
    with pytest.raises(ResourceExhausted) as refused:
        await admission.reserve(_request(key, "job-7:0", limits))
    assert refused.value.reason == "TOKEN_BUDGET_EXCEEDED"
    assert await _month_used(budgets, key) == 100
    assert await _minute_used(budgets, key) == 100


@pytest.mark.parametrize("job", [True, False], ids=["job-item", "any-request"])
async def test_a_retry_after_a_release_reserves_and_is_billed_its_run_once(budgets, job):
    """Given back, the id holds nothing: the retry reserves (the window and the month
    hold it while it runs) and its reconcile leaves the month its use, once; a
    replay of the finished run is then admitted uncharged, even on a spent budget."""
    key, limits = f"key_{uuid.uuid4().hex[:8]}", Limits(tokens_per_minute=150, monthly_tokens=150)
    admission = Admission(ModelRegistry(), None, budgets, "w")
    first = _request(key, "job-8:0", limits, job=job)
    await admission.reserve(first)
    await _give_back(admission, first, "released")
    retry = _request(key, "job-8:0", limits, job=job)
    await admission.reserve(retry)
    assert (await _month_used(budgets, key), await _minute_used(budgets, key)) == (100, 100)
    admission.settle(retry, 40)
    await _settled(admission)
    assert await _month_used(budgets, key) == 40
    await admission.reserve(_request(key, f"direct-{uuid.uuid4().hex}", limits, job=False))
    replay = _request(key, "job-8:0", limits, job=job)  # its jobs replica died after it ran
    await admission.reserve(replay)  # 140 + 100 > 150: admitted as the finished run's replay
    admission.settle(replay, 40)
    await _settled(admission)
    assert await _month_used(budgets, key) == 140


async def test_a_forgotten_reservation_reaching_redis_late_still_charges_nothing(budgets):
    """The forgotten call's own copy charges nothing; the next attempt reserves."""
    key, limits = f"key_{uuid.uuid4().hex[:8]}", Limits(tokens_per_minute=1000, monthly_tokens=1000)
    now = time.time()
    assert not await budgets.forget(key, "job-3:0", now, attempt="a1")  # before its reserve
    await budgets.reserve(key, limits, "job-3:0", 100, now, attempt="a1")  # arrives late
    assert await _month_used(budgets, key) == 0
    await budgets.reserve(key, limits, "job-3:0", 100, now, attempt="a2")  # the retry
    assert await _month_used(budgets, key) == 100
    await budgets.reserve(key, limits, "job-3:0", 100, now, attempt="a3")  # its replay
    assert await _month_used(budgets, key) == 100
    await budgets.reconcile(key, "job-3:0", 100, 30, now, run="finished")
    assert await _month_used(budgets, key) == 30


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def _room_in_queue(service: Any) -> None:
    """Waits until the worker runs nothing (the slot holder left)."""
    deadline = time.monotonic() + 5
    while any(m.scheduler.stats()["running"] for m in service.registry.all() if m.scheduler):
        assert time.monotonic() < deadline, "the slot was never freed"
        await asyncio.sleep(0.01)


async def test_a_job_item_refused_at_a_full_queue_is_budgeted_again_when_retried(
    tmp_path, redis_url
):
    """Over gRPC, as the jobs service calls: the item is refused QUEUE_FULL (its
    reservation given back), a direct request spends the month, and the item's retry
    under the same id is refused TOKEN_BUDGET_EXCEEDED instead of running free."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    owner = [
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-scopes", "inference:generate"),
        ("x-tokenmesh-monthly-tokens", "41"),  # prompt "a" (1) + 40: one request's worth
    ]
    request = {"model": "deterministic-test", "prompt": "a", "max_output_tokens": 40}
    item = v2.CompleteRequest(**request, request_id="job-5:0", priority=resources.PRIORITY_BATCH)
    settings = inference_settings(
        tmp_path, redis_url, max_queue=0, max_sequences=1, test_engine_step_ms=20.0
    )
    budgets = TokenBudgets(aioredis.from_url(redis_url))
    try:
        async with await start_inference(settings) as (service, channel):
            stub = v2_rpc.InferenceServiceStub(channel)
            port = service._running.port  # noqa: SLF001 - the bound port
            async with mtls.aio_channel(port, peer="worker", caller="jobs") as jobs_channel:
                jobs = v2_rpc.InferenceServiceStub(jobs_channel)
                holder = stub.Generate(
                    v2.GenerateRequest(
                        model="deterministic-test", prompt="b", max_output_tokens=400
                    )
                )
                await holder.read()  # it holds the only slot
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    await jobs.Complete(item, metadata=owner)
                assert _reason(full.value) == "QUEUE_FULL"
                holder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await holder.read()
                await _room_in_queue(service)
                deadline = time.monotonic() + 5
                while await _month_used(budgets, key) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)  # given back in the background
                await stub.Complete(v2.CompleteRequest(**request), metadata=owner)
                with pytest.raises(grpc.aio.AioRpcError) as spent:
                    await jobs.Complete(item, metadata=owner)
                assert spent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert _reason(spent.value) == "TOKEN_BUDGET_EXCEEDED"
    finally:
        await budgets.redis.aclose()


async def test_a_settlement_after_its_months_counter_expired_leaves_no_counter(budgets):
    # A job item's replay settles in its first attempt's month, up to 8 days on; a
    # month's counter expires a day after the month. INCRBY and DECRBY made it again,
    # negative and with no expiry: a key that never went away.
    key, now = f"k-{uuid.uuid4().hex[:8]}", time.time()
    month = TokenBudgets.month_key(key, now)
    limits = Limits(monthly_tokens=10_000)
    for run, settle in (("1", "reconcile"), ("2", "forget")):
        request_id = f"job-{uuid.uuid4().hex[:8]}:{run}"
        reserved = await budgets.reserve(
            key, limits, request_id, 500, now, attempt=run, listed=True, replay_ttl_s=7 * 86400
        )
        await budgets.redis.delete(month)  # the month ended a day ago
        if settle == "reconcile":
            await budgets.reconcile(key, request_id, 500, 120, reserved.reserved_at, "finished")
        else:
            await budgets.forget(key, request_id, now, run)
        assert await budgets.redis.exists(month) == 0, settle
