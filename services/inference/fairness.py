"""Fair sharing of a model version's slots between tenants (virtual token counters).

Within a priority class, the scheduler admits next the waiting request whose
tenant has received the least service so far, instead of the oldest one
(FIFO). Service is counted in virtual tokens, as in VTC ("Fairness in
Serving Large Language Models", Sheng et al., OSDI 2024):

- a prompt token costs PROMPT_TOKEN_COST (0.5: prefill computes a whole
  prompt in one step, far cheaper per token than decode), charged when the
  request is admitted into the batch;
- an output token costs OUTPUT_TOKEN_COST (1.0), charged as it is sampled;
- both are divided by the request's weight (its tenant's, else its key's
  tier's; 1 by default), so a tenant of weight 2 gets twice the tokens of a
  tenant of weight 1 while both are backlogged.

A tenant that becomes active (a request arrives while it has none waiting or
running) has its counter lifted to the smallest counter of the active
tenants (or, when none is active, to the counter of the tenant that went
idle last): idling banks no credit, and a newcomer does not start at zero
against tenants that have been served for hours. Ties go to the tenant with
fewer running sequences, then to the oldest request, so a light tenant's
single request goes before a heavy tenant's queued ones even when its
counter was just lifted to the heavy tenant's.

Priority classes stay strict: a batch-priority request is admitted only when
no interactive one waits, whatever the counters. In "fifo" mode the order is
the arrival order within a class (what the scheduler did before), and the
counters are still kept for the per-tenant metrics.

Everything here belongs to the scheduler's engine thread (no locking).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from prometheus_client import Counter, Gauge

FAIRNESS_MODES = ("tenant", "fifo")
PROMPT_TOKEN_COST = 0.5
OUTPUT_TOKEN_COST = 1.0
MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000.0
# Idle tenants' counters are kept (a tenant that was served more than the others
# keeps that debt across a pause) up to this many tenants per priority class;
# beyond it the longest-idle are forgotten (they come back level with the least
# served active tenant).
MAX_IDLE_TENANTS = 4096
# Metric labels no tenant id can be (ids start with a letter or digit), as the
# usage meter's tenant metrics have them.
OTHER_TENANT = "_other"  # tenants beyond the labelled ones
NO_TENANT = "_none"  # requests without a tenant (direct calls)

_LABELS = ("model", "version", "tenant")
TENANT_QUEUE_DEPTH = Gauge(
    "tokenmesh_tenant_queue_depth",
    "Requests waiting for a slot, by tenant (the deepest N tenants; the rest as _other).",
    _LABELS,
)
TENANT_SERVICE_TOKENS = Counter(
    "tokenmesh_tenant_service_tokens_total",
    "Tokens served by kind (prompt, completion), by tenant (the first N seen; then _other).",
    (*_LABELS, "kind"),
)


def parse_weights(entries: tuple[str, ...]) -> dict[str, float]:
    """Returns NAME=WEIGHT entries as a mapping; raises ValueError naming a bad one."""
    weights: dict[str, float] = {}
    for entry in entries:
        name, _, raw = entry.partition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = 0.0
        if not name.strip() or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValueError(
                f"{entry!r} is not NAME=WEIGHT with a weight of {MIN_WEIGHT:g}-{MAX_WEIGHT:g}"
            )
        weights[name.strip()] = weight
    return weights


@dataclass(frozen=True)
class FairnessPolicy:
    """FairnessPolicy says how a scheduler orders waiting requests of one priority class.

    Attributes:
        mode: "tenant" (virtual token counters) or "fifo" (arrival order).
        tenant_weights: weight by tenant id (wins over the tier's).
        tier_weights: weight by key tier (x-tokenmesh-tier: "standard", "premium", ...).
        metric_tenants: tenants that get a metric label of their own (the rest: "_other").
    """

    mode: str = "tenant"
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    tier_weights: Mapping[str, float] = field(default_factory=dict)
    metric_tenants: int = 16

    @property
    def fair(self) -> bool:
        """Tells whether waiting requests are ordered by their tenants' counters."""
        return self.mode == "tenant"

    def weight(self, tenant: str, tier: str) -> float:
        """Returns a request's weight: its tenant's, else its tier's, else 1."""
        return self.tenant_weights.get(tenant) or self.tier_weights.get(tier) or 1.0


class Queued(Protocol):
    """Queued is what waits in a FairQueue: anything with an arrival-ordered id."""

    @property
    def id(self) -> int: ...


T = TypeVar("T", bound=Queued)


@dataclass(eq=False)
class TenantAccount(Generic[T]):
    """TenantAccount is one tenant's service and requests in one priority class."""

    tenant: str
    served: float = 0.0  # the virtual token counter
    running: int = 0
    waiting: deque[T] = field(default_factory=deque)
    prompt_tokens: int = 0  # unweighted, for the metrics
    output_tokens: int = 0
    published: tuple[int, int] = (0, 0)  # (prompt, output) tokens the metrics counted

    @property
    def active(self) -> bool:
        """Tells whether the tenant has requests waiting or running."""
        return self.running > 0 or bool(self.waiting)

    def charge_prompt(self, tokens: int, weight: float) -> None:
        """Counts a request's prompt at admission."""
        self.served += tokens * PROMPT_TOKEN_COST / weight
        self.prompt_tokens += tokens

    def charge_output(self, weight: float) -> None:
        """Counts one sampled token (engine thread, once per token: kept cheap)."""
        self.served += OUTPUT_TOKEN_COST / weight
        self.output_tokens += 1


class FairQueue(Generic[T]):
    """FairQueue holds one priority class's waiting requests, per tenant.

    Args:
        fair: order by tenant counters (else by arrival).
    """

    def __init__(self, fair: bool) -> None:
        self.fair = fair
        self._accounts: dict[str, TenantAccount[T]] = {}  # idle ones last-idle last
        self._backlogged: dict[str, TenantAccount[T]] = {}  # tenants with requests waiting
        self._active: dict[str, TenantAccount[T]] = {}
        self._last_idle_served = 0.0
        self._size = 0
        self._idled: list[TenantAccount[T]] = []  # went idle since `changed_accounts`

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for account in self._backlogged.values():
            yield from account.waiting

    def accounts(self) -> list[TenantAccount[T]]:
        """Returns every tracked tenant's account (active and idle)."""
        return list(self._accounts.values())

    def changed_accounts(self) -> list[TenantAccount[T]]:
        """Returns the accounts that may have changed since the last call: the active
        ones and those that went idle since."""
        idled, self._idled = self._idled, []
        return [*self._active.values(), *(a for a in idled if not a.active)]

    def push(self, item: T, tenant: str) -> TenantAccount[T]:
        """Queues `item` for `tenant` and returns the tenant's account."""
        account = self._accounts.get(tenant)
        if account is None:
            account = self._accounts[tenant] = TenantAccount(tenant)
        if not account.active:
            self._activate(account)
        account.waiting.append(item)
        self._backlogged[tenant] = account
        self._size += 1
        return account

    def peek(self) -> T | None:
        """Returns the request to admit next (None when nothing waits)."""
        account = self._next_account()
        return None if account is None else account.waiting[0]

    def pop(self) -> T:
        """Takes the request `peek` returned; it now counts as running for its tenant."""
        account = self._next_account()
        if account is None:
            raise IndexError("pop from an empty FairQueue")
        item = account.waiting.popleft()
        if not account.waiting:
            del self._backlogged[account.tenant]
        account.running += 1
        self._size -= 1
        return item

    def _next_account(self) -> TenantAccount[T] | None:
        if not self._backlogged:
            return None
        if self.fair:
            return min(
                self._backlogged.values(), key=lambda a: (a.served, a.running, a.waiting[0].id)
            )
        return min(self._backlogged.values(), key=lambda a: a.waiting[0].id)

    def finished(self, account: TenantAccount[T]) -> None:
        """Counts the end of one of the tenant's running requests."""
        account.running -= 1
        self._maybe_idle(account)

    def remove_where(self, predicate: Callable[[T], bool]) -> list[T]:
        """Removes and returns the waiting requests `predicate` selects.

        The predicate is asked once per request: it may read state another thread
        changes (a client's cancel flag, set on the event loop while the engine
        thread reaps). Asked twice, a request cancelled between the two was both
        kept and removed: finished and still waiting, the size one too low, and
        once the queue drained every admission failed (a size of -1).
        """
        removed: list[T] = []
        for account in list(self._backlogged.values()):
            kept: deque[T] = deque()
            taken: list[T] = []
            for item in account.waiting:
                (taken if predicate(item) else kept).append(item)
            if not taken:
                continue
            removed += taken
            account.waiting = kept
            if not kept:
                del self._backlogged[account.tenant]
                self._maybe_idle(account)
        self._size -= len(removed)
        return removed

    def _activate(self, account: TenantAccount[T]) -> None:
        """Lifts a tenant that was idle to the least served active one: no banked credit."""
        floor = min((a.served for a in self._active.values()), default=self._last_idle_served)
        account.served = max(account.served, floor)
        self._active[account.tenant] = account

    def _maybe_idle(self, account: TenantAccount[T]) -> None:
        if account.active:
            return
        self._active.pop(account.tenant, None)
        self._last_idle_served = account.served
        self._idled.append(account)
        # Last-idle last: the oldest idle accounts are at the front to forget.
        self._accounts[account.tenant] = self._accounts.pop(account.tenant)
        idle = len(self._accounts) - len(self._active)
        while idle > MAX_IDLE_TENANTS:
            oldest = next(t for t, a in self._accounts.items() if not a.active)
            del self._accounts[oldest]
            idle -= 1


class WaitingRequests(Generic[T]):
    """WaitingRequests are a scheduler's waiting requests: one FairQueue per priority class.

    A lower priority number is admitted first, always.
    """

    def __init__(self, policy: FairnessPolicy) -> None:
        self.policy = policy
        self._classes: dict[int, FairQueue[T]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def __iter__(self) -> Iterator[T]:
        for priority in sorted(self._classes):
            yield from self._classes[priority]

    def push(self, item: T, priority: int, tenant: str) -> TenantAccount[T]:
        """Queues `item`; returns the account its service is charged to."""
        queue = self._classes.get(priority)
        if queue is None:
            queue = self._classes[priority] = FairQueue(self.policy.fair)
            self._classes = dict(sorted(self._classes.items()))
        return queue.push(item, tenant)

    def peek(self) -> T | None:
        """Returns the request to admit next: the first class's choice."""
        for queue in self._classes.values():
            if len(queue):
                return queue.peek()
        return None

    def pop(self) -> T:
        """Takes the request `peek` returned (it now counts as running for its tenant)."""
        for queue in self._classes.values():
            if len(queue):
                return queue.pop()
        raise IndexError("pop from empty WaitingRequests")

    def finished(self, priority: int, account: TenantAccount[T]) -> None:
        """Counts the end of a running request that `push` queued at `priority`."""
        self._classes[priority].finished(account)

    def remove_where(self, predicate: Callable[[T], bool]) -> list[T]:
        """Removes and returns the waiting requests `predicate` selects."""
        return [item for q in self._classes.values() for item in q.remove_where(predicate)]

    def accounts(self) -> list[TenantAccount[T]]:
        """Returns every class's tracked accounts."""
        return [a for q in self._classes.values() for a in q.accounts()]

    def changed_accounts(self) -> list[TenantAccount[T]]:
        """Returns every class's accounts changed since the last call (for the metrics)."""
        return [a for q in self._classes.values() for a in q.changed_accounts()]


class TenantMetrics:
    """TenantMetrics publish per-tenant queue depth and service with a bounded label set.

    Queue depth: the `limit` tenants with the most requests waiting right now get
    a label each, the rest are summed as "_other" (labels that drop out are removed).
    Service tokens: counters cannot move between labels, so the first `limit`
    tenants this worker serves keep a label of their own until it restarts, and
    later ones count as "_other". Either way, at most limit + 1 tenant labels per
    model version.
    """

    def __init__(self, labels: tuple[str, str], limit: int) -> None:
        self.labels = labels
        self.limit = limit
        self._depth_labels: set[str] = set()
        self._service_labels: set[str] = set()

    def publish(self, changed: list[TenantAccount[T]]) -> None:
        """Sets the gauges and advances the counters from the accounts that changed
        (every account with requests waiting must be among them)."""
        self._publish_depth(changed)
        for account in changed:
            self._publish_service(account)

    def _publish_depth(self, accounts: list[TenantAccount[T]]) -> None:
        depths: dict[str, int] = {}
        for account in accounts:
            if account.waiting:
                name = account.tenant or NO_TENANT
                depths[name] = depths.get(name, 0) + len(account.waiting)
        deepest = sorted(depths, key=lambda t: (-depths[t], t))
        shown = {t: depths[t] for t in deepest[: self.limit]}
        shown[OTHER_TENANT] = shown.get(OTHER_TENANT, 0) + sum(
            depths[t] for t in deepest[self.limit :]
        )
        for gone in self._depth_labels - set(shown):
            TENANT_QUEUE_DEPTH.remove(*self.labels, gone)
        for tenant, depth in shown.items():
            TENANT_QUEUE_DEPTH.labels(*self.labels, tenant).set(depth)
        self._depth_labels = set(shown)

    def _service_label(self, tenant: str) -> str:
        name = tenant or NO_TENANT
        if name in self._service_labels or name == OTHER_TENANT:
            return name
        if len(self._service_labels) < self.limit:
            self._service_labels.add(name)
            return name
        return OTHER_TENANT

    def _publish_service(self, account: TenantAccount[T]) -> None:
        prompt, output = account.published
        if account.prompt_tokens == prompt and account.output_tokens == output:
            return
        label = self._service_label(account.tenant)
        if account.prompt_tokens > prompt:
            TENANT_SERVICE_TOKENS.labels(*self.labels, label, "prompt").inc(
                account.prompt_tokens - prompt
            )
        if account.output_tokens > output:
            TENANT_SERVICE_TOKENS.labels(*self.labels, label, "completion").inc(
                account.output_tokens - output
            )
        account.published = (account.prompt_tokens, account.output_tokens)
