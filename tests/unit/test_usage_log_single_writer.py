"""One writer per usage spool: a second process on a worker's spool waits for the
first (draining) and fails at start if it does not let go.

The launcher's state-dir lock is freed as soon as the launcher dies (SIGKILL), while
its workers still drain; a new `make run` then started a second worker of the same
id on the same spool: two processes appending to one segment and moving one cursor.
Real processes: the holder is a separate Python process.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.inference.usage_log import SpoolBusy, UsageLog
from services.launcher.processes import reserve_port

REPO = Path(__file__).resolve().parents[2]
# A worker's spool, held until a line arrives on stdin; then it appends its last event
# (a draining worker's last request) and stops as a worker does.
HOLDER = """
import asyncio, sys
from pathlib import Path
import redis.asyncio as aioredis
from services.inference.usage_log import UsageLog
from tokenmesh.inference.v1 import inference_pb2
log = UsageLog(Path(sys.argv[1]), aioredis.from_url(sys.argv[2]), "s", 1 << 20)
print("held", flush=True)
sys.stdin.readline()
log.append(inference_pb2.UsageEvent(request_id="last"))
asyncio.run(log.stop(timeout_s=0))
"""
DEADLINE_S = 30.0


def _client() -> aioredis.Redis:
    """A client nothing answers: these tests never ship (it connects only when used)."""
    return aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the spool at tmp_path/spool."""
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER,
            str(tmp_path / "spool"),
            f"redis://127.0.0.1:{reserve_port()}",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:  # closes its pipes
        assert process.stdout is not None
        assert process.stdout.readline() == "held\n", "the holder did not open the spool"
        try:
            yield process
        finally:
            process.kill()


def test_a_second_process_on_a_held_spool_fails_at_start(tmp_path, holder):
    spool = tmp_path / "spool"
    before = sorted(p.name for p in spool.iterdir())
    with pytest.raises(SpoolBusy, match=r"still in use by another process.*TOKENMESH_WORKER_ID"):
        UsageLog(spool, _client(), "s", 1 << 20, lock_wait_s=0.3)
    assert sorted(p.name for p in spool.iterdir()) == before  # it touched nothing


def test_a_worker_waits_for_the_previous_one_to_finish_draining(tmp_path, holder, caplog):
    caplog.set_level(logging.WARNING, "services.inference.usage_log")
    opened: list[UsageLog] = []
    second = threading.Thread(
        target=lambda: opened.append(UsageLog(tmp_path / "spool", _client(), "s", 1 << 20)),
    )
    second.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not any("waiting up to" in r.getMessage() for r in caplog.records):
            assert not opened, "the second opened a spool another process held"
            assert time.monotonic() < deadline, "the second neither waited nor opened"
            time.sleep(0.01)
        assert not opened
    finally:
        assert holder.stdin is not None
        holder.stdin.write("drained\n")  # the holder appends its last event and stops
        holder.stdin.flush()
        second.join(DEADLINE_S)
    assert holder.wait(DEADLINE_S) == 0
    [log] = opened
    # It opened the spool once the holder was done: the holder's last event is its backlog.
    assert log.backlog_bytes() > 0
    asyncio.run(log.stop(timeout_s=0))


def test_a_child_process_does_not_keep_the_spool_locked(tmp_path):
    async def scenario() -> None:
        log = UsageLog(tmp_path / "spool", _client(), "s", 1 << 20)
        # close_fds=False: only the descriptor's close-on-exec keeps it from the child.
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], close_fds=False
        )
        try:
            await log.stop(timeout_s=0)
            again = UsageLog(tmp_path / "spool", _client(), "s", 1 << 20, lock_wait_s=0)
            await again.stop(timeout_s=0)
            assert child.poll() is None  # the child still runs
        finally:
            child.kill()
            child.wait(10)

    asyncio.run(scenario())
