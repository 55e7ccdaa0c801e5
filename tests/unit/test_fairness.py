"""Fair sharing between tenants: the waiting-request order, deterministically.

The queue tests drive services.inference.fairness by hand (admit, charge,
finish), so each admission's choice is exact; the scheduler tests queue every
request before the engine thread starts, so the order of admission does not
depend on timing either.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from services.core.settings import SettingsError, load
from services.inference.engines.deterministic import DeterministicTestEngine
from services.inference.fairness import (
    MAX_IDLE_TENANTS,
    FairnessPolicy,
    FairQueue,
    TenantAccount,
    TenantMetrics,
    WaitingRequests,
    parse_weights,
)
from services.inference.sampling import SamplingParams
from services.inference.scheduler import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    Finished,
    Scheduler,
    SchedulerLimits,
)
from services.inference.service import InferenceSettings

PROMPT, OUTPUT = 10, 20  # tokens of every simulated request


@dataclass
class Item:
    id: int
    tenant: str
    weight: float = 1.0


class Workload:
    """A FairQueue and the requests it admits, with service charged by hand."""

    def __init__(self, fair: bool = True, weights: dict[str, float] | None = None) -> None:
        self.queue: FairQueue[Item] = FairQueue(fair)
        self.weights = weights or {}
        self.ids = iter(range(1_000_000))
        self.accounts: dict[str, TenantAccount[Item]] = {}

    def submit(self, tenant: str, count: int = 1) -> None:
        for _ in range(count):
            item = Item(next(self.ids), tenant, self.weights.get(tenant, 1.0))
            self.accounts[tenant] = self.queue.push(item, tenant)

    def admit(self) -> Item:
        """Admits the next request and charges its prompt (it keeps running)."""
        item = self.queue.pop()
        self.accounts[item.tenant].charge_prompt(PROMPT, item.weight)
        return item

    def serve(self, item: Item, tokens: int = OUTPUT) -> None:
        for _ in range(tokens):
            self.accounts[item.tenant].charge_output(item.weight)

    def finish(self, item: Item) -> None:
        self.queue.finished(self.accounts[item.tenant])

    def run_to_completion(self) -> Item:
        """Admits the next request, serves all of it and finishes it."""
        item = self.admit()
        self.serve(item)
        self.finish(item)
        return item


def test_a_light_tenant_goes_before_a_heavy_tenants_backlog():
    work = Workload()
    work.submit("heavy", 108)
    running = [work.admit() for _ in range(8)]  # every slot taken by heavy
    for item in running:
        work.serve(item, 5)
    work.submit("light")
    assert len(work.queue) == 101
    assert work.queue.peek() is not None and work.queue.peek().tenant == "light"
    assert work.admit().tenant == "light"


def test_a_newcomer_lifted_to_the_heavy_counter_still_goes_first():
    """A tie on counters goes to the tenant with fewer running requests."""
    work = Workload()
    work.submit("heavy", 20)
    work.admit()  # heavy charged its prompt, nothing generated yet
    work.submit("light")
    assert work.accounts["light"].served == work.accounts["heavy"].served
    assert work.admit().tenant == "light"


def test_fifo_mode_admits_in_arrival_order_whatever_the_tenants():
    work = Workload(fair=False)
    work.submit("heavy", 5)
    work.submit("light")
    work.submit("heavy", 2)
    order = [work.run_to_completion().id for _ in range(8)]
    assert order == list(range(8))


def test_fair_mode_alternates_between_equally_loaded_tenants():
    work = Workload()
    work.submit("a", 10)
    work.submit("b", 10)
    order = [work.run_to_completion().tenant for _ in range(20)]
    assert order == ["a", "b"] * 10


@pytest.mark.parametrize(("weight_a", "weight_b"), [(2.0, 1.0), (3.0, 1.0), (1.0, 4.0)])
def test_weights_share_admissions_proportionally(weight_a, weight_b):
    work = Workload(weights={"a": weight_a, "b": weight_b})
    work.submit("a", 500)
    work.submit("b", 500)
    admissions = 300
    served = Counter(work.run_to_completion().tenant for _ in range(admissions))
    share_a = weight_a / (weight_a + weight_b)
    assert abs(served["a"] - admissions * share_a) <= 2
    assert served["a"] + served["b"] == admissions


def test_an_idle_tenant_banks_no_credit():
    work = Workload()
    work.submit("a", 1)
    work.submit("b", 1)
    work.run_to_completion()
    work.run_to_completion()  # both were served once; b is idle from here on
    work.submit("a", 60)
    for _ in range(50):  # a alone is served 50 more requests while b idles
        work.run_to_completion()
    work.submit("b", 20)
    assert work.accounts["b"].served == work.accounts["a"].served  # lifted on return
    order = [work.run_to_completion().tenant for _ in range(20)]
    # Without the lift b would take all 20 (its counter was 50 requests behind).
    assert Counter(order) == {"a": 10, "b": 10}


def test_a_tenant_arriving_when_nobody_is_active_starts_at_the_last_counter():
    work = Workload()
    work.submit("a", 30)
    for _ in range(30):
        work.run_to_completion()
    work.submit("b")  # nobody is active: b starts where a left off
    assert work.accounts["b"].served == work.accounts["a"].served > 0
    work.submit("a", 2)
    assert [work.run_to_completion().tenant for _ in range(3)] == ["b", "a", "a"]


def test_a_tenant_served_more_keeps_its_debt_across_a_pause():
    work = Workload()
    work.submit("b")
    long_running = work.admit()  # b stays active, barely served
    work.submit("a", 10)
    for _ in range(10):  # nothing else waits: a takes every free slot
        work.run_to_completion()
    debt = work.accounts["a"].served
    work.submit("a", 5)  # a comes back: max(its own, the least active) keeps its lead
    work.submit("b", 3)
    assert work.accounts["a"].served == debt > work.accounts["b"].served
    assert [work.run_to_completion().tenant for _ in range(3)] == ["b", "b", "b"]
    work.finish(long_running)


def test_removed_requests_leave_the_tenant_idle():
    work = Workload()
    work.submit("a", 3)
    removed = work.queue.remove_where(lambda item: item.tenant == "a")
    assert [i.id for i in removed] == [0, 1, 2] and len(work.queue) == 0
    assert not work.accounts["a"].active and work.queue.peek() is None


def test_idle_tenants_are_forgotten_beyond_the_bound():
    work = Workload()
    for n in range(MAX_IDLE_TENANTS + 10):
        work.submit(f"t{n}")
        work.run_to_completion()
    assert len(work.queue.accounts()) == MAX_IDLE_TENANTS
    assert {a.tenant for a in work.queue.accounts()} >= {f"t{MAX_IDLE_TENANTS + 9}"}


def test_interactive_goes_before_batch_whatever_the_counters():
    waiting: WaitingRequests[Item] = WaitingRequests(FairnessPolicy())
    heavy = [Item(n, "heavy") for n in range(3)]
    accounts = [waiting.push(item, PRIORITY_INTERACTIVE, "heavy") for item in heavy]
    accounts[0].served = 1e9  # heavy has had all the service there is
    waiting.push(Item(10, "light"), PRIORITY_BATCH, "light")
    order = [waiting.pop().tenant for _ in range(4)]
    assert order == ["heavy", "heavy", "heavy", "light"]
    assert waiting.peek() is None and len(waiting) == 0


def test_each_priority_class_shares_fairly_within_itself():
    waiting: WaitingRequests[Item] = WaitingRequests(FairnessPolicy())
    for n in range(4):
        waiting.push(Item(n, "heavy"), PRIORITY_BATCH, "heavy")
    waiting.push(Item(4, "light"), PRIORITY_BATCH, "light")
    waiting.push(Item(5, "job"), PRIORITY_INTERACTIVE, "job")
    assert [waiting.pop().tenant for _ in range(3)] == ["job", "heavy", "light"]


def test_weights_come_from_the_tenant_then_the_tier():
    policy = FairnessPolicy(tenant_weights={"acme": 3.0}, tier_weights={"premium": 2.0})
    assert policy.weight("acme", "premium") == 3.0
    assert policy.weight("globex", "premium") == 2.0
    assert policy.weight("globex", "standard") == 1.0
    assert parse_weights(("acme=2", " b=0.5 ")) == {"acme": 2.0, "b": 0.5}
    for bad in ("acme", "acme=0", "acme=-1", "=2", "acme=lots", "acme=1e9"):
        with pytest.raises(ValueError):
            parse_weights((bad,))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOKENMESH_SCHEDULER_FAIRNESS", "lottery"),
        ("TOKENMESH_SCHEDULER_TENANT_WEIGHTS", "acme=0"),
        ("TOKENMESH_SCHEDULER_TIER_WEIGHTS", "premium"),
        ("TOKENMESH_SCHEDULER_METRIC_TENANTS", "-1"),
    ],
)
def test_invalid_fairness_settings_name_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        load(InferenceSettings, {variable: value})


def test_fairness_settings_reach_the_scheduler_limits():
    settings = load(
        InferenceSettings,
        {
            "TOKENMESH_SCHEDULER_FAIRNESS": "fifo",
            "TOKENMESH_SCHEDULER_TENANT_WEIGHTS": "acme=2",
            "TOKENMESH_SCHEDULER_TIER_WEIGHTS": "premium=4,standard=1",
        },
    )
    policy = settings.limits().fairness
    assert not policy.fair and policy.tenant_weights == {"acme": 2.0}
    assert policy.tier_weights == {"premium": 4.0, "standard": 1.0}
    assert load(InferenceSettings, {}).limits().fairness.fair  # tenant is the default


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_tenant_metrics_keep_a_bounded_label_set():
    model = f"fair-{uuid.uuid4().hex[:8]}"
    metrics = TenantMetrics((model, "1"), limit=2)
    queue: FairQueue[Item] = FairQueue(True)
    for n, tenant in enumerate(["a", "a", "a", "b", "b", "c", "d"]):
        queue.push(Item(n, tenant), tenant)
    metrics.publish(queue.changed_accounts())
    depth = "tokenmesh_tenant_queue_depth"
    shown = {
        s.labels["tenant"]: s.value
        for metric in REGISTRY.collect()
        if metric.name == depth
        for s in metric.samples
        if s.labels.get("model") == model
    }
    assert shown == {"a": 3, "b": 2, "_other": 2}
    accounts = {account.tenant: account for account in queue.accounts()}
    for _ in range(7):
        account = accounts[queue.pop().tenant]
        account.charge_prompt(4, 1.0)
        account.charge_output(1.0)
        queue.finished(account)
    metrics.publish(queue.changed_accounts())
    service = "tokenmesh_tenant_service_tokens_total"
    labels = {"model": model, "version": "1"}
    completion = {
        s.labels["tenant"]: s.value
        for metric in REGISTRY.collect()
        if metric.name == "tokenmesh_tenant_service_tokens"
        for s in metric.samples
        if s.name == service and s.labels.get("model") == model and s.labels["kind"] == "completion"
    }
    assert len(completion) == 3 and "_other" in completion  # two tenants by name, the rest
    assert sum(completion.values()) == 7
    named = sorted(t for t in completion if t != "_other")
    tokens = {"a": 3, "b": 2, "c": 1, "d": 1}
    assert completion["_other"] == sum(n for t, n in tokens.items() if t not in named)
    assert _sample(depth, {**labels, "tenant": "a"}) is None  # nothing waits: label removed
    assert _sample(depth, {**labels, "tenant": "_other"}) == 0


# --- the scheduler: every request queued before the engine thread starts ---------


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=3, temperature=1.0, top_p=1.0, top_k=0, seed=1, stop=())


async def _admission_order(mode: str) -> list[str]:
    engine = DeterministicTestEngine(vocab_size=64, context_length=512, step_s=0.0)
    limits = SchedulerLimits(max_sequences=1, max_queue=64, fairness=FairnessPolicy(mode))
    sched = Scheduler(engine, -1, limits, (f"fair-{mode}", "1"))
    seqs = [
        sched.submit([1, 2, 3], _params(), PRIORITY_INTERACTIVE, None, tenant="heavy")
        for _ in range(10)
    ]
    seqs.append(sched.submit([1, 2, 3], _params(), PRIORITY_INTERACTIVE, None, tenant="light"))
    seqs.append(sched.submit([1, 2, 3], _params(), PRIORITY_BATCH, None, tenant="job"))
    await sched.start()
    try:
        for seq in seqs:
            while not isinstance(await seq.outbox.get(), Finished):
                pass
    finally:
        await sched.stop(drain_timeout_s=0)
    started = sorted(seqs, key=lambda s: s.started_at or 0.0)
    return [s.tenant for s in started]


async def test_the_scheduler_admits_the_light_tenant_second():
    order = await _admission_order("tenant")
    assert order[:3] == ["heavy", "light", "heavy"]
    assert order[-1] == "job"  # batch priority after every interactive request


async def test_the_fifo_scheduler_admits_in_arrival_order():
    order = await _admission_order("fifo")
    assert order == ["heavy"] * 10 + ["light", "job"]


def test_remove_where_asks_once_per_request_while_another_thread_cancels() -> None:
    """The predicate was asked twice per request (a pass for what stays, one for what
    goes), and it reads a cancel flag the event loop sets while the engine thread
    reaps: a request cancelled between the passes was both removed (finished) and
    still waiting, the size one too low; the next reap removed it again, the size
    went to -1, and every admission of the version failed from then on."""

    @dataclass(eq=False)
    class Waiting:
        id: int
        cancelled: bool = False

    queue: FairQueue[Waiting] = FairQueue(fair=True)
    first, second = Waiting(0, cancelled=True), Waiting(1)
    queue.push(first, "")
    queue.push(second, "")
    asked = {second.id: 0}

    def cancelled_as_asked(item: Waiting) -> bool:
        if item is second:
            asked[item.id] += 1
            if asked[item.id] == 1:
                second.cancelled = True  # the client's cancel lands after the first ask
                return False
        return item.cancelled

    removed = queue.remove_where(cancelled_as_asked)
    assert removed == [first]
    assert list(queue) == [second] and len(queue) == 1
    assert queue.remove_where(lambda item: item.cancelled) == [second]
    assert len(queue) == 0 and list(queue) == []
