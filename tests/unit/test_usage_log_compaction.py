"""Compacting the usage spool survives a power loss: the emptied spool's cursor
is on disk before the spool is emptied, so no event appended afterwards is
skipped on restart; and an event appended while compaction waits for the disk
is kept."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core.tasks import Supervisor
from services.inference import usage_log
from services.inference.usage_log import UsageLog
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

# Compact every few events (instead of every MiB).
COMPACT_BYTES = 200


def _event(i: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=f"req-{i}",
        model=types_pb2.ModelRef(name="m", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=i, completion_tokens=2 * i, total_tokens=3 * i),
        finish_reason="length",
    )


def _record_size(event: inference_pb2.UsageEvent) -> int:
    return 4 + event.ByteSize()  # a 4-byte length, then the event


async def _stream_ids(client: aioredis.Redis, stream: str) -> list[str]:
    entries: Any = await client.xrange(stream)  # redis-py types the reply loosely
    return [fields[b"request_id"].decode() for _, fields in entries]


async def _until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


class _Disk:
    """What a power loss keeps of a directory's files: each as of its last fsync.

    Passed as UsageLog's `fsync`: every call records the bytes of the file the
    descriptor refers to. A file never synced keeps whatever the kernel wrote
    back on its own: possibly an old version.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.synced: dict[str, bytes] = {}

    def __call__(self, fd: int) -> None:
        os.fsync(fd)
        inode = os.fstat(fd).st_ino
        for path in self.directory.iterdir():
            if path.stat().st_ino == inode:
                self.synced[path.name] = path.read_bytes()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(redis_url)
    yield redis
    await redis.aclose()


async def test_a_power_loss_after_a_compaction_skips_no_synced_event(
    tmp_path: Path, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "_COMPACT_BYTES", COMPACT_BYTES)
    worker = tmp_path / "worker"
    worker.mkdir()
    disk = _Disk(worker)
    log = UsageLog(worker, client, f"test:{uuid.uuid4().hex}", 1 << 20, fsync=disk)
    log.start(Supervisor("inference-test"))
    try:
        shipped = [_event(i) for i in range(10)]
        for event in shipped:
            log.append(event)
        await _until(lambda: (worker / "events.log").stat().st_size == 0)  # shipped, compacted
        # The kernel wrote the cursor back before the compaction, not since.
        stale_cursor = b"%020d\n" % sum(_record_size(e) for e in shipped)
        assert int(stale_cursor) >= COMPACT_BYTES
        for i in range(10, 13):
            log.append(_event(i))
        # Power lost now (no await since the appends: nothing of them shipped).
        # The new events count as synced: the fsync thread's next turn syncs them.
        spool = (worker / "events.log").read_bytes()
        cursor = disk.synced.get("events.cursor", stale_cursor)
    finally:
        await log.stop()

    rebooted = tmp_path / "rebooted"
    rebooted.mkdir()
    (rebooted / "events.log").write_bytes(spool)
    (rebooted / "events.cursor").write_bytes(cursor)
    stream = f"test:{uuid.uuid4().hex}"
    restarted = UsageLog(rebooted, client, stream, max_backlog_bytes=1 << 20)
    restarted.start(Supervisor("inference-test"))
    try:
        await _until(lambda: restarted.backlog_bytes() == 0)
        assert await _stream_ids(client, stream) == ["req-10", "req-11", "req-12"]
    finally:
        await restarted.stop()


class _GatedFsync:
    """os.fsync that holds a sync of `fd_of()` until released (appends go on meanwhile)."""

    def __init__(self) -> None:
        self.fd_of: Callable[[], int] = lambda: -1
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, fd: int) -> None:
        if fd == self.fd_of():
            self.entered.set()
            self.release.wait(10)
        os.fsync(fd)


async def test_an_event_appended_while_compaction_syncs_the_cursor_is_kept(
    tmp_path: Path, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "_COMPACT_BYTES", COMPACT_BYTES)
    stream = f"test:{uuid.uuid4().hex}"
    gate = _GatedFsync()
    log = UsageLog(tmp_path, client, stream, 1 << 20, sync_interval_s=3600, fsync=gate)
    gate.fd_of = lambda: log._cursor_fd
    log.start(Supervisor("inference-test"))
    try:
        for i in range(10):
            log.append(_event(i))
        await _until(gate.entered.is_set)  # all shipped; compaction waits for the disk
        log.append(_event(10))
        gate.release.set()
        await _until(lambda: (tmp_path / "events.log").stat().st_size == 0)  # compacted later
        assert await _stream_ids(client, stream) == [f"req-{i}" for i in range(11)]
    finally:
        gate.release.set()
        await log.stop()
