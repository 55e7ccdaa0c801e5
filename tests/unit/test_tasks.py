"""Background tasks: supervised (restarts, backoff, health), and stopped even when a
cancellation gets lost (as redis-py can lose one)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from prometheus_client import REGISTRY

from services.core.tasks import HealthGate, RestartPolicy, Supervisor, cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_still_stops_promptly():
    swallowed = 0

    async def forgetful_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 1:
                    continue  # like a Redis read whose timeout ate the cancellation
                raise

    task = asyncio.create_task(forgetful_loop())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await cancel_and_wait(task, timeout_s=5)
    assert task.cancelled() and swallowed == 2
    assert asyncio.get_running_loop().time() - started < 1


async def test_a_task_that_will_not_stop_is_given_up_on_after_the_timeout(caplog):
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="compute-sizes")
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await cancel_and_wait(task, timeout_s=0.2)
    assert not task.done() and asyncio.get_running_loop().time() - started < 1
    # Named: left running silently, it used what its owner closed next (a Redis pool).
    assert "task compute-sizes still runs" in caplog.text
    release.set()
    task.cancel()  # one more wake-up: it sees the release and ends
    await task


# --- Supervision ---------------------------------------------------------------------------

FAST = RestartPolicy(
    first_backoff_s=0.01, max_backoff_s=0.05, unhealthy_after=3, healthy_after_s=0.2
)


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Waits until `condition()` holds (polling), or fails the test."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def _restarts(service: str, task: str) -> float:
    labels = {"service": service, "task": task}
    return REGISTRY.get_sample_value("tokenmesh_background_task_restarts_total", labels) or 0.0


class _Sink:
    """Records what a HealthGate applied, as RunningServer.set_serving would receive it."""

    def __init__(self) -> None:
        self.applied: list[bool] = []

    async def __call__(self, serving: bool) -> None:
        self.applied.append(serving)


def test_backoff_doubles_from_the_first_wait_up_to_the_cap():
    policy = RestartPolicy(first_backoff_s=0.1, max_backoff_s=1.0)
    assert [policy.backoff_s(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.backoff_s(10_000) == 1.0  # no overflow after a long outage


async def test_a_failing_task_is_restarted_with_a_fresh_run_and_counted():
    service = f"svc-{uuid.uuid4().hex[:6]}"
    runs = 0
    settled = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"boom {runs}")
        settled.set()
        await asyncio.Event().wait()

    supervisor = Supervisor(service, policy=FAST)
    task = supervisor.spawn("flaky", flaky)
    await asyncio.wait_for(settled.wait(), 5)
    assert runs == 3 and _restarts(service, "flaky") == 2
    assert supervisor.gate.serving  # two failures in a row are below unhealthy_after
    await supervisor.stop()
    assert task.done() and runs == 3  # a stopped task is not restarted


async def test_a_task_that_cannot_recover_flips_health_and_back_once_it_runs_again():
    service = f"svc-{uuid.uuid4().hex[:6]}"
    dependency_up = False
    gate, sink = HealthGate(), _Sink()
    gate.attach(sink)

    async def needs_dependency() -> None:
        if not dependency_up:
            raise ConnectionError("dependency down")
        await asyncio.Event().wait()

    supervisor = Supervisor(service, gate, FAST)
    task = supervisor.spawn("needs-dependency", needs_dependency)
    await _until(lambda: sink.applied == [False])
    assert task.failures >= FAST.unhealthy_after and gate.failing() == {"task needs-dependency"}
    dependency_up = True
    await _until(lambda: sink.applied == [False, True])
    assert task.failures == 0 and gate.serving
    await supervisor.stop()


async def test_a_task_that_returns_has_finished_and_is_not_restarted():
    service = f"svc-{uuid.uuid4().hex[:6]}"
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    supervisor = Supervisor(service, policy=FAST)
    task = supervisor.spawn("once", once)
    await _until(task.done)
    assert runs == 1 and _restarts(service, "once") == 0


async def test_a_cancelled_task_is_not_restarted():
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = Supervisor("svc", policy=FAST).spawn("forever", forever)
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await _until(task.done)


async def test_the_gate_serves_only_while_every_condition_holds_and_applies_changes_once():
    gate, sink = HealthGate(), _Sink()
    await gate.report("redis", False)  # before the server serves: recorded, not applied
    assert sink.applied == [] and not gate.serving
    await gate.report("redis", True)
    gate.attach(sink)
    await gate.report("redis", False)
    await gate.report("task meter", False)
    await gate.report("redis", True)  # the meter still fails
    assert sink.applied == [False] and gate.failing() == {"task meter"}
    await gate.report("task meter", True)
    await gate.report("task meter", True)
    assert sink.applied == [False, True]
