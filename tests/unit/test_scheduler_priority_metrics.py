"""TTFT and queue depth by priority class: batch work stays out of the interactive series.

Batch sequences (job items, shadow copies, v2 PRIORITY_BATCH) wait behind every
interactive request by design. The TTFT SLO, TokenmeshQueueSaturated and both
autoscalers read priority="interactive" only: batch samples in those series
paged and scaled GPU workers out on a backlog that was meant to wait.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import REGISTRY

from services.inference.scheduler import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    Scheduler,
    SchedulerLimits,
)
from tests.unit.test_scheduler_admission import GatedEngine
from tests.unit.test_scheduler_liveness import _finished, _params

_LABELS = itertools.count()


def _labels() -> tuple[str, str]:
    """Returns metric labels no other scheduler of this process uses."""
    return (f"priority-{next(_LABELS)}", "1")


def _sample(name: str, labels: tuple[str, str], priority: str) -> float | None:
    series = {"model": labels[0], "version": labels[1], "priority": priority}
    return REGISTRY.get_sample_value(name, series)


async def _until_depths(labels: tuple[str, str], interactive: float, batch: float) -> None:
    async with asyncio.timeout(5):
        while (
            _sample("tokenmesh_queue_depth", labels, "interactive") != interactive
            or _sample("tokenmesh_queue_depth", labels, "batch") != batch
        ):
            await asyncio.sleep(0.01)


async def test_batch_work_waits_in_its_own_queue_depth_and_ttft_series() -> None:
    engine = GatedEngine(step_s=0.005)
    labels = _labels()
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=1), labels)
    await sched.start()
    try:
        running = sched.submit([1], _params(max_tokens=100), PRIORITY_INTERACTIVE, None)
        await asyncio.wait_for(running.outbox.get(), 5)
        # One slot, taken: a job item and then an interactive request wait for it.
        batch = sched.submit([2], _params(max_tokens=2), PRIORITY_BATCH, None)
        waiting = sched.submit([3], _params(max_tokens=2), PRIORITY_INTERACTIVE, None)
        await _until_depths(labels, interactive=1, batch=1)
        for seq in (running, waiting, batch):
            assert (await _finished(seq)).reason == "length"
        await _until_depths(labels, interactive=0, batch=0)
        # Interactive first (strict priority): the batch item waited for both.
        assert batch.first_token_at is not None and waiting.first_token_at is not None
        assert batch.first_token_at > waiting.first_token_at
        count = "tokenmesh_time_to_first_token_seconds_count"
        assert _sample(count, labels, "interactive") == 2
        assert _sample(count, labels, "batch") == 1
        # The batch item's wait is in the batch series only.
        total = "tokenmesh_time_to_first_token_seconds_sum"
        batch_ttft = batch.first_token_at - batch.submitted_at
        assert _sample(total, labels, "batch") == pytest.approx(batch_ttft)
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_the_load_report_counts_interactive_waiting_only(monkeypatch) -> None:
    # Load-aware routing prices a worker by its queue: waiting copies and job items
    # (behind every interactive request) pushed live traffic off it (weight 100 -> 20).
    from types import SimpleNamespace

    from services.inference import load_report
    from tokenmesh.router.v1 import router_pb2

    engine = GatedEngine(step_s=0.005)
    sched = Scheduler(engine, engine.eos_token_id, SchedulerLimits(max_sequences=1), _labels())
    await sched.start()
    try:
        running = sched.submit([1], _params(max_tokens=100), PRIORITY_INTERACTIVE, None)
        await asyncio.wait_for(running.outbox.get(), 5)
        batch = [sched.submit([2], _params(max_tokens=2), PRIORITY_BATCH, None) for _ in range(3)]
        waiting = sched.submit([3], _params(max_tokens=2), PRIORITY_INTERACTIVE, None)
        monkeypatch.setattr(
            load_report, "version_outcomes_pb", lambda _: router_pb2.VersionOutcomes()
        )
        outcomes = SimpleNamespace(recent_ttfts=lambda _at: [])
        model = SimpleNamespace(scheduler=sched, embedder=None, outcomes=outcomes)
        async with asyncio.timeout(5):
            while sched.stats()["waiting"] != 4:
                await asyncio.sleep(0.01)
        assert load_report.worker_load([model]).queue_depth == 1  # type: ignore[list-item]
        for seq in (running, waiting, *batch):
            await _finished(seq)
    finally:
        await sched.stop(drain_timeout_s=0)
