"""Token reservations whose worker died: given back by the workers still alive.

A worker reserves prompt + max_tokens of a key's token budgets before a request
runs and reconciles the reservation with what the request used when it ends
(services.inference.budget). A worker killed meanwhile (kill -9, the OOM
killer, a lost node) reconciled nothing: each of its running requests'
reservations stayed charged to the key's month until the month ended, and a
key with 32 requests of 4,096 tokens in flight lost 131k tokens of its monthly
budget to one crash. Those requests were cut (their clients saw the stream
end without a final message) and billed nothing: no usage record was written.

So each worker process is a *holder*: its worker id and an incarnation id of
its own. The scripts that reserve, reconcile and take back keep the list of its
open reservations (`tm:budget:open:<holder>`) in the same step, and the holder
keeps a liveness key (`tm:budget:holder:<holder>`, HOLDER_TTL_S, refreshed every
REAP_EVERY_S). Every worker's reaper looks at the holders it knows of
(`tm:budget:holders`); a holder whose liveness key is gone is dead, and its open
reservations are taken back one script each (the budget's `_FORGET`: refunded
once however many reapers do it, and not at all if the request was reconciled
since, a worker frozen past HOLDER_TTL_S that wakes settling its own, or taken
over since: a job item tried again on another worker under the same request id
makes that worker its holder, and it reconciles the item).

A worker killed between recording a request (its usage event is in its spool)
and its reconcile landing (milliseconds, or as long as Redis was slow or away: a
reconcile is tried until Redis answers, admission.STORE_RETRY_EVERY_S) left the
reservation open, and a reaper gave all of it back: the key's month missed tokens
the meter bills (the fault suite's kill -9 of a worker caught it, 7 tokens under).
So each worker writes its holder name, and the spool position it started at, to
its spool directory (`budget.holders`). Its successor on that spool (the same
worker restarted: the spool's lock says the predecessor is gone) reconciles each
request the predecessor recorded whose reconcile never landed, from the spooled
event (TokenBudgets.recover: also after a reaper took it back), then takes back
the rest of the predecessor's open reservations at once instead of after
HOLDER_TTL_S. What stays under: a worker whose spool is not there when it comes
back (a lost node, an emptied volume), or that comes back after the charges'
REPLAY_TTL_S (an hour).

Redis away longer than HOLDER_TTL_S lets every holder's liveness key lapse, live
ones too. A reaper whose round failed tries again within AFTER_FAILURE_S (its
holder beats first), and reaps no one until `every_s` after its last failure:
its live peers, failing alike, have beaten again by then. Reaping at once, the
first reaper back took back every live peer's running reservations, and the
room they held was admitted twice.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter
from redis.exceptions import RedisError

from services.core import contract
from services.core.redis_service import text
from services.core.secret_files import replace_file
from services.core.tasks import SupervisedTask, Supervisor
from services.inference.budget import HOLDERS_KEY, Recorded, TokenBudgets
from services.inference.usage_log import UsageLog
from tokenmesh.inference.v1 import inference_pb2

logger = logging.getLogger(__name__)

#: How long a holder's liveness key lasts without a refresh: a worker silent this
#: long is dead, and its open reservations are taken back (the worker's default;
#: TOKENMESH_RESERVATION_TTL_SECONDS).
HOLDER_TTL_S = 90
#: How often each worker refreshes its liveness key and looks for dead holders
#: (the worker's: a third of its TTL).
REAP_EVERY_S = HOLDER_TTL_S / 3
#: How soon a round that failed (Redis away) is tried again.
AFTER_FAILURE_S = 1.0
# KEYS: the holders, the holder's open reservations; ARGV: the holder.
# Forgets a dead holder once nothing of it is open.
_FORGET_HOLDER = """
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SREM', KEYS[1], ARGV[1]) end
return 0
"""

#: The file in a worker's spool directory that names its holders not yet settled by a
#: successor: one JSON line `[holder, the spool position it started at]` each.
HOLDERS_FILE = "budget.holders"

RECOVERED = Counter(
    "tokenmesh_budget_reservations_recovered_total",
    "Requests a killed worker recorded whose reconcile never landed, reconciled by its "
    "successor on the same spool from their usage events.",
)
REAPED = Counter(
    "tokenmesh_budget_reservations_reaped_total",
    "Token reservations of dead workers given back (their requests were cut and "
    "billed nothing), by whether one was still charged.",
    ("refunded",),
)


def holder_name(worker_id: str) -> str:
    """Returns a new holder name for this process: its worker id and an incarnation id
    (a worker restarted under the same id is another holder; its predecessor's
    reservations are taken back, not taken over)."""
    return f"{worker_id}:{uuid.uuid4().hex[:12]}"


def alive_key(holder: str) -> str:
    """Returns `holder`'s liveness key."""
    return f"tm:budget:holder:{holder}"


@dataclass(frozen=True)
class Incarnation:
    """Incarnation is one process of a worker: its holder and where its spool stood."""

    holder: str
    since: int  # the spool position when it started: what it recorded lies past it


def read_incarnations(directory: Path) -> list[Incarnation]:
    """Returns the holders the spool at `directory` names (HOLDERS_FILE), oldest first."""
    try:
        lines = (directory / HOLDERS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    incarnations = []
    for line in lines:
        try:
            holder, since = json.loads(line)
            incarnations.append(Incarnation(str(holder), int(since)))
        except (ValueError, TypeError):  # not one a worker wrote (a hand edit)
            logger.warning("reservation reaper: dropped %r of %s", line, HOLDERS_FILE)
    return incarnations


def write_incarnations(directory: Path, incarnations: list[Incarnation]) -> None:
    """Names `incarnations` in the spool at `directory` (whole or not at all)."""
    lines = "".join(json.dumps([one.holder, one.since]) + "\n" for one in incarnations)
    replace_file(directory / HOLDERS_FILE, lines.encode())


def recorded(events: Iterable[inference_pb2.UsageEvent]) -> list[Recorded]:
    """Returns the billed requests among spooled usage events (one whose attempt was
    set apart billed nothing and reconciled to 0; one without a key reserved nothing)."""
    return [
        Recorded(
            event.key_id,
            event.event_id,
            event.usage.prompt_tokens + event.usage.completion_tokens,
            event.finish_unix_ms / 1000,
        )
        for event in events
        if event.key_id and contract.UNFINISHED_ATTEMPT_MARK not in event.event_id
    ]


class ReservationReaper:
    """ReservationReaper keeps this holder alive and takes back dead holders'
    reservations (see the module).

    Args:
        budgets: the worker's budgets; their `holder` is this reaper's.
        every_s: how often it refreshes and reaps.
        ttl_s: how long its liveness key lasts without a refresh.
        spool: the worker's usage spool, where its holders are named: its
            predecessors' are settled at start (see the module).
    """

    def __init__(
        self,
        budgets: TokenBudgets,
        every_s: float = REAP_EVERY_S,
        ttl_s: int = HOLDER_TTL_S,
        spool: UsageLog | None = None,
    ) -> None:
        if not budgets.holder:
            raise ValueError("a reaper needs budgets that list their reservations (a holder)")
        self.budgets = budgets
        self.redis = budgets.redis
        self.every_s = every_s
        self.ttl_s = ttl_s
        self.spool = spool
        # Taken before any request: everything this holder records lies past it.
        self._since = spool.end if spool is not None else 0
        self._forget_holder = self.redis.register_script(_FORGET_HOLDER)
        self._task: SupervisedTask | None = None
        self._successor: SupervisedTask | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Starts refreshing and reaping in the background, under `supervisor`, and
        settling the predecessors its spool names."""
        if self.spool is not None:
            directory = self.spool.directory
            before = [
                one for one in read_incarnations(directory) if one.holder != self.budgets.holder
            ]
            write_incarnations(directory, [*before, Incarnation(self.budgets.holder, self._since)])
            if before:
                settle = functools.partial(self.settle_predecessors, before)
                self._successor = supervisor.spawn("reservation-successor", settle)
        self._task = supervisor.spawn("reservation-reaper", self.run_forever)

    async def settle_predecessors(self, predecessors: list[Incarnation]) -> None:
        """Settles each predecessor on this worker's spool: reconciles what it recorded
        whose reconcile never landed, takes back the rest of its open reservations,
        and stops naming it. Tried again while Redis is away."""
        assert self.spool is not None
        for one in predecessors:
            while True:
                try:
                    await self._settle(one)
                    break
                except (RedisError, OSError, TimeoutError) as exc:
                    logger.warning(
                        "reservation reaper: could not settle %s yet (%s)",
                        one.holder,
                        type(exc).__name__,
                    )
                    await asyncio.sleep(AFTER_FAILURE_S)
        remaining = [
            one for one in read_incarnations(self.spool.directory) if one not in predecessors
        ]
        write_incarnations(self.spool.directory, remaining)

    async def _settle(self, predecessor: Incarnation) -> None:
        assert self.spool is not None
        events = self.spool.events_since(predecessor.since)
        requests = await asyncio.to_thread(recorded, events)
        charged = await self.budgets.recover(predecessor.holder, requests)
        RECOVERED.inc(charged)
        refunded = await self.take_back_all(predecessor.holder)
        logger.info(
            "settled %s, this worker's predecessor: %d recorded requests reconciled, "
            "%d open reservations given back",
            predecessor.holder,
            charged,
            refunded,
        )

    async def run_forever(self) -> None:
        """Refreshes this holder and reaps dead ones, every `every_s`; Redis errors are
        logged and the next round tries again (a reservation waits, never lost)."""
        reap_from = 0.0  # no reaping before: peers beat again after Redis came back
        while True:
            delay = self.every_s
            try:
                await self.beat()
                if time.monotonic() >= reap_from:
                    await self.reap()
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("reservation reaper: Redis unavailable (%s)", type(exc).__name__)
                reap_from = time.monotonic() + self.every_s
                delay = min(self.every_s, AFTER_FAILURE_S)
            await asyncio.sleep(delay)

    async def beat(self) -> None:
        """Marks this holder alive for `ttl_s`. (The reserve script makes it known to
        every reaper, in `HOLDERS_KEY`, with its first open reservation.)"""
        await self.redis.set(alive_key(self.budgets.holder), 1, ex=self.ttl_s)

    async def reap(self) -> int:
        """Takes back the open reservations of every dead holder; returns how many it
        refunded. A holder with none left is forgotten."""
        refunded = 0
        for raw in await self.redis.smembers(HOLDERS_KEY):
            holder = text(raw)
            if holder == self.budgets.holder or await self.redis.exists(alive_key(holder)):
                continue
            refunded += await self.take_back_all(holder)
        return refunded

    async def take_back_all(self, holder: str) -> int:
        """Takes back every open reservation of `holder`, a dead one; returns how many
        it refunded. Forgets the holder once none is left."""
        refunded = 0
        open_key = TokenBudgets.open_key(holder)
        for field, value in (await self.redis.hgetall(open_key)).items():
            try:
                done = await self.budgets.take_back_open(holder, text(field), text(value))
            except (ValueError, TypeError):  # not one the scripts wrote (a hand edit)
                logger.warning("reservation reaper: dropped %r of %s", text(field), open_key)
                await self.redis.hdel(open_key, field)
                continue
            REAPED.labels(str(done).lower()).inc()
            refunded += done
        if refunded:
            logger.warning(
                "gave back %d token reservations of worker %s, which died with them open",
                refunded,
                holder,
            )
        # Forgotten only with nothing open (a frozen holder that woke adds itself back).
        await self._forget_holder(keys=[HOLDERS_KEY, open_key], args=[holder])
        return refunded

    async def stop(self) -> None:
        """Ends this holder at a clean stop (after its requests settled): any
        reservation still open is taken back by the next reaper at once, not after
        `ttl_s`. Its own loop stops first: its next refresh brought the holder back."""
        if self._successor is not None:
            await self._successor.stop(timeout_s=2)
            self._successor = None
        if self._task is not None:
            await self._task.stop(timeout_s=2)
            self._task = None
        try:
            await self.redis.delete(alive_key(self.budgets.holder))
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("reservation reaper: could not end holder (%s)", type(exc).__name__)
