"""The usage spool ships every event to a real Redis Stream, loses none when
Redis is down or the worker restarts, and fsyncs what it holds within its
sync interval."""

from __future__ import annotations

import asyncio
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.core.errors import Unavailable
from services.core.tasks import Supervisor
from services.inference import usage_log
from services.inference.usage_log import UsageLog
from services.launcher.processes import reserve_port
from services.usage.meter import Meter, Retention
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2


def _event(i: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=f"req-{i}",
        model=types_pb2.ModelRef(name="m", version="1"),
        usage=types_pb2.TokenUsage(prompt_tokens=i, completion_tokens=2 * i, total_tokens=3 * i),
        finish_reason="length",
    )


async def _stream_ids(client: Any, stream: str) -> list[str]:
    entries = await client.xrange(stream)
    return [fields[b"request_id"].decode() for _, fields in entries]


def _supervisor() -> Supervisor:
    return Supervisor("inference-test")


class _CountingFsync:
    """Wraps os.fsync: counts calls and what had been appended at each one."""

    def __init__(self) -> None:
        self.calls = 0
        self.fds: set[int] = set()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.fds.add(fd)
        os.fsync(fd)


def _dead_redis() -> Any:
    return aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)


async def _until(condition: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def _meter(client: Any, stream: str) -> None:
    """Applies everything in `stream`, as the usage service's meter does."""
    meter = Meter(client, stream, "usage-meter", "c1", Retention())
    await meter.ensure_group()
    while await meter.run_once(block_ms=50):
        pass


async def _wait_shipped(log: UsageLog, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while log.backlog_bytes():
            await asyncio.sleep(0.02)


async def test_events_reach_the_stream_intact(tmp_path, redis_url):
    stream = f"test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    log = UsageLog(tmp_path, client, stream, max_backlog_bytes=1 << 20)
    log.start(_supervisor())
    try:
        for i in range(50):
            log.append(_event(i))
        await _wait_shipped(log)
        entries = await client.xrange(stream)
        assert [fields[b"request_id"].decode() for _, fields in entries] == [
            f"req-{i}" for i in range(50)
        ]
        decoded = inference_pb2.UsageEvent.FromString(entries[7][1][b"event"])
        assert decoded.usage.completion_tokens == 14 and decoded.model.name == "m"
    finally:
        await log.stop()
        await client.aclose()


class _CountingReads:
    """Wraps a UsageLog's spool reader: counts how often the shipper reads the file."""

    def __init__(self, log: UsageLog) -> None:
        self.calls = 0
        self._read = log._read
        log._read = self  # type: ignore[method-assign]

    def __call__(
        self, path: Path, base: int, start: int, max_bytes: int
    ) -> tuple[list[tuple[str, bytes, int]], int]:
        self.calls += 1
        return self._read(path, base, start, max_bytes)


async def test_what_this_process_appends_ships_from_memory(tmp_path, redis_url):
    stream = f"test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    log = UsageLog(tmp_path, client, stream, max_backlog_bytes=1 << 20)
    reads = _CountingReads(log)
    log.start(_supervisor())
    try:
        for batch in range(5):
            for i in range(10 * batch, 10 * batch + 10):
                log.append(_event(i))
            await _wait_shipped(log)
        assert await _stream_ids(client, stream) == [f"req-{i}" for i in range(50)]
        assert reads.calls == 0  # no thread hop, no file read: the spool is for restarts
        assert not log._recent  # nothing held once shipped
    finally:
        await log.stop()
        await client.aclose()


def _segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("events.*.log"))


async def test_events_ship_in_order_across_segments_and_applied_ones_are_deleted(
    tmp_path, redis_url, monkeypatch
):
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", 200)  # a new segment every few events
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.01)
    stream = f"test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    log = UsageLog(tmp_path, client, stream, max_backlog_bytes=1 << 20, applied_grace_s=0)
    log.start(_supervisor())
    try:
        for batch in range(6):
            for i in range(10 * batch, 10 * batch + 10):
                log.append(_event(i))
            await _wait_shipped(log)
            assert len(_segments(tmp_path)) > 1  # shipped, kept until the meter applies them
            await _meter(client, stream)
            # Every full segment was applied and deleted: only the one appended to is left.
            await _until(lambda: _segments(tmp_path) == [log._log_path.name])
        assert int(log._log_path.name.split(".")[1]) > 1000  # positions went on growing
        assert await _stream_ids(client, stream) == [f"req-{i}" for i in range(60)]
    finally:
        await log.stop()
        await client.aclose()


async def test_a_segment_that_could_not_be_opened_does_not_stop_shipping(
    tmp_path, redis_url, monkeypatch
):
    """A roll whose open() failed (EMFILE, a full disk) sealed the current segment and
    moved to a file never made: the next roll sealed that one, and shipping raised
    FileNotFoundError at it for good (until a restart), the backlog growing."""
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", 200)
    stream = f"test:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    log = UsageLog(tmp_path, client, stream, max_backlog_bytes=1 << 20)
    log.start(_supervisor())
    real_open, failures = open, [OSError(24, "Too many open files")]

    def open_failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_open(*args, **kwargs)

    try:
        for i in range(10):
            log.append(_event(i))
        monkeypatch.setattr(usage_log, "open", open_failing_once, raising=False)
        appended = 10
        for i in range(10, 40):
            try:
                log.append(_event(i))
                appended += 1
            except OSError:  # the one refused: its request is refused, nothing spooled
                pass
        await _wait_shipped(log)
        assert failures == []
        shipped = await _stream_ids(client, stream)
        assert len(shipped) == appended == 39
    finally:
        await log.stop()
        await client.aclose()


async def test_an_earlier_runs_segments_ship_in_order_after_a_restart(
    tmp_path, redis_url, monkeypatch
):
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", 200)
    stream = f"test:{uuid.uuid4().hex}"
    dead = _dead_redis()
    log = UsageLog(tmp_path, dead, stream, max_backlog_bytes=1 << 20)
    for i in range(30):
        log.append(_event(i))
    await log.stop(timeout_s=0)  # several full segments, none shipped
    await dead.aclose()
    assert len(_segments(tmp_path)) >= 5

    live = aioredis.from_url(redis_url)
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.01)
    restarted = UsageLog(tmp_path, live, stream, max_backlog_bytes=1 << 20, applied_grace_s=0)
    for i in range(30, 40):
        restarted.append(_event(i))
    restarted.start(_supervisor())
    try:
        await _wait_shipped(restarted)
        assert await _stream_ids(live, stream) == [f"req-{i}" for i in range(40)]
        await _meter(live, stream)
        await _until(lambda: _segments(tmp_path) == [restarted._log_path.name])
    finally:
        await restarted.stop()
        await live.aclose()


async def test_an_earlier_runs_events_ship_once_before_new_ones(tmp_path, redis_url):
    stream = f"test:{uuid.uuid4().hex}"
    dead = _dead_redis()
    log = UsageLog(tmp_path, dead, stream, max_backlog_bytes=1 << 20)
    for i in range(10):
        log.append(_event(i))
    await log.stop(timeout_s=0)  # stopped (or crashed) with 10 events unshipped
    await dead.aclose()

    live = aioredis.from_url(redis_url)
    restarted = UsageLog(tmp_path, live, stream, max_backlog_bytes=1 << 20)
    reads = _CountingReads(restarted)
    for i in range(10, 30):  # appended before the shipper ran: behind the old ones
        restarted.append(_event(i))
    restarted.start(_supervisor())
    try:
        await _wait_shipped(restarted)
        for i in range(30, 40):
            restarted.append(_event(i))
        await _wait_shipped(restarted)
        assert await _stream_ids(live, stream) == [f"req-{i}" for i in range(40)]
        assert reads.calls >= 1  # the earlier run's events came from the spool
    finally:
        await restarted.stop()
        await live.aclose()


async def test_redis_down_spools_then_ships_after_a_restart(tmp_path: Path, redis_url: str):
    stream = f"test:{uuid.uuid4().hex}"
    dead = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)
    log = UsageLog(tmp_path, dead, stream, max_backlog_bytes=1 << 20)
    log.start(_supervisor())
    for i in range(10):
        log.append(_event(i))
    await asyncio.sleep(0.3)
    assert log.backlog_bytes() > 0  # nothing could be shipped
    await log.stop(timeout_s=0.1)  # the worker stops (or crashes) with events spooled
    await dead.aclose()

    live = aioredis.from_url(redis_url)
    restarted = UsageLog(tmp_path, live, stream, max_backlog_bytes=1 << 20)
    restarted.start(_supervisor())
    try:
        await _wait_shipped(restarted)
        assert await _stream_ids(live, stream) == [f"req-{i}" for i in range(10)]
    finally:
        await restarted.stop()
        await live.aclose()


async def test_a_full_spool_refuses_new_work_instead_of_dropping(tmp_path: Path):
    dead = aioredis.from_url(f"redis://127.0.0.1:{reserve_port()}/0", socket_connect_timeout=0.2)
    log = UsageLog(tmp_path, dead, "s", max_backlog_bytes=200)
    log.check_capacity()
    for i in range(10):
        log.append(_event(i))
    with pytest.raises(Unavailable) as info:
        log.check_capacity()
    assert info.value.reason == "USAGE_BACKLOG_FULL"
    await log.stop(timeout_s=0)
    await dead.aclose()


async def test_spooled_events_are_fsynced_within_the_interval_while_redis_is_down(tmp_path: Path):
    fsync, dead = _CountingFsync(), _dead_redis()
    log = UsageLog(tmp_path, dead, "s", 1 << 20, sync_interval_s=0.05, fsync=fsync)
    log.start(_supervisor())
    try:
        for i in range(20):
            log.append(_event(i))
        assert log.synced_total == 0  # appending never waits for the disk
        await _until(lambda: log.synced_total == 20)
        assert log.backlog_bytes() > 0  # on disk, not shipped: Redis had nothing to do with it
        assert 1 <= fsync.calls < 20  # appends of one interval share an fsync
        assert fsync.fds == {log._log.fileno()}
    finally:
        await log.stop(timeout_s=0)
        await dead.aclose()


async def test_stopping_fsyncs_everything_appended(tmp_path: Path):
    fsync, dead = _CountingFsync(), _dead_redis()
    log = UsageLog(tmp_path, dead, "s", 1 << 20, sync_interval_s=3600, fsync=fsync)
    log.start(_supervisor())
    for i in range(5):
        log.append(_event(i))
    await log.stop(timeout_s=0)
    await dead.aclose()
    assert fsync.calls >= 1 and log.synced_total == log.appended_total == 5


async def test_a_torn_tail_is_set_aside_and_every_whole_event_ships(tmp_path: Path, redis_url: str):
    whole = b"".join(
        struct.pack(">I", len(p)) + p for p in (_event(i).SerializeToString() for i in range(3))
    )
    torn = struct.pack(">I", 40) + b"cut short by a power loss"
    (tmp_path / "events.log").write_bytes(whole + torn)
    stream = f"test:{uuid.uuid4().hex}"
    live = aioredis.from_url(redis_url)
    log = UsageLog(tmp_path, live, stream, max_backlog_bytes=1 << 20)
    log.start(_supervisor())
    try:
        log.append(_event(3))  # lands after the whole records, not after the torn bytes
        await _wait_shipped(log)
        assert await _stream_ids(live, stream) == [f"req-{i}" for i in range(4)]
        assert (tmp_path / f"events.torn-{len(whole)}").read_bytes() == torn
    finally:
        await log.stop()
        await live.aclose()


def test_an_empty_spool_id_left_by_a_cut_first_start_is_made_anew(tmp_path):
    # A crash or a full disk between creating events.id and writing it left it
    # empty: the spool then shipped under the id "" and shared one shipped mark with
    # every other such spool (one rewound into its own records; its shipper spun).
    from services.inference.usage_log import _spool_id

    spool = tmp_path / "w0"
    spool.mkdir()
    (spool / "events.id").write_text("")
    made = _spool_id(spool)
    assert made.startswith("w0.") and len(made) > len("w0.")
    assert (spool / "events.id").read_text().strip() == made
    assert _spool_id(spool) == made  # kept from now on
    assert sorted(p.name for p in spool.iterdir()) == ["events.id"]
