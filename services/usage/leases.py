"""Window leases: admit requests far below their limits without a Redis round trip.

A decision that goes to Redis costs this service ~0.15 ms of CPU and Redis
~0.07 ms, mostly the round trip itself, and decisions arrive one after
another, so group commit has nothing to batch. A key far below its limits
does not need a fresh look at its windows for every request: when a
decision finds every window of the request at most half full after it, the
same Lua call also reserves a few slots (a *lease*) in all of them. The
next requests of that key on this replica are admitted locally from the
lease; every ~50 ms the finished leases are *settled* in one call: used
slots get the time they were admitted, unused ones are removed. (Envoy's
rate-limit quota service and Google's Doorman hand out quota the same way.)

Why the windows stay exact:
- A reserved slot is in the window from its reservation on, so every
  admitted request is counted, on every replica, before it is admitted.
- Its score is the reservation time plus LEASE_HOLD_MS (twice the lease's
  life) until it is settled, so it cannot leave the window before the
  request it admits would: not even if it is never settled (a settle that
  failed, a replica killed). Scored at the reservation, an unsettled lease's
  used slots left up to a second before their requests.
- Leases are granted only while every window stays at most half full, so
  close to a limit every decision goes to Redis, exactly as without leases.
- A lease holds at most 1/64 of a limit and lives 1 s; the only cost is
  that unused reserved slots count as used until settled. Reaching the limit
  through them would take the other half of the window within 1 s.
- A replica that dies before settling (or a settle that fails) leaves its
  reservations where the grant scored them: they leave the window within a
  minute and two seconds, never earlier than the requests they admitted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

LEASE_TTL_S = 1.0
# How far past its reservation a lease's slot is scored until settled: past any
# admission the lease makes (its life, and as much again for clocks and delays).
LEASE_HOLD_MS = int(2 * LEASE_TTL_S * 1000)
LEASE_MAX_SHARE = 64  # a lease holds at most 1/64 of any of its limits
SETTLE_INTERVAL_S = 0.05

# A lease is keyed by its windows and their limits: a changed limit is a new lease.
LeaseKey = tuple[tuple[str, int], ...]

# KEYS: the windows of every lease, lease after lease. ARGV: window_ms, then per
# lease: its window count, used count, free count, (member, admitted_ms) per
# used slot, then the free members. Used slots move to the time they were
# admitted; free ones leave the windows.
SETTLE_SCRIPT = """
local window = tonumber(ARGV[1])
local a, k = 2, 1
while a <= #ARGV do
  local windows, used, free = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local scored, dropped = {}, {}
  for u = 0, used - 1 do
    table.insert(scored, ARGV[a + 2 * u + 1])
    table.insert(scored, ARGV[a + 2 * u])
  end
  for f = 0, free - 1 do table.insert(dropped, ARGV[a + 2 * used + f]) end
  for w = k, k + windows - 1 do
    if used > 0 then
      redis.call('ZADD', KEYS[w], 'XX', unpack(scored))
      -- Never shorter than a decision made it: other leases' slots are scored ahead.
      redis.call('PEXPIRE', KEYS[w], window + HOLD_MS)
    end
    if free > 0 then redis.call('ZREM', KEYS[w], unpack(dropped)) end
  end
  a = a + 2 * used + free
  k = k + windows
end
return 1
""".replace("HOLD_MS", str(LEASE_HOLD_MS))


@dataclass
class Lease:
    """Lease is a handful of slots reserved in every window of one request shape.

    Attributes:
        windows: the window keys, in limit order.
        counts: each window's count without the free slots (what the last
            admission left), for the rate-limit headers.
        oldest: each window's oldest score at grant time (for the reset header).
        free: reserved members not used yet.
        used: (member, admitted at, ms) of the slots used so far.
        deadline: monotonic time after which the lease admits nothing.
        granted_ms: Redis's time when it reserved the slots: no admission is
            recorded earlier (a wall clock stepped back after the grant, by NTP or
            a VM's resume, recorded them up to the step before their reservation,
            and the settle moved them there: they left the windows that much
            early, and the key was admitted that much more: 650 at rpm=640).
    """

    windows: tuple[str, ...]
    counts: list[int]
    oldest: list[int]
    free: list[str]
    deadline: float
    used: list[tuple[str, int]] = field(default_factory=list)
    settling: bool = False  # handed to the settler: its slots are Redis's to change now
    granted_ms: int = 0

    def take(self, hits: int, now_ms: int) -> bool:
        """Admits `hits` from the lease if it has them; True when it did."""
        if len(self.free) < hits or time.monotonic() >= self.deadline:
            return False
        admitted_ms = max(now_ms, self.granted_ms)
        for _ in range(hits):
            self.used.append((self.free.pop(), admitted_ms))
        self.counts = [count + hits for count in self.counts]
        return True

    def give_back(self, member: str) -> bool:
        """Makes a used slot free again (its request was taken back); False when the
        lease is being settled or the slot is not among its used ones."""
        if self.settling:
            return False
        for index, (used, _) in enumerate(self.used):
            if used == member:
                del self.used[index]
                self.free.append(member)
                self.counts = [count - 1 for count in self.counts]
                return True
        return False


class LeaseTable:
    """LeaseTable holds this replica's live leases and those waiting to be settled.

    Args:
        size: slots per lease (0 = no leases: every decision goes to Redis).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._live: dict[LeaseKey, Lease] = {}
        self._requested: set[LeaseKey] = set()  # a grant for these is in flight
        self._finished: list[Lease] = []

    def admit(self, key: LeaseKey, hits: int, now_ms: int) -> Lease | None:
        """Returns the lease that admitted `hits`, or None: ask Redis."""
        lease = self._live.get(key)
        if lease is None:
            return None
        if lease.take(hits, now_ms):
            return lease
        self._retire(key)
        return None

    def request(self, key: LeaseKey, limits: Sequence[int]) -> int:
        """Returns how many slots to ask for with a decision (0: none now)."""
        size = min(self.size, *(limit // LEASE_MAX_SHARE for limit in limits))
        if size < 2 or key in self._requested:
            return 0  # too small to be worth it, or another decision is asking already
        self._requested.add(key)
        return size

    def granted(self, key: LeaseKey, lease: Lease | None) -> None:
        """Records Redis's answer to `request` (None: nothing was reserved)."""
        self._requested.discard(key)
        if lease is None:
            return
        self._retire(key)
        self._live[key] = lease

    def due(self, everything: bool = False) -> list[Lease]:
        """Removes and returns the leases to settle: finished ones (or all)."""
        now = time.monotonic()
        for key in [k for k, lease in self._live.items() if everything or _over(lease, now)]:
            self._retire(key)
        finished, self._finished = self._finished, []
        for lease in finished:
            lease.settling = True
        return finished

    def holds_any(self) -> bool:
        """Tells whether any lease is live or waiting to be settled."""
        return bool(self._live or self._finished)

    def _retire(self, key: LeaseKey) -> None:
        lease = self._live.pop(key, None)
        if lease is not None:
            self._finished.append(lease)


def _over(lease: Lease, now: float) -> bool:
    return not lease.free or now >= lease.deadline


def settle_call(leases: Sequence[Lease], window_ms: int) -> tuple[list[str], list[str | int]]:
    """Returns the KEYS and ARGV of one SETTLE_SCRIPT call for `leases`."""
    keys: list[str] = []
    args: list[str | int] = [window_ms]
    for lease in leases:
        keys.extend(lease.windows)
        args.extend((len(lease.windows), len(lease.used), len(lease.free)))
        for member, admitted_ms in lease.used:
            args.extend((member, admitted_ms))
        args.extend(lease.free)
    return keys, args
