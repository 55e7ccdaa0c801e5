"""The embedder's compute thread: ordered calls, shutdown, and no thread left behind."""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time

import pytest

from services.inference.embedder import ComputeThread


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def _until_gone(name: str) -> None:
    deadline = time.monotonic() + 5
    while _threads(name) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads(name) == []


def test_shutdown_cancels_the_queued_calls_and_the_running_one_finishes() -> None:
    compute = ComputeThread("compute-shutdown")
    started, release = threading.Event(), threading.Event()

    def running() -> str:
        started.set()
        release.wait(5)
        return "done"

    def failing() -> None:
        raise ValueError("engine error")

    first = compute.submit(running)
    queued = compute.submit(lambda: "never")
    assert started.wait(5)
    compute.shutdown()
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        compute.submit(failing)
    assert [t.daemon for t in _threads("compute-shutdown")] == [True]  # exit never waits on it
    release.set()
    assert first.result(5) == "done"
    assert compute.join(5)
    _until_gone("compute-shutdown")


def test_an_error_reaches_its_caller_and_later_calls_still_run() -> None:
    compute = ComputeThread("compute-errors")

    def failing() -> None:
        raise ValueError("engine error")

    failed = compute.submit(failing)
    after = compute.submit(lambda: 2)
    with pytest.raises(ValueError, match="engine error"):
        failed.result(5)
    assert after.result(5) == 2
    compute.shutdown()
    assert compute.join(5)


def test_one_dropped_without_shutdown_ends_its_thread() -> None:
    # A model whose warm-up failed is never stopped: its embedder's thread would
    # wait on an empty queue for as long as the process runs.
    compute = ComputeThread("compute-dropped")
    done: concurrent.futures.Future[int] = compute.submit(lambda: 1)
    assert done.result(5) == 1 and len(_threads("compute-dropped")) == 1
    del compute
    gc.collect()
    _until_gone("compute-dropped")
