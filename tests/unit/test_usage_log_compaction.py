"""The usage spool's segments are crash-safe: a crash (kill -9) between any two
steps of appending, rolling to a new segment, shipping, moving the cursor and
deleting an applied segment loses no event and replays at most the batch Redis
had taken before the cursor moved; a power loss that keeps a stale cursor, or
undoes deletes, only replays; and a cursor left past the spool's end by a power
loss never makes a later event look shipped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core.tasks import Supervisor
from services.inference import usage_log
from services.inference.usage_log import UsageLog, spool_mark_key
from services.launcher.processes import reserve_port
from services.usage.meter import Meter, Retention
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

# A new segment every few events (instead of every MiB).
SEGMENT_BYTES = 200


def _event(i: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=f"req-{i}",
        model=types_pb2.ModelRef(name="m", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=i, completion_tokens=2 * i, total_tokens=3 * i),
        finish_reason="length",
    )


def _records(events: range) -> bytes:
    bodies = (_event(i).SerializeToString() for i in events)
    return b"".join(struct.pack(">I", len(body)) + body for body in bodies)


async def _stream_ids(client: aioredis.Redis, stream: str) -> list[str]:
    entries: Any = await client.xrange(stream)  # redis-py types the reply loosely
    return [fields[b"request_id"].decode() for _, fields in entries]


async def _until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def _files(directory: Path) -> dict[str, bytes]:
    """A process crash's image of the spool: every file as the page cache holds it."""
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(redis_url)
    yield redis
    await redis.aclose()


async def _restart(directory: Path, files: dict[str, bytes], client: aioredis.Redis) -> list[str]:
    """Starts a spool on `files`, ships all of it to a new stream; returns what shipped."""
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    stream = f"test:{uuid.uuid4().hex}"
    restarted = UsageLog(directory, client, stream, max_backlog_bytes=1 << 20)
    restarted.start(Supervisor("inference-test"))
    try:
        await _until(lambda: restarted.backlog_bytes() == 0)
    finally:
        await restarted.stop()
    shipped = await _stream_ids(client, stream)
    await client.delete(stream)
    return shipped


async def _restart_on(
    directory: Path, crash: _Crash, client: aioredis.Redis, stream: str
) -> list[str]:
    """Starts a spool on a crash image against the Redis it crashed with (the stream,
    and the spool's shipped mark as Redis held it then); returns what it shipped, once
    it has forgotten what the meter had applied."""
    directory.mkdir()
    for name, data in crash.files.items():
        (directory / name).write_bytes(data)
    spool_id = crash.files["events.id"].decode().strip()
    await client.set(spool_mark_key(stream, spool_id, "shipped"), crash.mark)
    newest: Any = await client.xrevrange(stream, count=1)
    restarted = UsageLog(directory, client, stream, 1 << 20, applied_grace_s=0)
    restarted.start(Supervisor("inference-test"))
    try:
        await _until(lambda: restarted.backlog_bytes() == 0)
        # Everything was applied by the live run's meter: forgotten once the marks are read.
        await _until(lambda: len(list(directory.glob("events.*.log"))) == 1)
    finally:
        await restarted.stop()
    entries: Any = await client.xrange(stream, min=b"(" + newest[0][0])
    return [fields[b"request_id"].decode() for _, fields in entries]


@dataclass
class _Crash:
    """The spool's files at one step, and what Redis had acknowledged by then."""

    step: str
    files: dict[str, bytes]
    appended: list[str]
    acked: set[str]
    uncommitted: set[str]  # acknowledged, the cursor not yet past them
    mark: int = 0  # the spool's shipped mark in Redis


class _Recorder:
    """Takes a crash image of the spool between every two steps of a running UsageLog.

    Wraps the log's own steps (instance attributes shadow the methods) and its
    real Redis client's script calls, to know what Redis had acknowledged at each image.
    """

    def __init__(self, log: UsageLog, redis: aioredis.Redis) -> None:
        self.log, self.redis = log, redis
        self.crashes: list[_Crash] = []
        self.appended: list[str] = []
        self.acked: set[str] = set()
        self.uncommitted: set[str] = set()
        self.mark = 0
        self.on_trip: Callable[[], None] = lambda: None
        log.client = self  # type: ignore[assignment]
        self._wrap("append", before=False)
        self._wrap("_roll", before=True)
        self._wrap("_write_cursor", before=False)
        self._wrap("_write_kept", before=True)
        self._wrap("_forget_applied_segments", before=True)

    def image(self, step: str) -> None:
        self.crashes.append(
            _Crash(
                step,
                _files(self.log.directory),
                list(self.appended),
                set(self.acked),
                set(self.uncommitted),
                self.mark,
            )
        )

    def _wrap(self, name: str, before: bool) -> None:
        inner = getattr(self.log, name)

        def step(*args: Any) -> Any:
            if before:
                self.image(f"before {name}")
            result = inner(*args)
            if name == "_write_cursor":
                self.uncommitted.clear()  # the cursor is past them
            if name == "append":  # written: from now on it must not be lost
                self.appended.append(args[0].request_id)
            self.image(f"after {name}")
            return result

        setattr(self.log, name, step)

    async def mget(self, *keys: str) -> Any:
        return await self.redis.mget(*keys)

    async def script_load(self, script: str) -> Any:
        return await self.redis.script_load(script)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        """The ship script's call: XADDs a batch and sets the spool's shipped mark."""
        ids = [str(i) for i in keys_and_args[numkeys + 4 :: 3]]
        self.image("before XADD")
        result: Any = await self.redis.evalsha(sha, numkeys, *keys_and_args)
        self.on_trip()  # a request finished meanwhile: shipping lags appending
        assert result[0] == 1  # Redis lost nothing here
        self.mark = result[1]
        self.acked.update(ids)
        self.uncommitted.update(ids)
        self.image("after XADD, before the cursor")
        return result


async def test_a_crash_between_any_two_steps_loses_no_event(
    tmp_path: Path, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", SEGMENT_BYTES)
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.01)
    worker = tmp_path / "worker"
    stream = f"test:{uuid.uuid4().hex}"
    log = UsageLog(worker, client, stream, 1 << 20, applied_grace_s=0)
    recorder = _Recorder(log, client)
    # The usage service's meter, applying as events arrive (so that segments are deleted).
    meter = Meter(client, stream, "usage-meter", "c1", Retention())
    await meter.ensure_group()
    supervisor = Supervisor("usage-test")
    metering = supervisor.spawn("usage-meter", meter.run_forever)
    busy = iter(range(100, 130))

    def three_more() -> None:  # a roll between two of them: the cursor stops inside a segment
        for i in itertools.islice(busy, 3):
            log.append(_event(i))

    log.start(Supervisor("inference-test"))
    try:
        for burst in range(6):  # rolls while shipping and while idle
            for i in range(5 * burst, 5 * burst + 5):
                log.append(_event(i))
            await _until(lambda: log.backlog_bytes() == 0)
        recorder.on_trip = three_more  # then rolls while a segment is partly shipped
        log.append(_event(99))
        await _until(lambda: log.appended_total == 61 and log.backlog_bytes() == 0)
        await _until(lambda: log.kept_bytes() == 0)  # all applied, all forgotten
    finally:
        await log.stop()
        await metering.stop(timeout_s=5)
    steps = {crash.step for crash in recorder.crashes}
    assert {
        "after _roll",
        "before _write_kept",
        "before _forget_applied_segments",
        "after XADD, before the cursor",
    } <= steps
    assert any(len(c.files) > 2 for c in recorder.crashes)  # several segments at once
    # A full segment still partly unshipped (the cursor inside it) when an image was taken.
    assert any(c.uncommitted and len(c.files) > 2 for c in recorder.crashes)

    for n, crash in enumerate(recorder.crashes):
        shipped = await _restart_on(tmp_path / f"crash-{n}", crash, client, stream)
        where = f"crash {n} {crash.step}"
        # Nothing lost: each event Redis had not taken ships after the restart.
        assert set(crash.appended) <= crash.acked | set(shipped), where
        # In order, once each; replayed only if Redis took it before the cursor moved.
        assert shipped == [i for i in crash.appended if i in shipped], where
        assert set(shipped) & crash.acked <= crash.uncommitted, where
        # (A delete the crash cut short is done at the restart: _restart_on waits until
        # only the newest segment stays.)


class _Disk:
    """What a power loss keeps of a directory's files: each as of its last fsync.

    Passed as UsageLog's `fsync`: every call records the bytes of the file the
    descriptor refers to, even if it was deleted since (a power loss can undo an
    unsynced delete).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.synced: dict[str, bytes] = {}

    def __call__(self, fd: int) -> None:
        os.fsync(fd)
        inode = os.fstat(fd).st_ino
        for path in self.directory.iterdir():
            with contextlib.suppress(FileNotFoundError):  # shipped and deleted meanwhile
                if path.stat().st_ino == inode:
                    self.synced[path.name] = path.read_bytes()


async def test_a_power_loss_undoing_deletes_and_cursor_writes_only_replays(
    tmp_path: Path, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", SEGMENT_BYTES)
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.01)
    worker = tmp_path / "worker"
    worker.mkdir()
    disk = _Disk(worker)
    dead = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)
    stream = f"test:{uuid.uuid4().hex}"
    log = UsageLog(worker, client, stream, 1 << 20, fsync=disk, applied_grace_s=0)
    try:
        for i in range(10):
            log.append(_event(i))
        await log.sync()  # every segment on disk before it ships
        log.start(Supervisor("inference-test"))
        await _until(lambda: log.backlog_bytes() == 0)
        meter = Meter(client, stream, "usage-meter", "c1", Retention())
        await meter.ensure_group()
        assert await meter.run_once(block_ms=100) == 10
        # The applied ones deleted.
        await _until(lambda: len(list(worker.glob("events.*.log"))) == 1)
        log.client = dead  # Redis goes away: what follows is spooled, not shipped
        for i in range(10, 13):
            log.append(_event(i))
        await log.sync()
        # Power lost now: every segment ever synced comes back (deletes undone) and
        # the cursor as the kernel last wrote it back: here, never.
        image = dict(disk.synced)
    finally:
        await log.stop(timeout_s=0)
        await dead.aclose()
    assert len(image) == 3 and "events.cursor" not in image  # two shipped segments, one not

    shipped = await _restart(tmp_path / "rebooted", image, client)
    assert shipped[-3:] == ["req-10", "req-11", "req-12"]
    assert shipped[:-3] == [f"req-{i}" for i in range(10)]  # replays, deduplicated by the meter


async def test_a_cursor_past_the_spools_end_never_skips_later_events(
    tmp_path: Path, client: aioredis.Redis
) -> None:
    # Events 0-9 shipped; a power loss kept the cursor written after them but
    # not the unsynced tail of the spool (events 3-9).
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "events.log").write_bytes(_records(range(3)))  # a spool of the earlier layout
    (spool / "events.cursor").write_bytes(b"%020d\n" % len(_records(range(10))))
    dead = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)
    log = UsageLog(spool, dead, "s", max_backlog_bytes=1 << 20)
    for i in range(10, 13):
        log.append(_event(i))
    await log.stop(timeout_s=0)  # synced, not shipped; then a second power loss or crash
    await dead.aclose()

    image = _files(spool)
    shutil.rmtree(spool)
    assert await _restart(spool, image, client) == ["req-10", "req-11", "req-12"]
