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

What it cannot know: a worker killed between recording a request (its usage
record is durable) and its reconcile landing has that request's reservation
taken back, so the key's month does not count tokens the request was billed.
That is milliseconds, unless Redis was slow or away then: a reconcile is tried
until Redis answers (admission.STORE_RETRY_EVERY_S), and a graceful stop waits 5 s
for them before it ends its holder. Under, never over: no request is refused for
tokens nobody used.

Redis away longer than HOLDER_TTL_S lets every holder's liveness key lapse, live
ones too. A reaper whose round failed tries again within AFTER_FAILURE_S (its
holder beats first), and reaps no one until `every_s` after its last failure:
its live peers, failing alike, have beaten again by then. Reaping at once, the
first reaper back took back every live peer's running reservations, and the
room they held was admitted twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from prometheus_client import Counter
from redis.exceptions import RedisError

from services.core.redis_service import text
from services.core.tasks import SupervisedTask, Supervisor
from services.inference.budget import HOLDERS_KEY, TokenBudgets

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


class ReservationReaper:
    """ReservationReaper keeps this holder alive and takes back dead holders'
    reservations (see the module).

    Args:
        budgets: the worker's budgets; their `holder` is this reaper's.
        every_s: how often it refreshes and reaps.
        ttl_s: how long its liveness key lasts without a refresh.
    """

    def __init__(
        self, budgets: TokenBudgets, every_s: float = REAP_EVERY_S, ttl_s: int = HOLDER_TTL_S
    ) -> None:
        if not budgets.holder:
            raise ValueError("a reaper needs budgets that list their reservations (a holder)")
        self.budgets = budgets
        self.redis = budgets.redis
        self.every_s = every_s
        self.ttl_s = ttl_s
        self._forget_holder = self.redis.register_script(_FORGET_HOLDER)
        self._task: SupervisedTask | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Starts refreshing and reaping in the background, under `supervisor`."""
        self._task = supervisor.spawn("reservation-reaper", self.run_forever)

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
            refunded += await self._take_back_all(holder)
        return refunded

    async def _take_back_all(self, holder: str) -> int:
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
        if self._task is not None:
            await self._task.stop(timeout_s=2)
            self._task = None
        try:
            await self.redis.delete(alive_key(self.budgets.holder))
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("reservation reaper: could not end holder (%s)", type(exc).__name__)
