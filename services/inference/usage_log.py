"""Usage events: a local append-only spool shipped to a Redis Stream.

Every finished request appends one `UsageEvent` to `events.log` (length-
prefixed protobuf) *before* anything else can lose it; a shipper task XADDs
events to the stream and then advances a cursor file (it sends what this
process appended from memory, and reads back from the spool only what an
earlier run left unshipped). On restart the shipper
resumes at the cursor (an event may be sent twice; consumers deduplicate by
request_id). The spool is bounded: past `max_backlog_bytes` of unshipped
events the worker refuses new requests (UNAVAILABLE) instead of dropping
records.

Durability, precisely:
- An appended event is in the operating system's page cache when `append`
  returns: a crash of the worker process (even kill -9) or a Redis outage
  loses nothing.
- It is on disk (fsync) at most `sync_interval_s` (+ one fsync) later, or
  sooner once it is in Redis (whose AOF fsyncs every write). A power loss or
  kernel crash of the worker's machine can lose the events appended in that
  last interval that had not reached Redis yet; nothing older.
- A power loss can leave a torn last record; opening the spool sets the torn
  tail aside (`events.torn-<offset>`) instead of shipping garbage.
- A lost cursor write only replays events. The one exception, emptying a
  shipped spool, syncs the zeroed cursor before it truncates the log.
fsync runs on its own thread, never on the event loop; grouping the appends
of an interval into one fsync keeps its cost off the request path.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from services.core.errors import Unavailable
from services.core.tasks import SupervisedTask, Supervisor
from tokenmesh.inference.v1 import inference_pb2

logger = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
SHIP_GATHER_S = 0.005  # pause after each shipped batch (bounds batches per second)
_COMPACT_BYTES = 1 << 20  # rewrite the spool once this much is shipped and nothing is pending
SYNC_INTERVAL_S = 0.02  # the most a power loss can lose of what Redis does not have yet
# Redis unreachable, or refusing for now: the spool rides it out (that is its job).
_REDIS_UNAVAILABLE = (RedisError, ConnectionError, TimeoutError)


def _cursor_record(offset: int) -> bytes:
    """Returns the cursor file's content for `offset` (fixed width: one small write)."""
    return b"%020d\n" % offset


def _intact_length(data: bytes) -> int:
    """Returns how many leading bytes of spool `data` are whole, decodable records.

    A record is torn if it is cut short, empty (a zero-filled tail after a
    power loss: events always carry a request_id) or not a UsageEvent.
    """
    position = 0
    while position + _HEADER.size <= len(data):
        (size,) = _HEADER.unpack_from(data, position)
        end = position + _HEADER.size + size
        if size == 0 or end > len(data):
            break
        try:
            inference_pb2.UsageEvent.FromString(data[position + _HEADER.size : end])
        except DecodeError:
            break
        position = end
    return position


class UsageLog:
    """UsageLog spools usage events on disk and ships them to a Redis Stream.

    Args:
        directory: where events.log and its cursor live (one per worker).
        client: Redis connection.
        stream: the stream key, e.g. "tokenmesh:usage".
        max_backlog_bytes: unshipped bytes above which new work is refused.
        sync_interval_s: appended events are fsynced at most this long after.
        fsync: flushes a file descriptor to disk (os.fsync; tests count calls).
    """

    def __init__(
        self,
        directory: Path,
        client: aioredis.Redis,
        stream: str,
        max_backlog_bytes: int,
        sync_interval_s: float = SYNC_INTERVAL_S,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.directory = directory
        self.client = client
        self.stream = stream
        self.max_backlog_bytes = max_backlog_bytes
        self.sync_interval_s = sync_interval_s
        self._fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._log_path = directory / "events.log"
        self._cursor_path = directory / "events.cursor"
        self._set_aside_torn_tail()
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - held open for the worker's life
        self._cursor = self._read_cursor()
        self._cursor_fd = os.open(self._cursor_path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        # One thread: fsyncs run in order, and stop() can wait for the last one.
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="usage-fsync")
        self._tasks: list[SupervisedTask] = []
        # What this process appended and has not shipped yet, in spool order:
        # (the spool offset the record ends at, its request id, its body). The
        # shipper sends these from memory (no thread hop, no file read, no
        # parse); only what an earlier run left unshipped is read back.
        self._recent: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self.appended_total = 0
        self.synced_total = 0  # appended events known to be on disk
        self.shipped_total = 0

    def _set_aside_torn_tail(self) -> None:
        """Moves a torn end of the spool (a power loss mid-write) to events.torn-<offset>."""
        if not self._log_path.exists():
            return
        data = self._log_path.read_bytes()
        intact = _intact_length(data)
        if intact == len(data):
            return
        torn = self.directory / f"events.torn-{intact}"
        torn.write_bytes(data[intact:])
        with open(self._log_path, "r+b") as log:
            log.truncate(intact)
            os.fsync(log.fileno())
        logger.error(
            "usage spool %s had a torn tail (%d bytes) after offset %d; set aside in %s",
            self._log_path,
            len(data) - intact,
            intact,
            torn,
        )

    def _read_cursor(self) -> int:
        try:
            cursor = int(self._cursor_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        return min(cursor, self._log_path.stat().st_size)

    def _write_cursor(self, offset: int) -> None:
        # One fixed-width pwrite on a held descriptor: a process crash cannot
        # tear a single small write, and a cursor left behind only replays
        # events (deduplicated downstream) — it never skips one.
        os.pwrite(self._cursor_fd, _cursor_record(offset), 0)
        self._cursor = offset
        while self._recent and self._recent[0][0] <= offset:
            self._recent.popleft()  # shipped (from memory or from the file)

    def backlog_bytes(self) -> int:
        """Returns how many spooled bytes are not yet in Redis."""
        return self._log.tell() - self._cursor

    def check_capacity(self) -> None:
        """Raises Unavailable when the spool is full (Redis unreachable for long)."""
        if self.backlog_bytes() >= self.max_backlog_bytes:
            raise Unavailable(
                "usage metering backlog is full; retry later",
                retry_after_s=5.0,
                reason="USAGE_BACKLOG_FULL",
            )

    def append(self, event: inference_pb2.UsageEvent) -> None:
        """Spools one event: in the OS when this returns, on disk within `sync_interval_s`."""
        payload = event.SerializeToString()
        self._log.write(_HEADER.pack(len(payload)) + payload)
        self._log.flush()
        self._recent.append((self._log.tell(), event.request_id, payload))
        self.appended_total += 1
        self._dirty.set()
        self._wake.set()

    def start(self, supervisor: Supervisor) -> None:
        """Starts shipping (including whatever a previous run left unshipped) and syncing."""
        self._tasks = [
            supervisor.spawn("usage-shipper", self._ship_forever),
            supervisor.spawn("usage-fsync", self._sync_forever),
        ]
        self._wake.set()

    async def sync(self) -> None:
        """Flushes every event appended so far to disk (off the event loop)."""
        appended = self.appended_total
        self._dirty.clear()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._syncer, self._fsync, self._log.fileno())
        self.synced_total = max(self.synced_total, appended)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ships what it can within `timeout_s`, syncs the rest to disk, then stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.backlog_bytes() > 0:
                    self._wake.set()
                    await asyncio.sleep(0.05)
        for task in self._tasks:
            await task.stop(timeout_s=5)
        # Queued behind any fsync a cancelled sync left running: the file stays open until then.
        await self.sync()
        self._syncer.shutdown(wait=True)
        self._log.close()
        os.close(self._cursor_fd)

    async def _sync_forever(self) -> None:
        while True:
            await self._dirty.wait()
            # Wait first: every event appended meanwhile shares this fsync.
            await asyncio.sleep(self.sync_interval_s)
            await self.sync()

    async def _ship_forever(self) -> None:
        backoff = 0.1
        while True:
            if self.backlog_bytes() == 0:
                # Cleared first: an append while compaction awaits its fsync wakes the wait.
                self._wake.clear()
                await self._compact()
                await self._wake.wait()
            try:
                await self._ship_batch()
                backoff = 0.1
            except _REDIS_UNAVAILABLE as exc:
                # Expected: the spool holds events until Redis is back (or is full,
                # which refuses new work). A disk error or a corrupt record is not
                # caught here: it ends the run, for the supervisor to report.
                logger.warning(
                    "usage stream unreachable (%s); %d bytes spooled", exc, self.backlog_bytes()
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _ship_batch(self, max_bytes: int = 256 * 1024) -> None:
        events, end = self._take_recent(max_bytes)
        if not events:  # what an earlier run left (or nothing)
            events, end = await asyncio.to_thread(self._read, self._cursor, max_bytes)
        if not events:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for request_id, body in events:
                pipe.xadd(self.stream, {"request_id": request_id, "event": body})
            await pipe.execute()
        self._write_cursor(end)
        self.shipped_total += len(events)
        # Under load, let events gather for a moment: one pipeline and one
        # cursor write then carry many of them instead of a few.
        await asyncio.sleep(SHIP_GATHER_S)

    def _take_recent(self, max_bytes: int) -> tuple[list[tuple[str, bytes]], int]:
        """Returns the events at the cursor that this process appended (oldest first, at
        least one, about `max_bytes`) and where they end; none when the spool holds
        unshipped records from before them (an earlier run's)."""
        events: list[tuple[str, bytes]] = []
        position = self._cursor
        for end, request_id, body in self._recent:
            if end - _HEADER.size - len(body) != position or (
                events and end - self._cursor > max_bytes
            ):
                break
            events.append((request_id, body))
            position = end
        return events, position

    def _read(self, offset: int, max_bytes: int) -> tuple[list[tuple[str, bytes]], int]:
        """Returns (request_id, serialized event) pairs from `offset`, and where they end."""
        events: list[tuple[str, bytes]] = []
        with open(self._log_path, "rb") as log:
            log.seek(offset)
            data = log.read(max_bytes)
        position = 0
        while position + _HEADER.size <= len(data):
            (size,) = _HEADER.unpack_from(data, position)
            if position + _HEADER.size + size > len(data):
                if not events and size + _HEADER.size > max_bytes:
                    return self._read(offset, size + _HEADER.size)
                break
            body = data[position + _HEADER.size : position + _HEADER.size + size]
            events.append((inference_pb2.UsageEvent.FromString(body).request_id, body))
            position += _HEADER.size + size
        return events, offset + position

    async def _compact(self) -> None:
        """Empties a fully shipped spool, unless an event is appended meanwhile."""
        shipped = self._cursor
        if shipped < _COMPACT_BYTES or self.backlog_bytes() > 0:
            return
        # The cursor must read 0 *on disk* before the log is emptied. Unsynced,
        # a power loss could keep the old cursor's page (>= 1 MiB) while new,
        # synced events lie below it: on restart the clamped cursor would skip
        # them. Every other cursor write may be lost: an old cursor only
        # replays events (deduplicated downstream). So this write alone is
        # synced, once per `_COMPACT_BYTES` shipped, on the sync thread (never
        # on the event loop).
        os.pwrite(self._cursor_fd, _cursor_record(0), 0)
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._syncer, self._fsync, self._cursor_fd)
        except BaseException:
            # Stopped (or the disk failed): the spool stays as it is.
            os.pwrite(self._cursor_fd, _cursor_record(shipped), 0)
            raise
        if self._log.tell() != shipped:
            # Appended during the fsync: those events are not shipped and stay;
            # the next idle moment compacts. (Should this write be lost, the 0
            # on disk only replays the shipped events.)
            os.pwrite(self._cursor_fd, _cursor_record(shipped), 0)
            return
        # No await from here on: no append interleaves.
        self._cursor = 0
        self._log.truncate(0)
        self._log.seek(0)
        self._recent.clear()  # all shipped: offsets start again at 0
