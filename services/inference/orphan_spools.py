"""Usage spools whose worker is gone for good: shipped and settled by a live worker.

A worker's usage spool is its own directory under the spool root, named by its
worker id (services.inference.usage_log). The worker restarted under the same id
ships what its predecessor left and settles its budget reservations
(services.inference.reservation_reaper). A worker that never comes back under
that id left both behind for good: compose names a worker by its container (a
`docker compose down`, an image update or a scale-in makes new containers, so new
ids), and a launcher started with fewer workers. Its unshipped events were lost
with the container, and what it recorded but did not reconcile stayed under in
its keys' months.

So every worker looks at its siblings under the spool root (a volume the
workers share: compose's `usage-spools`). A spool that no process holds (its
lock is free) and that has not changed for `after_s` belongs to a worker that is
gone: the first worker to lock it adopts it, reconciles the budget reservations
its holders recorded, ships its events (the meter counts an event id once: a
spool shipped twice is billed once), and waits for the meter to apply them; a
spool that keeps nothing is then removed. A round that runs out of time (Redis or
the meter away) lets the spool go and a later round goes on.

A worker of that id that starts meanwhile waits for the lock (SPOOL_LOCK_WAIT_S)
and, if the adopter removed the spool, starts a new one. The first round runs
`after_s` after this worker started: workers started together have taken their
own spools by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import Counter
from redis.exceptions import RedisError

from services.inference.budget import TokenBudgets
from services.inference.reservation_reaper import ReservationReaper, read_incarnations
from services.inference.usage_log import SpoolBusy, UsageLog

logger = logging.getLogger(__name__)

#: How long one adoption may take (settling, shipping, the meter applying) before
#: the spool is let go until the next round.
ADOPT_TIMEOUT_S = 30.0
#: A directory is a usage spool when it holds this file (its name in Redis).
_SPOOL_MARKER = "events.id"

ADOPTED = Counter(
    "tokenmesh_usage_spools_adopted_total",
    "Usage spools of workers that are gone, adopted by this worker, by outcome: "
    "emptied (shipped, applied, removed), kept (a round ran out of time; tried again) "
    "or failed (an error, logged; tried again).",
    ["outcome"],
)


def stale_spools(root: Path, own: Path, after_s: float, now: float) -> Iterator[Path]:
    """Yields the spools under `root`, other than `own`, unchanged for `after_s`."""
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return
    for directory in entries:
        if directory == own:
            continue
        try:
            if not (directory / _SPOOL_MARKER).is_file():
                continue
            changed = max(path.stat().st_mtime for path in directory.iterdir())
        except (OSError, ValueError):
            # Removed meanwhile (another adopter), or not this worker's to read (a
            # volume's lost+found: is_file raises EACCES for a non-root worker).
            continue
        if changed <= now - after_s:
            yield directory


class SpoolAdopter:
    """SpoolAdopter adopts the usage spools of workers that are gone (see the module).

    Args:
        own: this worker's spool directory; its siblings are the candidates.
        open_spool: opens a spool without waiting for its lock (raises SpoolBusy).
        budgets: this worker's budgets (their holder settles the spools' holders).
        after_s: how long a spool must be unheld and unchanged to be adopted.
    """

    def __init__(
        self,
        own: Path,
        open_spool: Callable[[Path], UsageLog],
        budgets: TokenBudgets,
        after_s: float,
    ) -> None:
        self.own = own
        self.open_spool = open_spool
        self.budgets = budgets
        self.after_s = after_s

    async def run_forever(self) -> None:
        """Adopts stale spools every `after_s` / 2, the first time `after_s` from now."""
        await asyncio.sleep(self.after_s)
        while True:
            await self.adopt_stale()
            await asyncio.sleep(self.after_s / 2)

    async def adopt_stale(self) -> int:
        """Adopts every stale spool it can lock now; returns how many it emptied. A
        spool that fails is logged and left: the worker's own health does not
        depend on another's leftovers (a supervised task failing in a row turns
        the worker NOT_SERVING)."""
        stale = list(stale_spools(self.own.parent, self.own, self.after_s, time.time()))
        emptied = 0
        for directory in stale:
            try:
                emptied += await self.adopt(directory)
            except Exception:
                ADOPTED.labels("failed").inc()
                logger.exception(
                    "usage spool %s of a worker that is gone: adoption failed", directory
                )
        return emptied

    async def adopt(self, directory: Path) -> bool:
        """Settles, ships and empties one spool; returns whether it was removed."""
        try:
            spool = await asyncio.to_thread(self.open_spool, directory)
        except (SpoolBusy, FileNotFoundError):
            return False  # held (its worker is back, or another adopter), or removed
        emptied = False
        try:
            async with asyncio.timeout(ADOPT_TIMEOUT_S):
                holders = read_incarnations(directory)
                await ReservationReaper(self.budgets, spool=spool).settle_predecessors(holders)
                await spool.empty_out()
            emptied = True
        except (TimeoutError, RedisError, OSError) as exc:
            logger.warning(
                "usage spool %s of a worker that is gone: not emptied yet (%s); "
                "%d bytes kept, tried again later",
                directory,
                type(exc).__name__,
                spool.kept_bytes(),
            )
        finally:
            await spool.stop(timeout_s=0, remove=emptied)
        ADOPTED.labels("emptied" if emptied else "kept").inc()
        if emptied:
            logger.info(
                "adopted the usage spool %s of a worker that is gone: %d events shipped, "
                "its budget reservations settled, the spool removed",
                directory,
                spool.shipped_total,
            )
        return emptied
