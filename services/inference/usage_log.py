"""Usage events: a local append-only spool shipped to a Redis Stream.

Every finished request appends one `UsageEvent` (length-prefixed protobuf)
to the spool *before* anything else can lose it; a shipper task XADDs events
to the stream and then advances a cursor file (it sends what this process
appended from memory, and reads back from the spool only what is not shipped
yet). On restart the shipper resumes at the cursor (an event may be sent
twice; the meter deduplicates by event id). The spool is bounded: past
`max_backlog_bytes` of unshipped events the worker refuses new requests
(UNAVAILABLE) instead of dropping records.

Shipped is not forgotten: an event stays in the spool until the usage meter
has *applied* it, and a while longer (`applied_grace_s`), because Redis can
acknowledge a write and then lose it — a failover to a replica that had not
received it, a host crash under `appendfsync everysec`, a Redis restarted
empty. Two marks per spool live in that Redis (keys `spool_mark_key`):
- `shipped`: written by the worker's ship script (`_SHIP`) with its XADDs,
  atomically, and only if the mark it finds is not below what this worker
  last wrote there: so "shipped = v" means this Redis holds every event of
  the spool up to position v (in the stream, or applied). A mark found below
  what the worker wrote says Redis lost events: the worker rewinds its cursor
  to that mark (or to the oldest event it still keeps) and ships again; the
  meter counts an event id once, so what Redis still had counts once.
- `applied`: written by the meter in the same script that applies an event
  (services/usage/meter.py): the highest position of an applied event. The
  worker reads both marks every `MARKS_INTERVAL_S` while it keeps shipped
  events (one MGET: never per event) and forgets whole segments below the
  applied mark once it has held for `applied_grace_s` (long enough for the
  apply itself to reach the AOF and the replicas). Aggregates, seen-markers
  and the applied mark are written by one script, so a Redis that rolls back
  rolls them back together; one that comes back empty is sent again all that
  is kept, and the meter (with no seen-markers left either) counts it once.
The spool's disk use stays bounded: past `max_backlog_bytes` kept in all (a
meter down for long) the oldest shipped segments are forgotten although not
applied (`tokenmesh_usage_spool_unapplied_forgotten_bytes_total`, logged):
they are in the stream, and only a Redis that then loses them loses them.

Layout: the spool is a series of segment files `events.<base>.log`, where
<base> (20 digits) is the spool position of the segment's first byte.
Positions only grow: the cursor file holds the position up to which every
event is shipped, the kept file (`events.kept`) the position below which the
spool may forget (applied), never an offset into one file. Appends go to the
newest segment; once it holds `_SEGMENT_BYTES` the next append starts a new
one, and a segment is deleted once the kept position has passed its end. So
under steady load the spool holds about two segments plus what is not
applied yet; no step ever rewrites or empties a file, and no file and cursor
must change together:
- A lost or stale cursor write only replays events: a cursor below the
  oldest segment starts at that segment (what was deleted had been applied).
- A lost or stale kept write only keeps more.
- A segment that outlives its delete (a crash just before it, or a power
  loss undoing it) lies below the kept position and is deleted at the next
  start.
- A cursor beyond the spool's end (a power loss kept the cursor but not the
  shipped events' unsynced tail) starts a new segment at the cursor, so a
  position is never used twice.
- A spool without a kept file (an earlier release's) keeps from its cursor.
`events.id` names the spool in Redis: its worker id and a random part.

Durability, precisely:
- An appended event is in the operating system's page cache when `append`
  returns: a crash of the worker process (even kill -9) or a Redis outage
  loses nothing.
- It is on disk (fsync) at most `sync_interval_s` (+ one fsync) later. A
  power loss or kernel crash of the worker's machine can lose the events
  appended in that last interval that had not reached Redis yet; nothing
  older. A new segment's directory entry is synced with its first events.
- A power loss can leave a torn last record; opening the spool sets the torn
  tail aside (`events.torn-<position>`) instead of shipping garbage.
- Redis losing acknowledged events (see above): nothing is lost unless it
  loses what had been applied for longer than `applied_grace_s`, or what the
  spool forgot past its bound.
fsync runs on its own thread, never on the event loop; grouping the appends
of an interval into one fsync keeps its cost off the request path.

Single writer: a worker holds an exclusive flock on its spool directory from
opening to `stop()`. A second process on the same spool (a worker of the same
id started while the previous one still drains, e.g. after its launcher was
SIGKILLed) waits for it up to `lock_wait_s`, then fails to start (SpoolBusy)
instead of appending to the same segment and moving the same cursor.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.core.errors import Unavailable
from services.core.secret_files import replace_file
from services.core.settings import StartupError
from services.core.tasks import SupervisedTask, Supervisor
from tokenmesh.inference.v1 import inference_pb2

logger = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
SHIP_GATHER_S = 0.005  # pause after each shipped batch (bounds batches per second)
_SEGMENT_BYTES = 1 << 20  # a segment this full gets no more appends: the next one starts
SYNC_INTERVAL_S = 0.02  # the most a power loss can lose of what Redis does not have yet
# Redis unreachable, or refusing for now: the spool rides it out (that is its job).
_REDIS_UNAVAILABLE = (RedisError, ConnectionError, TimeoutError)
_SEGMENT_NAME = re.compile(r"events\.(\d{20})\.log")
# The single file of releases before segments: its offsets are positions from 0.
_LEGACY_NAME = "events.log"
# How long a worker waits at start for the previous holder of its spool: a worker of
# the same id still draining (up to TOKENMESH_GRACE_SECONDS, 30 s, for its streams,
# then up to ~10 s shipping and syncing). Under `make run`'s 90 s startup wait.
SPOOL_LOCK_WAIT_S = 60.0
_LOCK_POLL_S = 0.05
# How long an applied mark must hold before the spool forgets what it covers: a
# Redis that loses writes loses its last ~1-2 s (`appendfsync everysec` on a host
# crash, an asynchronous replica's lag at a failover), not older ones.
APPLIED_GRACE_S = 10.0
# How often the worker reads its spool's marks while it keeps shipped events.
MARKS_INTERVAL_S = 1.0
# The marks of a spool that stopped shipping (its worker is gone) expire.
MARK_TTL_S = 30 * 86400

# Fields of a stream entry the meter reads (services/usage/meter.py); _SHIP writes
# them, and request_id.
FIELD_EVENT = "event"
FIELD_SPOOL = "spool"  # the spool (worker id) the event comes from
FIELD_POSITION = "pos"  # the spool position the event ends at

RESHIPPED = Counter(
    "tokenmesh_usage_spool_reshipped_events_total",
    "Usage events shipped again because Redis had lost them (a failover, a restart "
    "that lost writes): the meter counts each once.",
)
FORGOTTEN = Counter(
    "tokenmesh_usage_spool_unapplied_forgotten_bytes_total",
    "Spool bytes forgotten before the meter applied them, to stay within the spool's "
    "bound (a meter down for long): they are in the stream, unprotected against a "
    "Redis that loses them.",
)

# Ships one batch: XADDs its events and sets the spool's shipped mark to the batch's
# end, atomically, unless the mark is below what this worker last wrote there
# (ARGV[1]; '' when it does not know): then this Redis lost some of the spool's
# events, and the script writes nothing and returns {0, mark} (the worker rewinds
# and ships again). A script, not a pipeline: a check and a write apart could let
# a write whose reply was lost (a failover meanwhile) hide the loss.
# KEYS: stream, shipped mark. ARGV: expected mark ('' = unknown), batch end, mark
# ttl, spool id, then per event: request id, event, end position.
_SHIP = """
local mark = tonumber(redis.call('GET', KEYS[2])) or 0
if ARGV[1] ~= '' and mark < tonumber(ARGV[1]) then
  return {0, mark}
end
for i = 5, #ARGV, 3 do
  redis.call('XADD', KEYS[1], '*', 'request_id', ARGV[i], 'event', ARGV[i + 1],
    'spool', ARGV[4], 'pos', ARGV[i + 2])
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
return {1, tonumber(ARGV[2])}
"""


def spool_mark_key(stream: str, spool: str, mark: str) -> str:
    """Returns the key of a spool's `mark` ("shipped" or "applied") for `stream`."""
    return f"tm:usage:spool:{stream}:{spool}:{mark}"


class SpoolBusy(StartupError):
    """SpoolBusy says another live process holds a usage spool (it has one writer)."""


def _lock_spool(directory: Path, wait_s: float) -> int:
    """Takes the exclusive flock on `directory`, waiting up to `wait_s`; returns its fd.

    flock, not fcntl locks: those drop when the process closes *any* descriptor of
    the directory (the fsyncs of its entries open and close one). Close-on-exec, so
    no child process keeps a spool locked after its worker is gone.

    Raises:
        SpoolBusy: another process held it for all of `wait_s`.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _names(directory, fd):
                # Its holder emptied and removed it meanwhile (a spool another worker
                # adopted: services.inference.orphan_spools): take the new one.
                os.close(fd)
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                continue
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise SpoolBusy(
                    f"usage spool {directory} is still in use by another process after "
                    f"{wait_s:g}s: a worker with the same TOKENMESH_WORKER_ID runs (or is "
                    "draining); stop it, or give this worker an id of its own"
                ) from None
            if not waiting:
                waiting = True
                logger.warning(
                    "usage spool %s is in use by another process (a worker of the same id "
                    "draining?); waiting up to %gs for it",
                    directory,
                    wait_s,
                )
            # Only while another process holds the spool, at a worker's start: the
            # entrypoint builds the service before its event loop runs.
            time.sleep(_LOCK_POLL_S)  # noqa: TID251 - before the event loop


def _names(directory: Path, fd: int) -> bool:
    """Returns whether `directory` still names the directory open as `fd`."""
    try:
        named = os.stat(directory)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _cursor_record(offset: int) -> bytes:
    """Returns the cursor file's content for `offset` (fixed width: one small write)."""
    return b"%020d\n" % offset


def _segment_name(base: int) -> str:
    return f"events.{base:020d}.log"


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
        directory: where the spool's segments and its cursor live (one per worker).
        client: Redis connection.
        stream: the stream key, e.g. "tokenmesh:usage".
        max_backlog_bytes: unshipped bytes above which new work is refused; also
            what the spool keeps in all (shipped, not applied yet, included).
        sync_interval_s: appended events are fsynced at most this long after.
        fsync: flushes a file descriptor to disk (os.fsync; tests count calls).
        lock_wait_s: how long to wait for another process holding the spool.
        applied_grace_s: how long an applied mark must hold before the spool
            forgets what it covers (APPLIED_GRACE_S).

    Raises:
        SpoolBusy: another process held the spool for all of `lock_wait_s`.
    """

    def __init__(
        self,
        directory: Path,
        client: aioredis.Redis,
        stream: str,
        max_backlog_bytes: int,
        sync_interval_s: float = SYNC_INTERVAL_S,
        fsync: Callable[[int], None] = os.fsync,
        lock_wait_s: float | None = None,
        applied_grace_s: float | None = None,
    ) -> None:
        self.directory = directory
        self.client = client
        self.stream = stream
        self.max_backlog_bytes = max_backlog_bytes
        self.sync_interval_s = sync_interval_s
        self.applied_grace_s = APPLIED_GRACE_S if applied_grace_s is None else applied_grace_s
        self._fsync = fsync
        self._ship = client.register_script(_SHIP)
        directory.mkdir(parents=True, exist_ok=True)
        # Held until stop(): opening (torn tails, deletes) and appending are one writer's.
        wait_s = SPOOL_LOCK_WAIT_S if lock_wait_s is None else lock_wait_s
        self._lock_fd = _lock_spool(directory, wait_s)
        try:
            self.spool_id = _spool_id(directory)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._shipped_key = spool_mark_key(stream, self.spool_id, "shipped")
        self._applied_key = spool_mark_key(stream, self.spool_id, "applied")
        self._cursor_path = directory / "events.cursor"
        self._kept_path = directory / "events.kept"
        # Full segments not deleted yet, oldest first: (base, end, path).
        self._sealed: collections.deque[tuple[int, int, Path]] = collections.deque()
        # Full segments whose last appends are not fsynced yet (closed once they are).
        self._unsynced: list[BinaryIO] = []
        self._dir_dirty = False  # a segment was created since the last sync
        try:
            self._cursor, self._kept, legacy = self._open_spool()
            self._cursor_fd = os.open(self._cursor_path, os.O_WRONLY | os.O_CREAT, 0o644)
            self._kept_fd = os.open(self._kept_path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self._kept_fd, _cursor_record(self._kept), 0)
        except BaseException:
            os.close(self._lock_fd)
            raise
        # The shipped mark this worker last knew Redis to hold (None: an earlier
        # release's spool, which never wrote one). Redis holds every event up to
        # max(it, kept) at least: the cursor never passes that unchecked.
        self._expected: int | None = None if legacy else self._cursor
        # Applied marks read (monotonic time, mark), newest last; forgotten
        # once older than the grace (then they count) or when Redis lost events.
        self._applied: collections.deque[tuple[float, int]] = collections.deque()
        self._next_marks = 0.0  # when to read the marks next (monotonic)
        self._high = self._cursor  # the furthest this process has shipped
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        # One thread: fsyncs run in order, and stop() can wait for the last one.
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="usage-fsync")
        self._tasks: list[SupervisedTask] = []
        # What this process appended and has not shipped yet, in spool order:
        # (the spool position the record ends at, its request id, its body). The
        # shipper sends these from memory (no thread hop, no file read, no
        # parse); only what is not shipped and not appended by it is read back.
        self._recent: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self.appended_total = 0
        self.synced_total = 0  # appended events known to be on disk
        self.shipped_total = 0
        self.reshipped_total = 0  # shipped again because Redis had lost them

    # -- opening: what a crash or a power loss left -------------------------------------

    def _open_spool(self) -> tuple[int, int, bool]:
        """Opens the newest segment for appends (or starts one); returns the cursor,
        the kept position, and whether the spool is an earlier release's (no kept file)."""
        self._adopt_legacy_log()
        segments: list[tuple[int, int, Path]] = []
        for path in sorted(self.directory.iterdir()):
            match = _SEGMENT_NAME.fullmatch(path.name)
            if match:
                base = int(match.group(1))
                segments.append((base, base + self._set_aside_torn_tail(path, base), path))
        cursor = _read_position(self._cursor_path)
        kept = _read_position(self._kept_path)
        legacy = kept is None
        cursor = cursor or 0
        # An earlier release forgot what it shipped: it kept nothing below its cursor.
        # A kept write that reached the disk when the cursor's did not: both had shipped.
        kept = cursor if kept is None else min(kept, cursor)
        # Appends go on at the spool's end, or at the cursor if a power loss lost
        # a shipped tail: a position the cursor has passed is never written again.
        active_base = max([cursor] + [end for _, end, _ in segments])
        if segments and segments[-1][1] == active_base:
            *segments, (active_base, _, _) = segments
        else:
            self._create_segment_durably(active_base)
        for base, end, path in segments:
            if end <= kept:
                # Applied; still here after a crash just before its delete.
                path.unlink()
            else:
                self._sealed.append((base, end, path))
        self._base = active_base
        self._log_path = self.directory / _segment_name(active_base)
        self._log: BinaryIO = open(self._log_path, "ab")  # noqa: SIM115 - held until rolled
        # A stale cursor (or kept) below the oldest segment: what lay between was
        # deleted, so it had been applied.
        oldest = self._sealed[0][0] if self._sealed else active_base
        return max(cursor, oldest), max(kept, oldest), legacy

    def _adopt_legacy_log(self) -> None:
        """Renames a single-file spool of an earlier release to the segment at 0."""
        legacy = self.directory / _LEGACY_NAME
        if not legacy.exists():
            return
        if any(_SEGMENT_NAME.fullmatch(p.name) for p in self.directory.iterdir()):
            # Only after a downgrade and an upgrade: which holds what is unknowable.
            logger.error(
                "usage spool %s holds %s and segments; it is left as is", legacy.parent, legacy
            )
            return
        # Its cursor was an offset into it: the same as a position from 0.
        legacy.rename(self.directory / _segment_name(0))

    def _create_segment_durably(self, base: int) -> None:
        """Creates an empty segment at `base` and syncs its directory entry (start only)."""
        (self.directory / _segment_name(base)).touch()
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _set_aside_torn_tail(self, path: Path, base: int) -> int:
        """Moves a torn end of a segment (a power loss mid-write) to events.torn-<position>;
        returns the segment's intact length."""
        data = path.read_bytes()
        intact = _intact_length(data)
        if intact == len(data):
            return intact
        torn = self.directory / f"events.torn-{base + intact}"
        torn.write_bytes(data[intact:])
        with open(path, "r+b") as log:
            log.truncate(intact)
            os.fsync(log.fileno())
        logger.error(
            "usage spool %s had a torn tail (%d bytes) after position %d; set aside in %s",
            path,
            len(data) - intact,
            base + intact,
            torn,
        )
        return intact

    # -- appending ---------------------------------------------------------------------

    def _end(self) -> int:
        """Returns the spool position after the last appended record."""
        return self._base + self._log.tell()

    def _write_cursor(self, offset: int) -> None:
        # One fixed-width pwrite on a held descriptor: a process crash cannot
        # tear a single small write, and a cursor left behind only replays
        # events (deduplicated downstream) — it never skips one.
        os.pwrite(self._cursor_fd, _cursor_record(offset), 0)
        self._cursor = offset
        self._high = max(self._high, offset)
        while self._recent and self._recent[0][0] <= offset:
            self._recent.popleft()  # shipped (from memory or from the file)

    def _write_kept(self, offset: int) -> None:
        # As the cursor's: one small write; a stale one only keeps more.
        os.pwrite(self._kept_fd, _cursor_record(offset), 0)
        self._kept = offset

    def _forget_applied_segments(self) -> None:
        # After the kept write: a crash between the two leaves a segment below
        # it, which the next start deletes.
        while self._sealed and self._sealed[0][1] <= self._kept:
            _, _, path = self._sealed.popleft()
            path.unlink(missing_ok=True)
        # Bounded: a meter down for long must not fill the disk. Only shipped
        # segments go (they are in the stream); unshipped ones are refused new
        # work instead (check_capacity).
        while (
            self._sealed
            and self._sealed[0][1] <= self._cursor
            and self._end() - self._sealed[0][0] > self.max_backlog_bytes
        ):
            base, end, path = self._sealed[0]
            unapplied = end - max(base, self._kept)
            logger.warning(
                "usage spool %s keeps more than %d bytes: forgetting %d shipped bytes the "
                "meter has not applied yet (is the usage service down, or older than the "
                "workers?); they are in the stream, but a Redis that loses them now loses them",
                self.directory,
                self.max_backlog_bytes,
                unapplied,
            )
            FORGOTTEN.inc(unapplied)
            self._write_kept(end)
            self._sealed.popleft()
            path.unlink(missing_ok=True)

    def backlog_bytes(self) -> int:
        """Returns how many spooled bytes are not yet in Redis."""
        return self._end() - self._cursor

    def kept_bytes(self) -> int:
        """Returns how many spooled bytes the meter has not applied yet (as far as the
        spool knows: it forgets them a grace period after the meter applied them)."""
        return self._end() - self._kept

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
        if self._log.tell() >= _SEGMENT_BYTES:
            self._roll()
        payload = event.SerializeToString()
        self._log.write(_HEADER.pack(len(payload)) + payload)
        self._log.flush()
        self._recent.append((self._end(), event.request_id, payload))
        self.appended_total += 1
        self._dirty.set()
        self._wake.set()

    def _roll(self) -> None:
        """Starts the next segment at the spool's end; the full one waits to ship."""
        end = self._end()
        path = self.directory / _segment_name(end)
        # Opened first: a failed open (EMFILE, a full disk) changes nothing, and the
        # append raises (a sealed entry for a file never made stopped shipping).
        log = open(path, "ab")  # noqa: SIM115 - held until rolled
        self._sealed.append((self._base, end, self._log_path))
        # Kept open until the sync thread has flushed its last appends.
        self._unsynced.append(self._log)
        self._base, self._log_path, self._log = end, path, log
        self._dir_dirty = True

    # -- syncing and shipping ----------------------------------------------------------

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
        full, self._unsynced = self._unsynced, []
        directory, self._dir_dirty = self._dir_dirty, False
        fds = [log.fileno() for log in full] + [self._log.fileno()]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._syncer, self._sync_fds, fds, directory)
        except BaseException:
            # Not known to be on disk: the next sync does them again. The files stay
            # open: a cancelled sync's fsync may still be running on the thread.
            self._unsynced[:0] = full
            self._dir_dirty |= directory
            raise
        for log in full:
            log.close()
        self.synced_total = max(self.synced_total, appended)

    def _sync_fds(self, fds: list[int], directory: bool) -> None:
        """On the sync thread: fsyncs `fds`, and the directory after a segment was created."""
        for fd in fds:
            self._fsync(fd)
        if directory:
            # A new segment's events are on disk only once its name is.
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                self._fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def empty_out(self) -> None:
        """Ships everything and forgets what the meter applied, until the spool keeps
        nothing (a spool whose worker is gone, adopted by another: it appends nothing).
        Waits as long as that takes: the caller bounds it. Raises what Redis raises."""
        while self.kept_bytes() > 0:
            if self.backlog_bytes():
                await self._ship_batch()
            elif time.monotonic() >= self._next_marks:
                await self._read_marks()
            else:
                await asyncio.sleep(self._next_marks - time.monotonic())

    async def stop(self, timeout_s: float = 5.0, *, remove: bool = False) -> None:
        """Ships what it can within `timeout_s`, syncs the rest to disk, then stops;
        with `remove`, a spool that keeps nothing is deleted before its lock goes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.backlog_bytes() > 0:
                    self._wake.set()
                    await asyncio.sleep(0.05)
        for task in self._tasks:
            await task.stop(timeout_s=5)
        # Queued behind any fsync a cancelled sync left running: the files stay open until then.
        await self.sync()
        remove = remove and self.kept_bytes() == 0
        self._syncer.shutdown(wait=True)
        for log in [*self._unsynced, self._log]:  # appended to during the last sync
            log.close()
        os.close(self._cursor_fd)
        os.close(self._kept_fd)
        if remove:
            # Under the lock: a worker of this id that starts now waits, then finds
            # the directory gone and makes a new one (_lock_spool).
            for path in self.directory.iterdir():
                path.unlink()
            self.directory.rmdir()
        os.close(self._lock_fd)  # last: everything is on disk; the next worker may open it

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
                self._wake.clear()
                await self._idle()
            try:
                if self._kept < self._cursor and time.monotonic() >= self._next_marks:
                    await self._read_marks()
                if self.backlog_bytes():  # (a wake-up for the marks ships nothing)
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

    async def _idle(self) -> None:
        """Waits for an append; while shipped events are kept, only until the marks
        are due (so that applied ones are forgotten and lost ones sent again)."""
        if self._kept >= self._cursor:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self._next_marks - time.monotonic())):
                await self._wake.wait()

    async def _read_marks(self) -> None:
        """Reads the spool's marks: ships again what Redis lost, forgets what the meter
        has applied (for the grace period)."""
        self._next_marks = time.monotonic() + MARKS_INTERVAL_S
        shipped, applied = await self.client.mget(self._shipped_key, self._applied_key)
        mark = _int_or_zero(shipped)
        if self._expected is not None and mark < self._expected:
            self._rewind(mark)
        self._observe_applied(_int_or_zero(applied), time.monotonic())

    def _observe_applied(self, applied: int, now: float) -> None:
        """Records an applied mark read at `now`, and forgets what the reads of a grace
        period ago covered (unless a read since went below them: Redis lost applies)."""
        if self._applied and applied < self._applied[-1][1]:
            self._applied.clear()  # a rollback: what was read before may be gone
        self._applied.append((now, applied))
        kept = self._kept
        while self._applied and self._applied[0][0] <= now - self.applied_grace_s:
            kept = max(kept, self._applied.popleft()[1])
        kept = min(kept, self._cursor)  # what is not shipped (again) yet stays
        if kept > self._kept:
            self._write_kept(kept)
            self._forget_applied_segments()

    def _rewind(self, mark: int) -> None:
        """Ships again from `mark` (this Redis's shipped mark, below what the worker
        wrote there: it lost events), or from the oldest event the spool keeps."""
        self._applied.clear()  # marks read before the loss may be gone with it
        expected, self._expected = self._expected, mark
        position = min(self._cursor, max(mark, self._kept))
        if position >= self._cursor:
            return
        logger.error(
            "Redis lost usage events of spool %s (its shipped mark is %d, this worker "
            "wrote %d): shipping %d bytes again from position %d; the meter counts each "
            "event once",
            self.spool_id,
            mark,
            expected,
            self._cursor - position,
            position,
        )
        self._write_cursor(position)

    async def _ship_batch(self, max_bytes: int = 256 * 1024) -> None:
        events, end = self._take_recent(max_bytes)
        if not events:  # what this process did not append, or ships again (or nothing)
            path, base, start = self._segment_at(self._cursor)
            events, end = await asyncio.to_thread(self._read, path, base, start, max_bytes)
        if not events:
            return
        args: list[Any] = [
            "" if self._expected is None else self._expected,
            end,
            MARK_TTL_S,
            self.spool_id,
        ]
        for request_id, body, position in events:
            args += [request_id, body, position]
        shipped, mark = await self._ship(
            keys=[self.stream, self._shipped_key], args=args, client=self.client
        )
        if not shipped:
            self._rewind(int(mark))
            return
        self._expected = int(mark)
        again = sum(1 for *_, position in events if position <= self._high)
        self._write_cursor(end)
        self._forget_applied_segments()  # past the spool's bound
        self.shipped_total += len(events)
        if again:
            self.reshipped_total += again
            RESHIPPED.inc(again)
        # Under load, let events gather for a moment: one script call and one
        # cursor write then carry many of them instead of a few.
        await asyncio.sleep(SHIP_GATHER_S)

    def _take_recent(self, max_bytes: int) -> tuple[list[tuple[str, bytes, int]], int]:
        """Returns the events at the cursor that this process appended (oldest first, at
        least one, about `max_bytes`: request id, body, end position) and where they
        end; none when the spool holds unshipped records from before them (an earlier
        run's, or ones shipped again)."""
        events: list[tuple[str, bytes, int]] = []
        position = self._cursor
        for end, request_id, body in self._recent:
            if end - _HEADER.size - len(body) != position or (
                events and end - self._cursor > max_bytes
            ):
                break
            events.append((request_id, body, end))
            position = end
        return events, position

    @property
    def end(self) -> int:
        """The spool position after the last appended record."""
        return self._end()

    def events_since(self, position: int) -> Iterator[inference_pb2.UsageEvent]:
        """Returns the events appended since the spool stood at `position` that it still
        keeps, oldest first. The segments are the ones there now; reading them may run
        on another thread (one deleted meanwhile was applied: skipped)."""
        segments = [
            (path, base, max(position, base), end)
            for base, end, path in [*self._sealed, (self._base, self._end(), self._log_path)]
            if end > position
        ]
        return self._events_in(segments)

    def _events_in(
        self, segments: list[tuple[Path, int, int, int]]
    ) -> Iterator[inference_pb2.UsageEvent]:
        for path, base, start, end in segments:
            try:
                events, _ = self._read(path, base, start, end - start)
            except FileNotFoundError:
                continue
            for _, body, _ in events:
                yield inference_pb2.UsageEvent.FromString(body)

    def _segment_at(self, position: int) -> tuple[Path, int, int]:
        """Returns the segment holding the first record at or after `position`: its
        path, its base, and where to read from (past a gap a power loss left)."""
        for base, end, path in self._sealed:
            if end > position:
                return path, base, max(position, base)
        return self._log_path, self._base, max(position, self._base)

    def _read(
        self, path: Path, base: int, start: int, max_bytes: int
    ) -> tuple[list[tuple[str, bytes, int]], int]:
        """Returns (request_id, serialized event, end position) triples from position
        `start` of the segment at `base`, and the position they end at."""
        events: list[tuple[str, bytes, int]] = []
        with open(path, "rb") as log:
            log.seek(start - base)
            data = log.read(max_bytes)
        position = 0
        while position + _HEADER.size <= len(data):
            (size,) = _HEADER.unpack_from(data, position)
            if position + _HEADER.size + size > len(data):
                if not events and size + _HEADER.size > max_bytes:
                    return self._read(path, base, start, size + _HEADER.size)
                break
            body = data[position + _HEADER.size : position + _HEADER.size + size]
            position += _HEADER.size + size
            request_id = inference_pb2.UsageEvent.FromString(body).request_id
            events.append((request_id, body, start + position))
        return events, start + position


def _spool_id(directory: Path) -> str:
    """Returns the spool's id (made at its first start): its worker id (the directory's
    name) and a random part, so that a spool made anew under the same worker id
    (a pod's emptied volume) never reads the marks its predecessor left in Redis."""
    path = directory / "events.id"
    try:
        spool_id = path.read_text().strip()
    except FileNotFoundError:
        spool_id = ""
    if spool_id:
        return spool_id
    # Made when missing or empty: a first start cut short (a crash, a full disk) left
    # it empty, and "" shared one shipped mark with every other such spool (one of them
    # then rewound into its own records and its shipper spun). Written whole or not at all.
    spool_id = f"{directory.name}.{secrets.token_hex(4)}"
    replace_file(path, (spool_id + "\n").encode())
    return spool_id


def _read_position(path: Path) -> int | None:
    """Returns the position a cursor-like file holds (None: no such file)."""
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return None


def _int_or_zero(value: bytes | str | None) -> int:
    """Returns a mark read from Redis (0: none, e.g. a Redis that came back empty)."""
    return int(value) if value is not None else 0
