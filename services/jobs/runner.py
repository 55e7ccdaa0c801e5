"""Runs queued items: consumer groups over the lanes' streams, like the usage meter.

Every replica reads new entries with XREADGROUP from each lane (a tenant, or
a key without one) that has a free slot, so one tenant's 10,000 items never
hold back another's: each lane has at most `lane_concurrency` items running
per replica, and all lanes together at most `concurrency` calls in flight.
An entry stays pending until its item's result is stored (the same script
acknowledges it), and this replica keeps its running entries' idle time low
(XCLAIM to itself, of the entries it still owns: one another replica took over
meanwhile is stopped here, not taken back). Entries a crashed replica left
pending are taken over with XAUTOCLAIM once idle `claim_idle_s`; on start a
replica first resumes its own (its consumer name is stable: the host name).
Acknowledged entries are trimmed from the streams, and consumers idle for
`DEAD_CONSUMER_IDLE_S` with no pending entry are deleted from the groups:
replicas that are gone for good (k8s pods, each a new name) stayed in every
lane's group for ever. A live replica that got nothing from a lane for that
long may be deleted too (Redis 6 counts only reads that deliver): harmless,
it has nothing pending there, and the next entry it reads makes it again.

A job that stops or ends while its items run (cancelled, its key revoked,
expired) has them stopped: `watch_ended` sees its status and cancels their
calls; they are let go without a result (`JobStore.let_go`: a stopping job
ends CANCELLED with its last one). An item starts only through
`JobStore.start_item`, which refuses one of a job that is stopping or ended.

Once a worker has answered an item (and metered it), the answer is kept through
a cancel that came as it arrived (`execution.kept_answer`), and its result is
stored through Redis errors and cancels (`Runner._store`): tried again for a few claim
times while the heartbeat keeps the entry claimed, and waited for by a stop
(up to `STOP_SAVE_S`), a stopped job and a lost entry. Dropped, the item ran
again from the start: its whole cost again, and the job's usage from the
second run while the meter bills the first.

A revoked key must not keep spending: before an item starts, and every
watch round for the jobs whose items run here, the runner asks `KeyStatus`
whether each owner's key is still active (its verdicts are at most 2 s old);
a revoked or expired key's jobs are stopped (reason KEY_REVOKED or
KEY_EXPIRED), and their calls cut at once, within the 5 s revocation bound.
The workers cannot tell: they take the identity the edge vouched for when
the job was created. A job whose items no runner has read yet is stopped by
`RevokedKeySweep`, every replica's bounded round over the unfinished jobs.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from redis.exceptions import RedisError, ResponseError

from services.core.redis_service import FORGET_IDLE_CONSUMERS, text
from services.core.store_errors import STORE_UNREACHABLE, is_store_refusal
from services.core.tasks import cancel_and_wait
from services.jobs import metrics
from services.jobs import store as jobstore
from services.jobs.execution import DeadlinePassed, ItemExecutor, Outcome
from services.jobs.key_status import KeyStatus
from services.jobs.store import RUNNABLE, JobState, JobStore, StopOutcome

logger = logging.getLogger(__name__)
TRACER = trace.get_tracer(__name__)
# The most items a replica holds per slot, waiting ones included (a bound on memory).
HELD_PER_SLOT = 32
# Entry ids per heartbeat script call (a Lua call unpacks its arguments on a bounded stack).
HEARTBEAT_BATCH = 1000
# KEYS: stream. ARGV: group, consumer, entry ids.
# Claims (resetting their idle time) the ids this consumer owns in the group's
# pending list; returns the others (another consumer's now, or acknowledged).
_KEEP_OWNED = """
local mine, lost = {}, {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] ~= nil and entry[1][2] == ARGV[2] then
    mine[#mine + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #mine > 0 then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine), 'JUSTID')
end
return lost
"""
EntryKey = tuple[str, str]  # (stream, entry id)
# How often each replica looks for unfinished jobs of revoked keys that no runner
# reads (RevokedKeySweep), and the most jobs one round reads: with a verdict's age
# (2 s) a revoked key's jobs stop within the 5 s revocation bound while the
# unfinished jobs fit one round.
KEY_SWEEP_EVERY_S = 2.0
KEY_SWEEP_BATCH = 1000
# ZSCAN calls one round makes at most (a sparse zset answers a call with few).
KEY_SWEEP_SCANS = 8
# A consumer with nothing pending and idle this long is a replica that is gone.
DEAD_CONSUMER_IDLE_S = 3600.0
# How long a finished item's result is tried again through Redis errors, in claim
# times: the heartbeat keeps the entry claimed meanwhile (once Redis answers again),
# so nobody runs the item again; given up, its entry waits for a takeover.
SAVE_RETRY_CLAIMS = 3
SAVE_FIRST_BACKOFF_S = 0.05
SAVE_MAX_BACKOFF_S = 2.0
# The longest a stop waits for the results being stored (within the 5 s it gives
# each item: the Redis client closes after it).
STOP_SAVE_S = 2.5


class Runner:
    """Runner executes this replica's share of the queued items.

    Args:
        store: the jobs in Redis.
        executor: sends an item to a worker.
        consumer: this replica's consumer name (stable across restarts).
        concurrency: items in flight on this replica, all lanes together.
        lane_concurrency: items in flight per lane on this replica.
        claim_idle_s: pending entries idle this long are taken over.
        key_status: tells whether a job's owner key may still spend (default: one
            reading the key records in the store's Redis).
    """

    def __init__(
        self,
        store: JobStore,
        executor: ItemExecutor,
        consumer: str,
        concurrency: int,
        lane_concurrency: int,
        claim_idle_s: float,
        key_status: KeyStatus | None = None,
    ) -> None:
        self.store = store
        self.key_status = key_status or KeyStatus(store.redis)
        self.redis = store.redis
        self.executor = executor
        self.consumer = consumer
        self.concurrency = concurrency
        self.lane_concurrency = lane_concurrency
        self.claim_idle_s = claim_idle_s
        self._slots = asyncio.Semaphore(concurrency)
        self._keep_owned = self.redis.register_script(_KEEP_OWNED)
        self._forget_dead = self.redis.register_script(FORGET_IDLE_CONSUMERS)
        self.dead_consumer_idle_s = DEAD_CONSUMER_IDLE_S
        # Set when an item ends: a lane may have a free slot again.
        self._slot_freed = asyncio.Event()
        self._tasks: dict[EntryKey, asyncio.Task[None]] = {}
        self._jobs: dict[EntryKey, str] = {}
        self._per_lane: collections.Counter[str] = collections.Counter()
        self._last_lane = ""  # the lane the last read's window ended on (_window)
        self._round_found = False  # whether this round of windows read any entry
        self._ending: set[EntryKey] = set()
        self.save_retry_s = SAVE_RETRY_CLAIMS * claim_idle_s
        self._saves: set[asyncio.Task[bool]] = set()  # results being stored (_store)
        self._stop_by: float | None = None  # while stopping: when saves are cut (loop time)
        self.finished_total = 0

    # -- the loops (supervised by the service) ------------------------------

    async def run_forever(self, block_ms: int = 500) -> None:
        """Resumes this replica's own pending entries, then reads new ones forever."""
        await self.recover_own()
        while True:
            if not await self.read_once(block_ms):
                await self._wait_for_slot(block_ms / 1000)

    async def _wait_for_slot(self, timeout_s: float) -> None:
        """Waits until an item ends (or `timeout_s`: a new lane may have appeared).

        NOTE: a fixed sleep here held every lane's next items back by up to
        `timeout_s` each time its slots were full: 4 items per half second.
        """
        self._slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_freed.wait(), timeout_s)

    async def maintain_forever(self, every_s: float, watch_s: float = 0.5) -> None:
        """Stops the items of ended jobs (every `watch_s`); keeps running entries claimed,
        takes over stale ones and trims the streams (every `every_s`)."""
        last = float("-inf")
        while True:
            await self.watch_ended()
            if time.monotonic() - last >= every_s:
                await self.heartbeat()
                await self.claim_stale()
                await self.trim()
                last = time.monotonic()
            await asyncio.sleep(watch_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancels running items: their entries stay pending (resumed after a restart
        under the same name, or taken over), their in-flight marks go (_run_entry).
        An item whose result is being stored keeps it if that ends within
        `STOP_SAVE_S` (at most half of `timeout_s`)."""
        loop = asyncio.get_running_loop()
        self._stop_by = loop.time() + min(STOP_SAVE_S, timeout_s / 2)
        try:
            # Each cancelled until it ends (cancel_and_wait): one cancel() can be lost in
            # redis-py, and an item that went on after its service stopped opened a new
            # Redis connection on a closed pool, left open when the loop ended.
            await asyncio.gather(
                *(cancel_and_wait(task, timeout_s) for task in list(self._tasks.values()))
            )
            # A save cut at the bound ends with its Redis call, before the client closes.
            await asyncio.gather(
                *(cancel_and_wait(save, timeout_s / 2) for save in list(self._saves))
            )
        finally:
            self._stop_by = None

    # -- reading ----------------------------------------------------------

    def _free(self, stream: str) -> int:
        return self.lane_concurrency - self._per_lane[stream]

    async def read_once(self, block_ms: int) -> bool:
        """Reads new entries for lanes with free slots; False when there was nothing to read.

        Reads ahead of the replica's slots by as many again, not counting items that
        back off (no worker for their model, a spent budget): counted, a few lanes'
        waiting items stopped the reading, and every other tenant's items waited
        behind them until their deadlines. (Each lane holds at most
        `lane_concurrency` items, and all of them `HELD_PER_SLOT` per slot.)
        """
        held = len(self._tasks)
        if held - self.executor.waiting >= 2 * self.concurrency:
            return False
        room = HELD_PER_SLOT * self.concurrency - held
        if room <= 0:
            return False
        streams = await self.store.lanes()
        for stream in streams:
            await self.store.ensure_group(stream)
        lanes = [s for s in streams if self._free(s) > 0]
        if not lanes:
            return False
        count = min(room, max(1, min(self._free(s) for s in lanes)))
        window, ends_round = self._window(lanes, room // count)
        open_lanes: dict[Any, Any] = {s: ">" for s in window}
        # Only a round of windows that found nothing waits for entries, in its last
        # window: one that waited on idle lanes held the others' items back a block.
        block = block_ms if ends_round and not self._round_found else None
        try:
            reply: Any = await self.redis.xreadgroup(
                jobstore.GROUP, self.consumer, open_lanes, count=count, block=block
            )
        except ResponseError as exc:
            if not jobstore.is_missing_group(exc):
                raise
            # A stream that expired after its lane was retired came back without its
            # group (a replica of an earlier version added to it): make them again.
            self.store.forget_groups()
            return False
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                self._start(text(stream), text(entry_id), fields)
        self._round_found = not ends_round and (self._round_found or bool(reply))
        return True

    def _window(self, lanes: list[str], size: int) -> tuple[list[str], bool]:
        """Returns `size` of `lanes`, from the first after the lane the last window ended
        on (all when they fit), and whether the window ends a round of them.

        XREADGROUP's COUNT is per stream: one read of every lane could return
        lanes x count entries, past HELD_PER_SLOT. A rotating window keeps the
        bound and still reaches every lane in turn. It goes by name, not index:
        the lanes with free slots change between reads.
        """
        if len(lanes) <= size:
            return lanes, True
        ordered = sorted(lanes)
        start = bisect.bisect_right(ordered, self._last_lane) % len(ordered)
        end = start + size
        window = (ordered + ordered)[start:end]
        self._last_lane = window[-1]
        return window, end >= len(ordered)

    async def recover_own(self) -> int:
        """Starts the entries this consumer had read before it restarted."""
        resumed = 0
        for stream in await self.store.lanes():
            await self.store.ensure_group(stream)
            try:
                reply: Any = await self.redis.xreadgroup(
                    jobstore.GROUP, self.consumer, {stream: "0"}, count=10_000
                )
            except ResponseError as exc:
                if not jobstore.is_missing_group(exc):
                    raise
                continue  # expired after its lane was retired: nothing of ours in it
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    if fields:  # an entry trimmed meanwhile comes back empty
                        self._start(stream, text(entry_id), fields)
                        resumed += 1
        if resumed:
            logger.info("resumed %d items this replica had started before it restarted", resumed)
        return resumed

    async def claim_stale(self) -> int:
        """Takes over entries another replica read but did not finish (it died)."""
        claimed = 0
        for stream in await self.store.lanes():
            free = self._free(stream)
            if free <= 0:
                continue
            await self.store.ensure_group(stream)
            # Through the whole pending list: XAUTOCLAIM scans at most 10 x count
            # entries a call, and a dead replica's items behind 10 x count live
            # ones (a few replicas) were never taken over, ending EXPIRED.
            cursor = "0-0"
            while free > 0:
                try:
                    reply: Any = await self.redis.xautoclaim(
                        stream,
                        jobstore.GROUP,
                        self.consumer,
                        min_idle_time=int(self.claim_idle_s * 1000),
                        start_id=cursor,
                        count=free,
                    )
                except ResponseError as exc:
                    if not jobstore.is_missing_group(exc):
                        raise
                    break  # expired after its lane was retired: nothing pending
                for entry_id, fields in reply[1]:
                    if fields and (stream, text(entry_id)) not in self._tasks:
                        self._start(stream, text(entry_id), fields)
                        claimed += 1
                cursor, free = text(reply[0]), self._free(stream)
                if cursor == "0-0":
                    break
        if claimed:
            logger.info("took over %d items from a replica that stopped", claimed)
        return claimed

    async def heartbeat(self) -> list[EntryKey]:
        """Resets the idle time of the running entries this consumer still owns (nobody
        takes them over), and stops those it lost; returns the lost ones.

        An entry is lost when another replica took it over (this one stalled past
        `claim_idle_s`) or it is no longer pending. Claimed back regardless (XCLAIM
        with no idle time takes an entry from whoever owns it), the item ran on both
        replicas. A lost item's task is cancelled without acknowledging its entry:
        the entry is the new owner's to finish. Its in-flight mark, if still this
        consumer's, goes (`JobStore.drop_mark`).
        """
        by_stream: dict[str, list[str]] = collections.defaultdict(list)
        for stream, entry_id in self._tasks:
            by_stream[stream].append(entry_id)
        lost: list[EntryKey] = []
        for stream, ids in by_stream.items():
            for start in range(0, len(ids), HEARTBEAT_BATCH):
                batch = ids[start : start + HEARTBEAT_BATCH]
                try:
                    reply: Any = await self._keep_owned(
                        keys=[stream], args=[jobstore.GROUP, self.consumer, *batch]
                    )
                except ResponseError as exc:
                    if not jobstore.is_missing_group(exc):
                        raise
                    reply = batch  # the stream expired, its entries with it
                lost += [(stream, text(entry_id)) for entry_id in reply]
        for key in lost:
            task = self._tasks.get(key)
            if task is not None and key not in self._ending:
                task.cancel()  # not in _ending: its entry stays pending (_run_entry)
        if lost:
            logger.warning("stopped %d items this replica no longer owns", len(lost))
        return lost

    async def watch_ended(self) -> None:
        """Stops the running items of jobs that are stopping or ended (cancelled, their
        key revoked, expired, gone); stops the jobs whose key was revoked first."""
        job_ids = sorted(set(self._jobs.values()))
        if not job_ids:
            return
        states = await self.store.owners(job_ids)
        ended = {job_id for job_id, state in states.items() if state.status not in RUNNABLE}
        running = {job_id: state for job_id, state in states.items() if job_id not in ended}
        ended |= await stop_revoked(self.store, self.key_status, running)
        for key, job_id in list(self._jobs.items()):
            if job_id in ended:
                task = self._tasks.get(key)
                if task is not None and key not in self._ending:
                    self._ending.add(key)
                    task.cancel()

    async def trim(self) -> None:
        """Deletes acknowledged entries (those before the oldest pending or undelivered
        one) and the consumers of replicas that are gone, and retires lanes left with
        no entry."""
        for stream in await self.store.lanes():
            try:
                groups: Any = await self.redis.xinfo_groups(stream)
                pending: Any = await self.redis.xpending(stream, jobstore.GROUP)
            except ResponseError:
                continue  # no such stream or group yet
            group = next((g for g in groups if text(g["name"]) == jobstore.GROUP), None)
            if group is None:
                continue
            oldest = pending.get("min") if pending.get("pending") else None
            # Nothing pending: every delivered entry is done, the last one too.
            keep_from = text(oldest) if oldest else _after(text(group["last-delivered-id"]))
            if keep_from not in ("0-0", ""):
                await self.redis.xtrim(stream, minid=keep_from, approximate=False)
            await self._forget_dead_consumers(stream)
            await self.store.retire_lane_if_empty(stream)

    async def _forget_dead_consumers(self, stream: str) -> None:
        """Deletes the lane's consumers idle `dead_consumer_idle_s` with nothing pending."""
        idle_ms = int(self.dead_consumer_idle_s * 1000)
        gone: Any = await self._forget_dead(
            keys=[stream], args=[jobstore.GROUP, idle_ms, self.consumer]
        )
        if gone:
            names = ", ".join(text(name) for name in gone)
            logger.info("deleted consumers of replicas gone from %s: %s", stream, names)

    # -- one item ---------------------------------------------------------

    def _start(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        key = (stream, entry_id)
        if key in self._tasks:
            return
        job_id = text(fields.get(b"job", b""))
        index = int(text(fields.get(b"i", b"-1")) or -1)
        self._per_lane[stream] += 1
        self._jobs[key] = job_id
        task = asyncio.create_task(self._run_entry(stream, entry_id, job_id, index))
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))

    def _finished(self, key: EntryKey, task: asyncio.Task[None]) -> None:
        self._slot_freed.set()
        self._tasks.pop(key, None)
        self._jobs.pop(key, None)
        self._ending.discard(key)
        self._per_lane[key[0]] -= 1
        if not self._per_lane[key[0]]:
            del self._per_lane[key[0]]
        if not task.cancelled() and task.exception() is not None:
            # The entry stays pending: this replica or another takes it over.
            logger.error("item %s failed; it will be retried", key[1], exc_info=task.exception())

    async def _run_entry(self, stream: str, entry_id: str, job_id: str, index: int) -> None:
        key = (stream, entry_id)
        if not job_id or index < 0:
            await self.store.ack(stream, entry_id)  # not an item's entry
            return
        try:
            await self._run_item(stream, entry_id, job_id, index)
        except asyncio.CancelledError:
            if key not in self._ending:
                # Another replica took the entry over (heartbeat), or this one is
                # shutting down (stop): the entry stays pending, for the new owner, a
                # takeover, or this consumer after a restart (start_item marks it
                # again). This call was cut, so no result can come from it (a cut
                # call is billed nothing): this consumer's mark goes. A takeover
                # keeps the mark of the replica it took over from (it may be stalled,
                # its call still running), and a k8s pod comes back under another
                # name, which never resumes the old one's entries: a stopping job
                # whose item a stopped replica had marked waited for the sweep.
                await self.store.drop_mark(job_id, index, self.consumer, stream)
                raise
            # Its job is stopping or ended: the item goes without a result (a cut
            # call is metered as no request), and a stopping job may end now.
            await self.store.let_go(job_id, index, self.consumer, stream, entry_id)
        except Exception:
            # Not running here any more (_finished logs why; the entry stays pending,
            # to be taken over): this consumer's mark goes, or a job stopped
            # meanwhile waited for the sweep (a takeover keeps another's mark).
            await self.store.drop_mark(job_id, index, self.consumer, stream)
            raise

    async def _run_item(self, stream: str, entry_id: str, job_id: str, index: int) -> None:
        record = await self.store.get(job_id)
        if record is None:
            await self.store.ack(stream, entry_id)
            return
        owner = record.owner
        reason = await self.key_status.stop_reason(owner.key_id)
        if reason:
            await self.store.stop(job_id, reason)  # start_item refuses the item now
        item = await self.store.start_item(job_id, index, self.consumer, stream, entry_id)
        if item is None:
            return  # not to run (the job ended or is stopping, or it has a result)
        deadline_s = record.number("deadline_ms") / 1000
        request_id = jobstore.request_id(job_id, index)
        # One trace per item (it runs long after CreateJob's), found by its job id and
        # request id; its calls to workers are its children.
        attributes = {"tokenmesh.job.id": job_id, "tokenmesh.request_id": request_id}
        try:
            with (
                TRACER.start_as_current_span("job item", attributes=attributes),
                metrics.ITEMS_RUNNING.track_inprogress(),
            ):
                outcome = await self.executor.run(
                    item,
                    index,
                    request_id,
                    owner.identity,
                    deadline_s,
                    slot=self._slots,  # held per call: a waiting item holds none
                )
        except DeadlinePassed:
            await self.store.end(job_id, jobstore.EXPIRED, due_before_ms=jobstore.now_ms())
            await self.store.let_go(job_id, index, self.consumer, stream, entry_id)
            return
        await self._store(job_id, index, outcome, stream, entry_id)
        self.finished_total += 1

    async def _store(
        self, job_id: str, index: int, outcome: Outcome, stream: str, entry_id: str
    ) -> None:
        """Stores a finished item's result (`_save`); a cancel meanwhile waits for it.

        The worker has answered and metered the call: dropped here, the item ran again
        (its whole cost again), or a stopped job ended without a result its owner paid
        for. So the save goes on through a cancel: its job's stop (`finish_item` keeps
        a stopping job's result and writes nothing to an ended one), a takeover
        (`HSETNX` never overwrites the result another replica stored first) or this
        runner's stop, which waits only until `_stop_by`, then cuts it. A cancel
        waited through is taken back (`uncancel`): the item finished.
        """
        save = asyncio.create_task(
            self._save(job_id, index, outcome, stream, entry_id), name=f"save {job_id}:{index}"
        )
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)
        cancels = await self._wait_through_cancels(save)
        if not save.done():  # the stop's bound passed: the item goes as a cut one
            save.cancel()
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None  # awaited in a task (_start)
        for _ in range(cancels):
            task.uncancel()
        save.result()  # raises when it gave up: the entry waits for a takeover

    async def _wait_through_cancels(self, save: asyncio.Task[bool]) -> int:
        """Waits until `save` ends, or until a stop's bound once cancelled; returns how
        many cancels it waited through."""
        loop = asyncio.get_running_loop()
        cancels = 0
        while not save.done():
            left = None if self._stop_by is None else self._stop_by - loop.time()
            if cancels and left is not None and left <= 0:
                break
            try:
                await asyncio.wait([save], timeout=left if cancels else None)
            except asyncio.CancelledError:
                cancels += 1
        return cancels

    async def _save(
        self, job_id: str, index: int, outcome: Outcome, stream: str, entry_id: str
    ) -> bool:
        """Stores a finished item's result (`JobStore.finish_item`), trying again with
        backoff on Redis errors for `save_retry_s` (until a stop's bound while stopping):
        the script is idempotent (`HSETNX` keeps the first result and counts it once,
        `XACK` is, and it writes nothing to an ended job). A reply lost to a reset
        connection may follow a write that was done: the next try changes nothing."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.save_retry_s
        backoff_s = SAVE_FIRST_BACKOFF_S
        tries = 0
        while True:
            tries += 1
            try:
                stored = await self.store.finish_item(
                    job_id, index, outcome.result, outcome.usage, stream, entry_id, self.consumer
                )
                if stored:
                    failed = outcome.result.HasField("error")
                    metrics.ITEMS_FINISHED.labels(
                        metrics.FAILED if failed else metrics.SUCCEEDED
                    ).inc()
                return stored
            except (RedisError, OSError, TimeoutError) as exc:
                if not _store_unavailable(exc):
                    raise
                until = give_up_at if self._stop_by is None else min(give_up_at, self._stop_by)
                if loop.time() + backoff_s >= until:
                    logger.error(
                        "gave up storing the result of item %d of job %s after %d tries: %s;"
                        " the item will run again",
                        index,
                        job_id,
                        tries,
                        exc,
                    )
                    raise
                if tries == 1:
                    logger.warning(
                        "storing the result of item %d of job %s failed (%s); trying again",
                        index,
                        job_id,
                        exc,
                    )
            await asyncio.sleep(backoff_s)
            backoff_s = min(SAVE_MAX_BACKOFF_S, backoff_s * 2)


async def stop_revoked(
    store: JobStore, key_status: KeyStatus, states: Mapping[str, JobState]
) -> set[str]:
    """Stops the jobs (id -> status and owner) whose owner key was revoked or expired
    (reason KEY_REVOKED or KEY_EXPIRED); returns them. Asks once per distinct owner."""
    reasons = await key_status.stop_reasons({state.owner for state in states.values()})
    stopped = set()
    for job_id, state in states.items():
        reason = reasons.get(state.owner, "")
        if reason:
            if await store.stop(job_id, reason) == StopOutcome.STOPPED:  # not another's
                logger.info("stopped job %s: its key %s (%s)", job_id, state.owner, reason)
            stopped.add(job_id)  # stopping or ended either way: its calls are cut
    return stopped


class RevokedKeySweep:
    """RevokedKeySweep stops the unfinished jobs of revoked or expired keys, whoever runs
    them, or nobody yet.

    The runners check a job's key only for the items they read: a job whose items no
    runner had picked up (every slot busy with other lanes, or queued behind other
    jobs) stayed QUEUED or RUNNING after its key was revoked, and its owner, its
    webhook and its OpenAI batch were told it was in progress. Nothing was spent
    meanwhile; the status lied.

    A round reads up to `batch` jobs of the `active` zset (ZSCAN, going on from where
    the last round stopped), their status and owner in one round trip, and each
    distinct owner's key once (`KeyStatus`, verdicts up to 2 s old). So a pass over
    N unfinished jobs takes ceil(N / batch) rounds; with few (up to `batch`) a
    revoked key's jobs stop within one round and a verdict's age.

    Args:
        store: the jobs in Redis.
        key_status: tells whether keys may still spend (the runner's: one cache).
        batch: the most jobs one round reads.
    """

    def __init__(
        self, store: JobStore, key_status: KeyStatus, batch: int = KEY_SWEEP_BATCH
    ) -> None:
        self.store = store
        self.key_status = key_status
        self.batch = batch
        self._cursor = 0  # where the next round goes on in the `active` zset

    async def run_forever(self, every_s: float = KEY_SWEEP_EVERY_S) -> None:
        """Sweeps a batch every `every_s` seconds."""
        while True:
            await self.sweep()
            await asyncio.sleep(every_s)

    async def sweep(self) -> int:
        """Stops the next batch's jobs of revoked or expired keys; returns how many."""
        job_ids = await self._next_batch()
        if not job_ids:
            return 0
        states = await self.store.owners(job_ids)
        runnable = {
            job_id: state
            for job_id, state in states.items()
            if state.status in RUNNABLE and state.owner  # a stopping one is stopped already
        }
        return len(await stop_revoked(self.store, self.key_status, runnable))

    async def _next_batch(self) -> list[str]:
        """Returns up to about `batch` active jobs from where the last round stopped (a
        round ends early where a pass ends: the next one starts it again)."""
        found: dict[str, None] = {}
        for _ in range(KEY_SWEEP_SCANS):
            page, self._cursor = await self.store.active_page(self._cursor, self.batch)
            found.update(dict.fromkeys(page))
            if self._cursor == 0 or len(found) >= self.batch:
                break
        return list(found)


class ExpirySweep:
    """ExpirySweep ends jobs whose deadline passed (EXPIRED), whichever replica runs them."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def run_forever(self, every_s: float) -> None:
        """Sweeps every `every_s` seconds."""
        while True:
            await self.sweep()
            await asyncio.sleep(every_s)

    async def sweep(self) -> int:
        """Ends the overdue jobs; returns how many this call ended."""
        now = int(time.time() * 1000)
        ended = 0
        for job_id in await self.store.overdue(now):
            ended += await self.store.end(job_id, jobstore.EXPIRED, due_before_ms=now)
        return ended


def _store_unavailable(exc: BaseException) -> bool:
    """Tells whether `exc` is Redis out of reach or refusing for now (it may answer a
    try again): a reset connection can come as a bare OSError, a stall as TimeoutError."""
    return isinstance(exc, (*STORE_UNREACHABLE, OSError, TimeoutError)) or is_store_refusal(exc)


def _after(entry_id: str) -> str:
    """Returns the stream id right after `entry_id` ("0-0" stays: nothing delivered)."""
    if entry_id in ("0-0", ""):
        return entry_id
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
