"""Lossless usage events: a local append-only spool shipped to a Redis Stream.

Every finished request appends one `UsageEvent` to `events.log` (length-
prefixed protobuf) *before* anything else can lose it; a shipper task XADDs
events to the stream and then advances a cursor file. A crash or a Redis
outage therefore loses nothing: on restart the shipper resumes at the cursor
(an event may be sent twice; consumers deduplicate by request_id). The spool
is bounded: past `max_backlog_bytes` of unshipped events the worker refuses
new requests (UNAVAILABLE) instead of dropping records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.core.errors import Unavailable
from services.core.tasks import cancel_and_wait
from tokenmesh.inference.v1 import inference_pb2

logger = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
SHIP_GATHER_S = 0.005  # pause after each shipped batch (bounds batches per second)
_COMPACT_BYTES = 1 << 20  # rewrite the spool once this much is shipped and nothing is pending


class UsageLog:
    """UsageLog spools usage events on disk and ships them to a Redis Stream.

    Args:
        directory: where events.log and its cursor live (one per worker).
        client: Redis connection.
        stream: the stream key, e.g. "tokenmesh:usage".
        max_backlog_bytes: unshipped bytes above which new work is refused.
    """

    def __init__(
        self, directory: Path, client: aioredis.Redis, stream: str, max_backlog_bytes: int
    ) -> None:
        self.directory = directory
        self.client = client
        self.stream = stream
        self.max_backlog_bytes = max_backlog_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._log_path = directory / "events.log"
        self._cursor_path = directory / "events.cursor"
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - held open for the worker's life
        self._cursor = self._read_cursor()
        self._cursor_fd = os.open(self._cursor_path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.shipped_total = 0

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
        os.pwrite(self._cursor_fd, b"%020d\n" % offset, 0)
        self._cursor = offset

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
        """Spools one event (written through to the OS before returning)."""
        payload = event.SerializeToString()
        self._log.write(_HEADER.pack(len(payload)) + payload)
        self._log.flush()
        self._wake.set()

    def start(self) -> None:
        """Starts shipping (including whatever a previous run left unshipped)."""
        self._task = asyncio.create_task(self._ship_forever(), name="usage-shipper")
        self._wake.set()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ships what it can within `timeout_s`, then stops; the rest stays spooled."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.backlog_bytes() > 0:
                    self._wake.set()
                    await asyncio.sleep(0.05)
        if self._task is not None:
            await cancel_and_wait(self._task, timeout_s=5)
        self._log.close()
        os.close(self._cursor_fd)

    async def _ship_forever(self) -> None:
        backoff = 0.1
        while True:
            if self.backlog_bytes() == 0:
                self._compact()
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._ship_batch()
                backoff = 0.1
            except (RedisError, OSError) as exc:
                logger.warning(
                    "usage stream unreachable (%s); %d bytes spooled", exc, self.backlog_bytes()
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _ship_batch(self, max_bytes: int = 256 * 1024) -> None:
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

    def _compact(self) -> None:
        """Empties a fully shipped spool (runs on the event loop: no append interleaves)."""
        if self._cursor >= _COMPACT_BYTES and self.backlog_bytes() == 0:
            # Cursor first: a crash in between replays events (deduplicated
            # downstream) rather than skipping any.
            self._write_cursor(0)
            self._log.truncate(0)
            self._log.seek(0)
