"""One launcher per state dir: a second one is refused, naming the first one's pid.

Two launchers on one state dir ran two Redis servers appending to one AOF (a
restart replayed both: usage totals double-counted) and two workers of each id
writing one usage spool. The holders here are real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from services.launcher.lock import StateDirBusy, StateDirLock

# Takes the lock, says so, and holds it until killed.
HOLDER = (
    "import sys, time; from pathlib import Path; "
    "from services.launcher.lock import StateDirLock; "
    "StateDirLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
)


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of tmp_path/state/run; yields it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "state" / "run")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_a_second_launcher_is_refused_with_the_first_ones_pid(tmp_path, holder):
    with pytest.raises(StateDirBusy) as refused:
        StateDirLock.acquire(tmp_path / "state" / "run")
    message = str(refused.value)
    assert f"pid {holder.pid}" in message and str(tmp_path / "state") in message


def test_the_lock_is_free_again_once_its_holder_is_killed(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock
    holder.wait(10)
    lock = StateDirLock.acquire(tmp_path / "state" / "run")
    try:
        assert lock.held
        assert (tmp_path / "state" / "run" / "launcher.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_a_released_lock_can_be_taken_again(tmp_path):
    run_dir = tmp_path / "run"
    first = StateDirLock.acquire(run_dir)
    with pytest.raises(StateDirBusy):  # flock: another descriptor of one process too
        StateDirLock.acquire(run_dir)
    first.release()
    first.release()  # idempotent
    StateDirLock.acquire(run_dir).release()


def test_children_do_not_inherit_the_lock(tmp_path):
    """A child that outlived its launcher must not keep the state dir locked (the
    descriptor is close-on-exec even where a spawner keeps descriptors open)."""
    lock = StateDirLock.acquire(tmp_path / "run")
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    child = subprocess.Popen(sleeper, close_fds=False, stdout=subprocess.PIPE, text=True)
    try:
        # Up and running: the kernel lets the spawner go on a moment before the
        # child's exec has closed its close-on-exec descriptors.
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        lock.release()
        StateDirLock.acquire(tmp_path / "run").release()
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
