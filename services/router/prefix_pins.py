"""Pins a model version's busiest prompt heads to one worker each, balanced.

The edge hashes a request's prompt head (`x-tokenmesh-prefix`) to pick a
worker (Maglev, bounded load). Over many heads that spreads evenly, but a
version's traffic is often a handful of hot heads (system prompts,
templates), and a hash splits a handful unevenly: 8 heads over 2 workers
split 4/4 only 27% of the time. The busier worker then queues, or its prefix
cache cannot hold its share and evicts what the other worker would have kept.

Workers report their hottest heads in every heartbeat (decayed request counts,
services.inference.load_report.PrefixHeat). From those reports this module
assigns each hot head one worker:

- keep each head where the last assignment put it, while that worker serves
  the version; start a new one where its requests go now (they arrived there
  last: where the hash sends it), else where most of them went; its KV is
  cached there;
- then, while the busiest worker's share (heat per unit of endpoint weight)
  is over MOVE_GAIN times the even share, move the head that best evens it
  out to the idlest worker; a split within MOVE_GAIN is left alone;
- a head pinned by the last assignment moves only when the busiest and the
  idlest worker's shares differ by more than NOISE_SIGMAS standard
  deviations of their counts: a move costs the head a cache miss on its new
  worker, and two K1 probes saw heads of 8 equally busy ones move every ~4 s
  on noise alone (4/4, 5/3, 3/5, 4/4 ...). New heads are placed freely;
- before that, the pinned heads are fitted into the workers' prefix caches:
  while a worker is pinned more prompt tokens than its cache holds (what each
  head holds in its worker's cache, as workers report it: its latest prompt
  length once per tenant that sent it lately), one of its heads moves
  to a worker with room (FIT_SHARE of its cache), noise or not, and the
  balance moves no head into a cache it would take past FIT_SHARE (unless
  the head's own worker overflows already: when the caches cannot hold
  every head, a move only moves misses). A cache that cannot hold its
  worker's heads evicts them in turn, and every eviction is a full prefill:
  K1 probes held 5/3 splits of 8 equal heads for 7-11 s (within the noise
  bound at their counts) while 4 of those prompts fill a worker's cache,
  and a tenth of requests missing puts TTFT p90 on a miss.

The edge's Lua filter reads the pins from its route's metadata and asks Envoy
for the pinned worker (a non-strict override: a worker that is unhealthy or
gone falls back to the hash). Heads that are not pinned keep the hash.

A pinned request skips the hash's bounded load (Maglev's `hash_balance_factor`:
no worker takes more than HASH_BALANCE_FACTOR % of its weighted share of the
active requests, past it the hash spills to the next worker). So a head hotter
than that share of the version's heat on its worker (or than HASH_BALANCE_FACTOR
% of an even split's, whatever the weights) is not pinned (`_Bounds`): left to
the hash, it spills over. One shared system prompt is most applications' whole
traffic (every request's first 64 bytes alike): pinned, it sent all of a
version's requests to one worker while the others idled, and when that worker's
weight fell, all of them to the other one.

Pure and deterministic: the same reports and last pins give the same pins.
The last pins are kept in Redis (services.router.pin_store), for every
router replica to start from: starting from the reports alone, a head that
just moved still showed most of its heat on its old worker, and the balance
moved it, or another, back and forth; and two replicas that each kept their
own pinned a head differently, sending it to two workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: Pins per model version (route metadata stays small; the rest keep the hash).
MAX_PINS = 64
#: Heads move only while the busiest worker's share is over this times the even share.
MOVE_GAIN = 1.1
#: A pinned head moves only when the busiest and idlest shares differ by more than
#: this many standard deviations of their counts (decayed Poisson counts: variance
#: about half the count): ~0.3% of polls on noise alone, where MOVE_GAIN alone let
#: an even split of 8 heads at ~18 requests each move a head every few seconds.
NOISE_SIGMAS = 3.0
#: A head is moved into a worker's prefix cache only while the heads pinned there then
#: take at most this share of it (a worker counts as overflowing past all of it): the
#: cache also holds each prompt's own tail, and a head's size moves with its requests'
#: lengths, so without the margin heads at the boundary would move back and forth.
FIT_SHARE = 0.9
#: Workers that saw a head within this many seconds of the latest one that did
#: count as where it goes now (a heartbeat a second: two reports apart at most).
CURRENT_S = 1.0
#: The edge's bound on one worker's share (in %), which its version clusters are
#: given (services.router.snapshot.HASH_BALANCE_FACTOR is this). A head past it on
#: its worker is left to that bound.
HASH_BALANCE_FACTOR = 150


@dataclass(frozen=True)
class Holder:
    """Holder is one routable worker of a version: where it is, its weight, its hot
    heads (head -> (decayed requests, seconds since the last)), the latest prompt
    length of each (tokens; absent: unknown) and its prefix cache's capacity in tokens
    (0: none, no bound)."""

    address: str
    weight: int
    heat: Mapping[str, tuple[float, float]]
    head_tokens: Mapping[str, int] = field(default_factory=dict)
    cache_tokens: int = 0


def pins(holders: Sequence[Holder], last: Mapping[str, str] | None = None) -> dict[str, str]:
    """Returns {prefix key: worker address} of the version's hottest heads (none: < 2
    workers; none past the edge's bounded load on its worker, `_Bounds`), starting from
    `last` (the previous pins)."""
    live = sorted((h for h in holders if h.weight > 0), key=lambda h: h.address)
    if len(live) < 2:
        return {}
    totals: dict[str, float] = {}
    for holder in live:
        for head, (count, _) in holder.heat.items():
            totals[head] = totals.get(head, 0.0) + count
    bounds = _Bounds.of(live, totals)
    pinnable = (head for head in totals if bounds.fits_somewhere(totals[head]))
    heads = sorted(pinnable, key=lambda head: (-totals[head], head))[:MAX_PINS]
    serving = {h.address for h in live}
    earlier = last or {}
    kept = {head: earlier[head] for head in heads if earlier.get(head) in serving}
    owner = {head: kept.get(head) or _warmest(live, head).address for head in heads}
    caches = _Caches.of(live, owner)
    _fit(live, owner, totals, caches)
    _balance(live, owner, totals, set(kept), caches)
    # The balance keeps a head where it was while the split is within noise, and out
    # of a full cache: what it left past its worker's bound goes to the hash too.
    return bounds.within(owner, totals)


@dataclass(frozen=True)
class _Bounds:
    """The most heat each worker may be pinned by one head: HASH_BALANCE_FACTOR % of its
    share of the version's heat, by endpoint weight (what the edge's bounded-load hash
    lets it take: Envoy sizes each host's slots by its normalized weight), and never
    more than an even split's.

    Not past an even split's, whatever the weights: they move at every heartbeat, and a
    head that fitted one worker only while its peer's weight was down moved whole at
    every swing (to b when a slowed, back when b did), a cache miss each time and all of
    it on one worker, where the hash keeps each worker's bounded share of it.
    Heat counts requests, the bound active ones: alike while requests take alike.
    """

    heat: dict[str, float]  # address -> heat

    @classmethod
    def of(cls, live: Sequence[Holder], totals: Mapping[str, float]) -> _Bounds:
        limit = sum(totals.values()) * HASH_BALANCE_FACTOR / 100
        weights = sum(h.weight for h in live)
        even = limit / len(live)
        return cls({h.address: min(even, limit * h.weight / weights) for h in live})

    def fits_somewhere(self, heat: float) -> bool:
        """Whether a head of `heat` pinned whole to some worker keeps it within its bound."""
        return heat <= max(self.heat.values())

    def within(self, owner: Mapping[str, str], totals: Mapping[str, float]) -> dict[str, str]:
        """Returns the pins of `owner` whose heat, summed per worker, stays within each
        worker's bound: the hottest first, a head that would take its worker past it
        is left to the hash (a pinned request skips the bound, so the bound holds for
        what a worker is pinned in all: a hot head checked alone kept the smaller
        heads a full cache held beside it, 0.83 of the heat on a worker bound at 0.75)."""
        pinned: dict[str, float] = dict.fromkeys(self.heat, 0.0)
        kept: dict[str, str] = {}
        for head in sorted(owner, key=lambda head: (-totals[head], head)):
            address = owner[head]
            if pinned[address] + totals[head] <= self.heat[address]:
                pinned[address] += totals[head]
                kept[head] = address
        return kept


@dataclass
class _Caches:
    """The prompt tokens each worker's pinned heads take against its prefix cache's size."""

    capacity: dict[str, int]  # address -> tokens (0: no cache, no bound)
    size: dict[str, int]  # head -> tokens (0: unknown)
    held: dict[str, int]  # address -> tokens of the heads pinned to it

    @classmethod
    def of(cls, live: Sequence[Holder], owner: Mapping[str, str]) -> _Caches:
        """The caches of `live` with the heads `owner` pins to them (`move` keeps it so).

        A head too big for FIT_SHARE of the largest cache counts as unknown (0): no
        cache can hold it, so where it goes changes no hit; counted, it marked its
        worker as overflowing for good, which let the balance move heads into the
        other cache and back at every build.
        """
        largest = max(h.cache_tokens for h in live)
        size = {}
        for head in owner:
            tokens = max(h.head_tokens.get(head, 0) for h in live)
            size[head] = tokens if tokens <= FIT_SHARE * largest else 0
        held = dict.fromkeys((h.address for h in live), 0)
        for head, address in owner.items():
            held[address] += size[head]
        return cls({h.address: h.cache_tokens for h in live}, size, held)

    def over(self, address: str) -> int:
        """Tokens pinned to `address` beyond its cache (0: they fit, or it has none)."""
        capacity = self.capacity[address]
        return max(0, self.held[address] - capacity) if capacity else 0

    def has_room(self, address: str, head: str) -> bool:
        """Whether `address` has a cache that holds `head` beside its pinned heads, within
        FIT_SHARE of it."""
        capacity = self.capacity[address]
        return capacity > 0 and self.held[address] + self.size[head] <= FIT_SHARE * capacity

    def would_overflow(self, address: str, head: str) -> bool:
        """Whether `head` would take the cache of `address` past FIT_SHARE of it (a head of
        unknown size takes none of it)."""
        capacity, size = self.capacity[address], self.size[head]
        return capacity > 0 and size > 0 and self.held[address] + size > FIT_SHARE * capacity

    def move(self, head: str, source: str, target: str) -> None:
        self.held[source] -= self.size[head]
        self.held[target] += self.size[head]


def _fit(
    live: Sequence[Holder], owner: dict[str, str], totals: Mapping[str, float], caches: _Caches
) -> None:
    """While a worker is pinned more prompt tokens than its prefix cache holds, moves one of
    its heads to a worker with room (of those moves, the one that leaves the two workers'
    shares most even), pinned before or not; the most overflowing worker first, and the
    next one when none of its heads fits anywhere."""
    weight, load = _loads(live, owner, totals)
    for _ in range(len(owner)):
        move = _fitting_move(owner, caches, weight, load, totals)
        if move is None:
            return
        head, full, target = move
        _move(head, full, target, owner, load, totals[head], caches)


def _fitting_move(
    owner: Mapping[str, str],
    caches: _Caches,
    weight: Mapping[str, float],
    load: Mapping[str, float],
    totals: Mapping[str, float],
) -> tuple[str, str, str] | None:
    """The (head, from, to) of `_fit`'s next move, None when no overflowing worker has a
    head that fits elsewhere. A head only moves into room (FIT_SHARE of a cache), so it
    never moves back."""
    for full in sorted((a for a in weight if caches.over(a)), key=lambda a: (-caches.over(a), a)):
        moves = [
            (_larger_share_after(totals[h], full, t, load, weight), h, t)
            for h, a in sorted(owner.items())
            if a == full and caches.size[h]
            for t in sorted(weight)
            if t != full and caches.has_room(t, h)
        ]
        if moves:
            _, head, target = min(moves)
            return head, full, target
    return None


def _loads(
    live: Sequence[Holder], owner: Mapping[str, str], totals: Mapping[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """Each worker's endpoint weight and the heat of the heads `owner` pins to it."""
    weight = {h.address: float(h.weight) for h in live}
    load = dict.fromkeys(weight, 0.0)
    for head, address in owner.items():
        load[address] += totals[head]
    return weight, load


def _warmest(live: Sequence[Holder], head: str) -> Holder:
    """The worker the head's requests go to now: of those that saw one within
    CURRENT_S of the latest, the one that served it most (ties: the first address)."""
    seen = [h for h in live if head in h.heat]
    latest = min(h.heat[head][1] for h in seen)
    current = [h for h in seen if h.heat[head][1] <= latest + CURRENT_S]
    return min(current, key=lambda h: (-h.heat[head][0], h.address))


def _balance(
    live: Sequence[Holder],
    owner: dict[str, str],
    totals: Mapping[str, float],
    kept: set[str],
    caches: _Caches,
) -> None:
    """Moves heads from the busiest worker to the idlest while the busiest one's share is
    over MOVE_GAIN times the even share and a move lowers it; a head in `kept` (pinned
    by the last assignment) only while the two shares differ beyond noise, and no head
    into a prefix cache it would overflow unless its own worker's overflows already (when
    the caches cannot hold every head, moving one only moves the misses)."""
    weight, load = _loads(live, owner, totals)
    even = sum(load.values()) / sum(weight.values())

    def share(address: str) -> float:
        return load[address] / weight[address]

    for _ in range(len(owner)):
        busiest = max(weight, key=lambda a: (share(a), a))
        if share(busiest) <= even * MOVE_GAIN:
            return
        idlest = min(weight, key=lambda a: (share(a), a))
        # Decayed counts vary about as much as half their value: a share's variance
        # is its load / 2 over the weight squared.
        noise = math.sqrt(
            load[busiest] / (2 * weight[busiest] ** 2) + load[idlest] / (2 * weight[idlest] ** 2)
        )
        beyond_noise = share(busiest) - share(idlest) > NOISE_SIGMAS * noise
        movable = sorted(
            h
            for h, a in owner.items()
            if a == busiest
            and (beyond_noise or h not in kept)
            and (caches.over(busiest) or not caches.would_overflow(idlest, h))
        )
        move = _best_move(busiest, idlest, movable, totals, load, weight)
        if move is None:
            return
        _move(move, busiest, idlest, owner, load, totals[move], caches)


def _larger_share_after(
    heat: float,
    source: str,
    target: str,
    load: Mapping[str, float],
    weight: Mapping[str, float],
) -> float:
    """The larger of two workers' shares once a head of `heat` moves from `source` to
    `target` (what both the fit and the balance minimise)."""
    return max((load[source] - heat) / weight[source], (load[target] + heat) / weight[target])


def _move(
    head: str,
    source: str,
    target: str,
    owner: dict[str, str],
    load: dict[str, float],
    heat: float,
    caches: _Caches,
) -> None:
    """Pins `head` (of `heat`) to `target` instead of `source`, and counts it there."""
    owner[head] = target
    load[source] -= heat
    load[target] += heat
    caches.move(head, source, target)


def _best_move(
    busiest: str,
    idlest: str,
    movable: Sequence[str],
    totals: Mapping[str, float],
    load: Mapping[str, float],
    weight: Mapping[str, float],
) -> str | None:
    """The head of `movable` (on `busiest`) whose move to `idlest` lowers the larger of
    their shares most (None: no move lowers it)."""
    best: tuple[float, str] | None = None
    for head in movable:
        after = _larger_share_after(totals[head], busiest, idlest, load, weight)
        if after < load[busiest] / weight[busiest] and (best is None or after < best[0]):
            best = (after, head)
    return None if best is None else best[1]
