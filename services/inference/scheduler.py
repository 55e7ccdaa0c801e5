"""Continuous (iteration-level) batching over a GenerativeEngine.

Each model version's scheduler runs in a thread of its own (the engine
thread): between steps, finished and cancelled sequences leave the batch
(freeing their KV slot) and waiting ones join it, highest priority first,
while both the slot count and the KV-token budget allow; then the engine
computes the step and samples, and the next step starts at once. The event
loop never waits for the engine and the engine never waits for the event
loop: requests reach the thread through a locked queue, tokens reach the
requests through one `call_soon_threadsafe` per step. (An asyncio task that
awaited each step in an executor lost ~1.1 ms per step to the event loop's
backlog before it could start the next one.) Joining prompts are prefilled
in a step of their own, so their first token does not wait for the running
batch's decode; the step after a prefill-only step decodes whenever a
sequence is decoding, so arriving prompts can delay a running stream by one
step at a time, never stall it.

Which waiting request joins next: interactive before batch, always; within a
priority class, the one whose tenant has received the least service
(services.inference.fairness), or the oldest in "fifo" mode.

Shadow copies (services.inference.shadow; submitted while `SHADOW_COPY` is set)
wait at batch priority and take no place of `max_queue` from live requests:
a live request's queue bound counts live requests only, so queued copies never
make one be refused QUEUE_FULL. A copy itself is refused when the queue,
copies included, is full. Live requests may then fill `max_queue` on top of
the copies waiting, which the worker's copy slots bound (every copy holds one:
TOKENMESH_SHADOW_MAX_COPIES per version).

Each sequence has an outbox the request handler reads: token ids as they are
sampled, then one `Finished`.

Unloading (`stop`) refuses new requests and, at once, the waiting ones
(UNAVAILABLE, MODEL_UNLOADING: nothing of them ran, so the edge may try them
on another worker and the pipeline bills nothing: `refused_unstarted`); the
running ones finish up to the drain timeout, then end MODEL_UNLOADED.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from services.core.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    TokenmeshError,
    Unavailable,
    internal_error,
)
from services.inference import metrics
from services.inference.engines.base import GenerativeEngine, StepItem
from services.inference.fairness import (
    OTHER_TENANT,
    TENANT_QUEUE_DEPTH,
    FairnessPolicy,
    TenantAccount,
    TenantMetrics,
    WaitingRequests,
)
from services.inference.logprobs import TokenLogprob, token_logprob
from services.inference.sampling import SamplingParams, sample_batch
from services.inference.step_health import StepHealth

logger = logging.getLogger(__name__)
PRIORITY_INTERACTIVE, PRIORITY_BATCH = 0, 1
#: The reason of a request refused because its version is unloading: nothing of it ran.
UNLOADING = "MODEL_UNLOADING"
# The engine thread's pause after a step that failed, doubled while they fail (at
# most 1 s): what a fault that stays costs, instead of a core and a log storm.
FAILED_STEP_BACKOFF_S = 0.01
#: Set in the task serving a shadow copy while it holds one of its version's copy
#: slots (services.inference.shadow.CopySlots.hold): the sequences it submits are
#: copies, which take no place of `max_queue` from live requests (see the module).
SHADOW_COPY: ContextVar[bool] = ContextVar("tokenmesh_shadow_copy", default=False)


def _is_batch(priority: int) -> int:
    """Returns a priority's index in metrics.PRIORITY_LABELS: 0 interactive, 1 batch."""
    return int(priority != PRIORITY_INTERACTIVE)


@dataclass(frozen=True)
class SchedulerLimits:
    """SchedulerLimits bound memory and waiting, and say who waits least.

    Attributes:
        max_sequences: KV slots, i.e. the largest running batch.
        max_kv_tokens: budget of prompt + max_tokens over running sequences.
        max_queue: requests that may wait beyond those the next admission
            starts (a free slot and room in the KV budget for their prompt +
            max_tokens); more are refused (0: none waits). A free slot the KV
            budget keeps unusable is no room to wait in. A live request's bound
            counts live requests only; a shadow copy's counts everyone.
        max_prefill_tokens: prompt tokens admitted per step (bounds the
            inter-token latency hit that new prompts impose on running streams).
            A longer prompt is admitted alone, as the only prefill of its step,
            at the first boundary where no other prompt awaits its prefill.
        messages_per_step: stream messages per step before token batching:
            with more running sequences, each one's tokens reach its stream
            every ceil(running / messages_per_step) steps (0 = every step).
            Each stream message costs the event loop tens of microseconds,
            which a CPU worker takes from the engine's cores; under load this
            bounds that cost. First and last tokens never wait.
        fairness: how waiting requests of one priority class are ordered
            (by tenant service, or first come first served).
    """

    max_sequences: int = 32
    max_kv_tokens: int = 32 * 512
    max_queue: int = 256
    max_prefill_tokens: int = 2048
    messages_per_step: int = 16
    fairness: FairnessPolicy = field(default_factory=FairnessPolicy)


@dataclass(eq=False)
class StartCapacity:
    """StartCapacity is what the next admission can start, as `submit` counts it.

    Shared by the event loop (submit) and the engine thread, under the
    scheduler's lock. After each admission the engine thread sets it from the
    truth: the free slots, the KV budget left, and the waiting requests the
    admission could not start (queued). A request submitted meanwhile that
    fits a free slot and the KV left is counted on them (it, or one it ranks
    below, starts at the next admission); one that does not is queued, and
    `max_queue` bounds the queued ones. A request that fits is never refused:
    the next admission takes the highest priority class and the least served
    tenant first, so a request may start ahead of others that wait. O(1) per
    request: `submit` runs on the event loop.

    A scheduler keeps two: one of live requests only (shadow copies are not
    counted in it: a live interactive request starts ahead of every copy, so
    copies are no room it waits for), which bounds live requests; and one of
    every request, which bounds copies. A live batch request and a copy rank
    by their tenants' service, so the live count may count a batch request as
    starting while a copy takes that slot: off by at most the copies waiting.

    Attributes:
        slots: free slots no counted request is to take.
        kv_tokens: KV budget neither running sequences nor counted requests reserve.
        queued: waiting requests that cannot start at the next admission.
        budget: the whole KV budget (`kv_tokens == budget`: nothing runs or is
            counted, and an empty batch admits one request whatever its size).
    """

    slots: int
    kv_tokens: int
    budget: int
    queued: int = 0

    def fits(self, reserved: int, may_start: bool = True) -> bool:
        """Tells whether a request reserving `reserved` KV tokens fits what is free
        (never when it may not start: a request of its class waits for KV ahead)."""
        free = reserved <= self.kv_tokens or self.kv_tokens == self.budget
        return may_start and self.slots > 0 and free

    def refuses(self, reserved: int, max_queue: int, may_start: bool = True) -> bool:
        """Tells whether `submit` refuses a request reserving `reserved` KV tokens: it
        does not fit, and `max_queue` requests are queued already."""
        return self.queued >= max_queue and not self.fits(reserved, may_start)

    def count(self, reserved: int, may_start: bool = True) -> bool:
        """Counts a waiting request: True when it fits (its slot and KV are now spoken
        for), False when it is queued."""
        if self.fits(reserved, may_start):
            self.slots -= 1
            self.kv_tokens -= reserved
            return True
        self.queued += 1
        return False


def _starting(capacity: StartCapacity, waiting: Iterable[Sequence_]) -> int:
    """Counts on `capacity` the waiting requests, in their order, up to the first that
    does not fit; returns how many fit (they start in the next steps)."""
    starting = 0
    for seq in waiting:
        if not capacity.count(seq.reserved_tokens):
            break
        starting += 1
    return starting


@dataclass
class Capacities:
    """Capacities are what the next admission starts, counted three ways for `submit`'s
    queue bounds (see StartCapacity):

    - live: live requests (shadow copies not counted): a batch request's bound;
    - every: every request: a shadow copy's bound;
    - interactive: interactive requests: an interactive request's bound. Batch
      requests wait behind every interactive one, so they take no place of
      `max_queue` from it: bound by every live request, `max_queue` batch requests
      waiting refused an interactive one that would start ahead of all of them.
    """

    live: StartCapacity
    every: StartCapacity
    interactive: StartCapacity

    def copied(self) -> Capacities:
        """Returns copies of the counts (a what-if: `has_room`)."""
        return Capacities(*(dataclasses.replace(c) for c in self.all()))

    def all(self) -> tuple[StartCapacity, StartCapacity, StartCapacity]:
        """Returns the three counts."""
        return self.live, self.every, self.interactive

    def take(
        self, reserved: int, copy: bool, interactive: bool, max_queue: int, may_start: bool
    ) -> bool:
        """Counts a submitted request in the counts it belongs to; False (nothing
        counted) when its queue bound refuses it. `may_start`: False while a request
        of its class waits for KV ahead (Scheduler._may_start)."""
        bound = self.every if copy else self.interactive if interactive else self.live
        if bound.refuses(reserved, max_queue, may_start):
            return False
        self.count(reserved, copy, interactive, may_start)
        return True

    def count(self, reserved: int, copy: bool, interactive: bool, may_start: bool) -> None:
        """Counts a request in the counts it belongs to, whatever its bound."""
        self.every.count(reserved, may_start)
        if not copy:
            self.live.count(reserved, may_start)
            if interactive:
                self.interactive.count(reserved, may_start)


@dataclass(frozen=True)
class Finished:
    """Finished ends a sequence's outbox."""

    reason: str  # "stop", "length", "cancelled" or "error"
    error: TokenmeshError | None = None


class Outbox:
    """Outbox is a sequence's tokens and final `Finished` on their way to its one reader.

    The engine thread's step reaches the event loop in one callback, which puts
    each sequence's items here; the stream takes everything waiting at once.
    (An asyncio.Queue, pure Python, cost every stream message a few
    microseconds in its get/put/wake-up bookkeeping.)
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[int | Finished] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: int | Finished) -> None:
        """Adds an item; wakes the reader if it waits (event loop)."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        """Tells whether no item waits."""
        return not self._items

    async def take(self) -> list[int | Finished]:
        """Returns every waiting item, oldest first, waiting for one if there is none."""
        await self._arrival()
        items, self._items = self._items, []
        return items

    async def get(self) -> int | Finished:
        """Returns the oldest item, waiting for one if there is none."""
        await self._arrival()
        return self._items.pop(0)

    async def _arrival(self) -> None:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None


def _unloaded() -> Unavailable:
    """The error of a sequence that ran when its version's unload ended it. No
    RetryInfo (MODEL_UNLOADING's and WORKER_STOPPING's carry one): v1's recorded
    contract ends such a stream with ErrorInfo alone (tests/contract)."""
    return Unavailable("model version unloaded", reason="MODEL_UNLOADED")


def _unloading() -> Unavailable:
    """The refusal of a request its version's unload stops before it ran: submitted
    after the unload began, or still waiting for a slot. Nothing of it ran, so the
    edge tries it again on another worker (a trailers-only UNAVAILABLE) and the
    pipeline bills nothing (`refused_unstarted`)."""
    return Unavailable("model version is unloading", retry_after_s=1.0, reason=UNLOADING)


def refused_by_unload(seqs: Iterable[Sequence_]) -> bool:
    """Tells whether one of a request's sequences was refused by its version's unload
    (it waited for a slot, or was submitted as the unload began: it never started).

    The request then fails with that refusal (UNAVAILABLE, MODEL_UNLOADING), which
    its caller, or the edge, tries again on another worker. A sibling may have
    started before it (one of n choices had a slot): the pipeline bills such a
    request nothing unless it had sent its caller a message (pipeline.record).
    """
    return any(
        seq.finished is not None
        and seq.finished.error is not None
        and seq.finished.error.reason == UNLOADING
        for seq in seqs
    )


def refused_unstarted(seqs: Iterable[Sequence_]) -> bool:
    """Tells whether a request's sequences were refused before any of them started:
    one ended with the unload's refusal and none was ever admitted into a batch.

    Such a request is billed nothing, as one its submit refused. Exact once the
    refusal reached its reader (event loop): the engine thread refuses every
    waiting sequence at once, and admits none once the unload began (`_admit`
    checks it under the lock `stop` flips it under), so a sibling that started
    did so before the unload began.
    """
    seqs = list(seqs)
    return refused_by_unload(seqs) and all(seq.started_at is None for seq in seqs)


def kv_reservation(prompt_ids: Sequence[int], params: SamplingParams) -> int:
    """Returns the KV tokens a sequence of this prompt may need: prompt + max_tokens
    (what admission and `submit`'s queue bound count)."""
    return len(prompt_ids) + params.max_tokens


@dataclass(eq=False)
class Sequence_:
    """Sequence_ is one request's generation state inside the scheduler."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    deadline: float | None
    rng: np.random.Generator
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)  # sampled, not yet in the outbox
    cancelled: bool = False
    finished: Finished | None = None
    outbox: Outbox = field(default_factory=Outbox)
    # Log-probabilities: None when not asked for, else how many alternatives per
    # token (0-20). `token_logprobs[i]` describes `generated[i]`, written by the
    # engine thread before the token reaches the outbox.
    top_logprobs: int | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prompt tokens the engine did not compute (prefix cache or a same-step
    # copy), set by the engine thread after the prefill step.
    cached_prompt_tokens: int = 0
    # Fair sharing: whose service this is, the request's weight (its tenant's or
    # tier's) and the account it is charged to (set once it reaches the queue).
    tenant: str = ""
    # The scope its prompt's KV is reused in (engines.base.StepItem.scope): its tenant,
    # or a private one (engines.prefix_cache.private_scope).
    cache_scope: str = ""
    weight: float = 1.0
    account: TenantAccount[Sequence_] | None = None
    # A shadow copy (SHADOW_COPY when submitted): not in the live queue bound.
    copy: bool = False

    @property
    def reserved_tokens(self) -> int:
        """Returns the KV tokens this sequence may need: prompt + max_tokens."""
        return kv_reservation(self.prompt_ids, self.params)

    def step_item(self) -> StepItem:
        """Returns what to feed next: the prompt first, then the last token.

        Its scope is its cache scope (the tenant): the engine reuses a prompt's KV
        only within it (another tenant's hit would show in this one's
        cached_prompt_tokens)."""
        if not self.generated:
            return StepItem(self.slot, self.prompt_ids, 0, self.cache_scope)
        return StepItem(
            self.slot,
            self.generated[-1:],
            len(self.prompt_ids) + len(self.generated) - 1,
            self.cache_scope,
        )


class Scheduler:
    """Scheduler batches the sequences of one model version.

    Args:
        engine: the model version's engine.
        eos_token_id: the token that ends a sequence with "stop".
        limits: memory and queue bounds.
        labels: (model, version) for metrics.
    """

    IDLE_WAIT_S = 0.1  # an idle engine thread re-checks (deadlines of waiting requests)
    STOP_JOIN_S = 10.0  # how long stop waits for the engine thread's last step
    TENANT_METRICS_EVERY_S = 0.25  # per-tenant metrics walk the tenants: not every step

    def __init__(
        self,
        engine: GenerativeEngine,
        eos_token_id: int,
        limits: SchedulerLimits,
        labels: tuple[str, str],
    ) -> None:
        self.engine = engine
        self.eos_token_id = eos_token_id
        self.limits = limits
        self.labels = labels
        # Shared with the event loop (submit): guarded by _lock. The rest of
        # the scheduling state, the waiting requests included, belongs to the
        # engine thread, which moves the inbox into them before each admission.
        self._lock = threading.Lock()
        self._inbox: list[Sequence_] = []
        self._waiting_count = 0  # in the inbox or waiting
        self._waiting_batch = 0  # of them, batch priority (the queue-depth gauge's label)
        self._waiting: WaitingRequests[Sequence_] = WaitingRequests(limits.fairness)
        self._running: list[Sequence_] = []
        self._free_slots = list(range(limits.max_sequences))  # a heap: lowest slot first
        self._reserved = 0
        self._waiting_copies = 0  # of them, shadow copies (not in the live queue bound)
        # What the next admission starts, for submit's queue bound (under _lock): of
        # live requests (copies not counted), and of every request (copies' bound).
        self._capacity = self._fresh_capacities()
        self._blocked_priority: int | None = None  # see _recount_capacity
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Outbox items of this step, handed to the event loop in one call.
        self._outgoing: list[tuple[Sequence_, int | Finished]] = []
        # The sequences whose outbox has not had its `Finished` yet (event loop only):
        # stop ends them itself when the engine thread is stuck in a step.
        self._open: set[Sequence_] = set()
        self._accepting = True
        # The last step prefilled new prompts only: the next one decodes.
        self._prefilled_last = False
        self.cancelled_total = 0
        # Bound metric children once: label lookups are not free per token. TTFT
        # and queue depth have one child per priority class (index: _is_batch).
        self._ttft = tuple(
            metrics.TIME_TO_FIRST_TOKEN.labels(*labels, p) for p in metrics.PRIORITY_LABELS
        )
        self._itl = metrics.INTER_TOKEN_LATENCY.labels(*labels)
        self._completion_tokens = metrics.TOKENS.labels(*labels, "completion")
        self._prompt_tokens = metrics.TOKENS.labels(*labels, "prompt")
        self._queue_depth = tuple(
            metrics.QUEUE_DEPTH.labels(*labels, p) for p in metrics.PRIORITY_LABELS
        )
        self._running_gauge = metrics.RUNNING.labels(*labels)
        self._slots_used = metrics.KV_SLOTS_USED.labels(*labels)
        self._kv_reserved = metrics.KV_TOKENS_RESERVED.labels(*labels)
        self._prefix_reused = metrics.PREFIX_CACHE_TOKENS.labels(*labels, "reused")
        self._prefix_computed = metrics.PREFIX_CACHE_TOKENS.labels(*labels, "computed")
        self._prefix_held = metrics.PREFIX_CACHE_HELD.labels(*labels)
        self._prefix_published = (0, 0)  # (reused, looked up) tokens already counted
        self._tenant_metrics = TenantMetrics(labels, limits.fairness.metric_tenants)
        self._tenant_metrics_due = 0.0
        # Whether its steps keep failing (engine thread), and who serves the version's
        # health when that changes (on the event loop; set by the worker).
        self._step_health = StepHealth()
        self.on_health: Callable[[bool], None] | None = None
        self._engine_failing = metrics.ENGINE_FAILING.labels(*labels)

    async def start(self) -> None:
        """Allocates the KV cache, warms the engine up and starts the engine thread."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.engine.allocate, self.limits.max_sequences)
        await asyncio.to_thread(self.engine.warm_up, self.limits.max_sequences)
        self._thread = threading.Thread(
            target=self._run, name=f"engine-{self.labels[0]}-{self.labels[1]}", daemon=True
        )
        self._thread.start()

    @property
    def engine_failing(self) -> bool:
        """Tells whether its steps keep failing: its version is out of service."""
        return self._step_health.failing

    def stop_admitting(self) -> None:
        """Refuses new work, and the waiting requests at the next step (UNAVAILABLE,
        MODEL_UNLOADING): `stop`'s first step, taken at once (no await before it)."""
        with self._lock:  # against an admission in progress (`_admit`)
            self._accepting = False
        self._wake.set()  # the engine thread refuses the waiting requests at once

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuses new work and the waiting requests, lets the running ones finish (up
        to the timeout), stops.

        A waiting request never started, so it is refused as a new one is
        (UNAVAILABLE, MODEL_UNLOADING: tried again on another worker, billed
        nothing), at once. It used to wait for a slot that a running request freed,
        then run until the timeout ended it (MODEL_UNLOADED), billed what it
        computed and not tried again. What still runs at the timeout ends
        MODEL_UNLOADED.
        """
        self.stop_admitting()
        deadline = time.monotonic() + drain_timeout_s
        while (self._running or self._waiting_count) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.STOP_JOIN_S)
            if self._thread.is_alive():
                # A step still runs (a hung engine call): its thread owns the batch and
                # the queue, so nothing here may change them. Their streams end here,
                # through the outboxes the event loop owns (they waited for good: the
                # thread, once its call returns, delivers that step and ends).
                logger.error(
                    "engine thread of %s still runs %.0fs after stop", self.labels, self.STOP_JOIN_S
                )
                for seq in self._open:
                    # Its start is final: the thread admits nothing during its step.
                    error = _unloading() if seq.started_at is None else _unloaded()
                    seq.outbox.put_nowait(Finished("error", error))
                self._open.clear()
                # Its gauges go too: the thread publishes none after its step (the
                # loop ends), and the preStop hook and autoscalers read them.
                self._remove_gauges()
                return
        with self._lock:
            queued = [*self._waiting.remove_where(lambda _: True), *self._inbox]
            self._inbox = []
            self._waiting_count = self._waiting_batch = self._waiting_copies = 0
        for seq in list(self._running):  # _finish removes each from it
            self._finish(seq, Finished("error", _unloaded()))
        for seq in queued:  # left by a drain of 0 s: they never started
            self._finish(seq, Finished("error", _unloading()))
        self._hand_over(self._take_outgoing())
        # Nothing runs or waits any more, and the engine thread that published the
        # gauges has ended: the version's series go (the preStop hook and the
        # autoscalers read them; a reload starts fresh ones).
        self._remove_gauges()

    def _remove_gauges(self) -> None:
        """Removes this version's gauge series, per-tenant queue depths included."""
        metrics.remove_version_gauges(self.labels)
        self._tenant_metrics.publish([])  # removes every tenant's depth but "_other"
        TENANT_QUEUE_DEPTH.remove(*self.labels, OTHER_TENANT)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int,
        timeout_s: float | None,
        top_logprobs: int | None = None,
        tenant: str = "",
        tier: str = "",
        cache_scope: str | None = None,
    ) -> Sequence_:
        """Queues a sequence; raises ResourceExhausted when the queue is full.

        Raises InvalidArgument for an empty prompt (no token to compute the
        first logits from: it would fail the whole prefill step it joins).

        top_logprobs: None, or record each token's log-probability and that many
        best alternatives (costs a softmax of the row, only for these sequences).
        tenant, tier: the caller's (the edge's identity headers), for fair sharing.
        cache_scope: the scope its prompt's KV is reused in (None: its tenant).
        """
        if not self._accepting:
            raise _unloading()
        if not prompt_ids:
            raise InvalidArgument(
                [FieldViolation("prompt", "renders to no tokens; at least one is needed")],
                reason="EMPTY_PROMPT",
            )
        seed = params.seed if params.seed is not None else None
        seq = Sequence_(
            id=next(self._ids),
            prompt_ids=prompt_ids,
            params=params,
            priority=priority,
            deadline=None if timeout_s is None else time.monotonic() + timeout_s,
            rng=np.random.default_rng(seed),
            top_logprobs=top_logprobs,
            tenant=tenant,
            cache_scope=tenant if cache_scope is None else cache_scope,
            weight=self.limits.fairness.weight(tenant, tier),
            copy=SHADOW_COPY.get(),
        )
        with self._lock:
            # Requests the next admission starts (a free slot, room in the KV
            # budget) never wait: max_queue bounds the ones that cannot start.
            interactive = not _is_batch(priority)
            may_start = self._may_start(priority)
            max_queue = self.limits.max_queue
            if not self._capacity.take(
                seq.reserved_tokens, seq.copy, interactive, max_queue, may_start
            ):
                raise ResourceExhausted(
                    f"worker queue is full ({self.limits.max_queue} requests waiting)",
                    retry_after_s=1.0,
                    quota_violations=[
                        QuotaViolation("worker:queue", f"max_queue={self.limits.max_queue}")
                    ],
                    reason="QUEUE_FULL",
                )
            self._inbox.append(seq)
            self._open.add(seq)
            self._waiting_count += 1
            self._waiting_copies += seq.copy
            batch = _is_batch(priority)
            self._waiting_batch += batch
            self._queue_depth[batch].set(self._waiting_batch if batch else self._interactive())
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence_) -> None:
        """Marks `seq` cancelled; its slot is freed at the next step boundary."""
        if seq.finished is None and not seq.cancelled:
            seq.cancelled = True
            self._wake.set()

    def end(self, seq: Sequence_, error: TokenmeshError) -> None:
        """Ends `seq`'s stream now with `error` (event loop): its reader gets the tokens
        handed over so far, then the error; the slot is freed as a cancelled one's.

        Put in the outbox here, not by the engine thread, so that it lands at
        once, even while a step runs (or hangs). A sequence that ended already
        (its `Finished` on its way) or was cancelled is left as it is.
        """
        if seq.finished is None and not seq.cancelled:
            seq.outbox.put_nowait(Finished("error", error))
            self.cancel(seq)

    def has_room(self, reserved: Sequence[int], priority: int = PRIORITY_INTERACTIVE) -> bool:
        """Tells whether requests reserving these KV tokens, at `priority`, would all be
        taken by `submit` now (none refused QUEUE_FULL), counted as `submit` counts them."""
        with self._lock:
            return self._all_taken(self._capacity, reserved, priority, self._may_start(priority))

    def ever_fits(self, reserved: Sequence[int]) -> bool:
        """Tells whether requests reserving these KV tokens would all be taken by
        `submit` on an idle scheduler (False: no wait makes room; slots, KV or queue
        are too small for them together)."""
        budget = self.limits.max_kv_tokens
        idle = StartCapacity(self.limits.max_sequences, budget, budget)
        return self._all_taken(Capacities(idle, idle, idle), reserved, PRIORITY_BATCH, True)

    def _all_taken(
        self, capacity: Capacities, reserved: Sequence[int], priority: int, may_start: bool
    ) -> bool:
        """Counts `reserved` on copies of these capacities as `submit` would."""
        counts, copy = capacity.copied(), SHADOW_COPY.get()
        interactive, max_queue = not _is_batch(priority), self.limits.max_queue
        return all(counts.take(t, copy, interactive, max_queue, may_start) for t in reserved)

    def _may_start(self, priority: int) -> bool:
        """Whether a request of `priority` may start at the next admission: not while
        one of its class (or a higher one) waits ahead for KV (head-of-line)."""
        blocked = self._blocked_priority
        return blocked is None or priority < blocked

    @property
    def accepting(self) -> bool:
        """Tells whether it takes requests (False once its unload began: `stop`)."""
        return self._accepting

    def stats(self) -> dict[str, int]:
        """Returns current occupancy (for GetWorkerStats and tests)."""
        running = list(self._running)  # a snapshot: the engine thread changes the list
        return {
            "running": len(running),
            "waiting": self._waiting_count,
            # Batch work (job items, shadow copies) waits behind these: it delays no
            # new interactive request, so the load report leaves it out.
            "waiting_interactive": self._interactive(),
            "kv_tokens_used": sum(len(s.prompt_ids) + len(s.generated) for s in running),
            "kv_tokens_reserved": self._reserved,
            "kv_tokens_capacity": self.limits.max_kv_tokens,
            "slots_free": len(self._free_slots),
            "cancelled_total": self.cancelled_total,
        }

    def _run(self) -> None:
        """The engine thread: schedule, compute, sample, hand tokens over; repeat."""
        failures = 0  # in a row
        while not self._stopping:
            try:
                self._iterate()
                failures = 0
            except Exception:  # a bug here must not leave every stream waiting forever
                failures += 1
                # A fault that stays (it fails every step) spun this thread at a whole
                # core and wrote ~5,000 tracebacks a second: backed off, logged less.
                if failures <= 3 or failures % 100 == 0:
                    logger.exception(
                        "scheduler step failed for %s/%s (%d in a row)", *self.labels, failures
                    )
                self._take_inbox()
                waiting = self._waiting.remove_where(lambda _: True)
                with self._lock:
                    self._unwait(waiting)
                for seq in [*self._running, *waiting]:
                    self._finish(seq, Finished("error", internal_error()))
                self._publish_health(self._step_health.failed())
                self._post()
                # Woken early by new work or the stop (each new request tries again).
                self._wake.wait(min(FAILED_STEP_BACKOFF_S * 2 ** (failures - 1), 1.0))
                self._wake.clear()

    def _iterate(self) -> None:
        """One scheduling round: at most one engine step."""
        self._publish_health(self._step_health.poll())
        self._take_inbox()
        self._reap()
        if not self._accepting:  # unloading: whatever waits is refused, never started
            self._refuse_waiting()
        self._compact_slots()
        self._admit()
        self._publish_gauges()
        if not self._running:
            self._post()
            self._wake.wait(self.IDLE_WAIT_S)
            self._wake.clear()  # state is checked again right after
            return
        batch = self._next_batch()
        try:
            tokens = self._compute(batch)
        except Exception:
            logger.exception("engine step failed for %s/%s", *self.labels)
            for seq in batch:
                self._finish(seq, Finished("error", internal_error()))
            self._publish_health(self._step_health.failed())
            self._post()
            return
        self._publish_health(self._step_health.succeeded())
        now = time.monotonic()
        every = self._release_every(len(self._running))
        gaps: list[float] = []  # this step's inter-token latencies, observed at once
        for seq, token in zip(batch, tokens, strict=True):
            self._deliver(seq, token, now, every, gaps)
        metrics.observe_many(self._itl, gaps)
        # Engine throughput: every token sampled (EOS and those past a stop sequence
        # too), once per step; usage counts what the streams deliver.
        self._completion_tokens.inc(len(batch))
        self._post()

    def _take_inbox(self) -> None:
        """Moves submitted sequences into the waiting requests (engine thread)."""
        with self._lock:
            arrived, self._inbox = self._inbox, []
        for seq in arrived:
            seq.account = self._waiting.push(seq, seq.priority, seq.tenant)

    def _take_outgoing(self) -> list[tuple[Sequence_, int | Finished]]:
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def _publish_health(self, serving: bool | None) -> None:
        """Tells the event loop the version's health changed (engine thread; None: no
        change): NOT_SERVING while its steps keep failing, SERVING to be tried again."""
        if serving is None:
            return
        broken = self._step_health.broken
        if not serving:
            logger.error(
                "model %s version %s: NOT_SERVING, its engine steps keep failing",
                *self.labels,
            )
        elif broken:
            logger.warning("model %s version %s: serving again, to be tried", *self.labels)
        else:
            logger.warning("model %s version %s: its engine steps work again", *self.labels)
        # Until a step works: a pause's end (serving, to be tried) proves nothing, and a
        # broken engine showed 0 between its pauses, never as long as an alert's `for`.
        self._engine_failing.set(1 if broken else 0)
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._health_changed, serving)

    def _health_changed(self, serving: bool) -> None:
        if self.on_health is not None:
            self.on_health(serving)

    def _post(self) -> None:
        """Hands this step's outbox items to the event loop (engine thread)."""
        if not self._outgoing or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._hand_over, self._take_outgoing())
        except RuntimeError:  # the event loop is closed: nobody is listening
            self._stopping = True

    def _hand_over(self, outgoing: list[tuple[Sequence_, int | Finished]]) -> None:
        """Puts the items in their outboxes (event loop)."""
        for seq, item in outgoing:
            seq.outbox.put_nowait(item)
            if type(item) is Finished:
                self._open.discard(seq)

    def _next_batch(self) -> list[Sequence_]:
        """Returns the sequences of the next step: new prompts alone, or the decoding ones.

        A prompt that joined the running batch would get its first token only
        with the whole batch's decode step; a prefill-only step gives it at
        once (time to first token ~ half a step plus its own prefill, instead
        of one and a half steps), while the running sequences wait that one
        short step. But requests that end in their own prefill step
        (max_tokens=1, EOS first) free their slot at once, so prompts can keep
        arriving for every step: after a prefill-only step the next one
        therefore decodes whenever a sequence is decoding, and the prompts that
        arrived meanwhile wait that one step. Every decoding sequence gets a
        token at least every second step.
        """
        starting = [seq for seq in self._running if not seq.generated]
        decoding = [seq for seq in self._running if seq.generated]
        if starting and not (decoding and self._prefilled_last):
            self._prefilled_last = True
            return starting
        self._prefilled_last = False
        return decoding

    def _release_every(self, running: int) -> int:
        """Returns after how many tokens a running sequence's stream gets them."""
        per_step = self.limits.messages_per_step
        return 1 if per_step <= 0 else -(-running // per_step)

    def _compute(self, batch: Sequence[Sequence_]) -> list[int]:
        """Runs one engine step and samples one token per sequence."""
        logits = self.engine.forward([seq.step_item() for seq in batch])
        tokens = sample_batch(logits, [seq.params for seq in batch], [seq.rng for seq in batch])
        for row, seq in enumerate(batch):
            if not seq.generated:  # this step was its prefill
                seq.cached_prompt_tokens = self.engine.take_reused_tokens(seq.slot)
            if seq.top_logprobs is not None:
                seq.token_logprobs.append(
                    token_logprob(logits[row], seq.params, int(tokens[row]), seq.top_logprobs)
                )
        ids: list[int] = tokens.tolist()
        return ids

    def _reap(self) -> None:
        """Drops cancelled sequences and waiting ones whose deadline passed."""
        now = time.monotonic()
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, Finished("cancelled"))
        dropped = self._waiting.remove_where(
            lambda seq: seq.cancelled or (seq.deadline is not None and now > seq.deadline)
        )
        if dropped:
            with self._lock:
                self._unwait(dropped)
        for seq in dropped:
            if seq.cancelled:
                self._finish(seq, Finished("cancelled"))
            else:
                self._finish(
                    seq, Finished("error", DeadlineExceeded("deadline passed while queued"))
                )

    def _refuse_waiting(self) -> None:
        """Refuses every waiting sequence: its version is unloading (engine thread;
        see `stop`). One submitted as the unload began is refused at the next round."""
        refused = self._waiting.remove_where(lambda _: True)
        if not refused:
            return
        with self._lock:
            self._unwait(refused)
        for seq in refused:
            self._finish(seq, Finished("error", _unloading()))

    def _compact_slots(self) -> None:
        """Moves running sequences from the highest slots into lower free ones.

        Running sequences then hold slots 0..n-1, and an engine whose decode
        step spans its lowest to its highest running slot (ONNX Runtime's
        in-place decoder) computes no idle slot between them. Between steps
        only: every running sequence's KV is then whole in its slot.
        """
        while self._free_slots and self._running:
            top = max(self._running, key=lambda seq: seq.slot)
            lowest = self._free_slots[0]
            if lowest > top.slot or not self.engine.move_slot(top.slot, lowest):
                return
            heapq.heapreplace(self._free_slots, top.slot)
            top.slot = lowest

    def _admit(self) -> None:
        """Moves waiting sequences into the batch while slots and budgets allow."""
        # Prompts admitted at the last boundary and not prefilled yet (a decode step
        # came first: _next_batch) spend the same step's budget: the next prefill
        # step carried two boundaries' worth, twice the bound on its ITL hit.
        most = self.limits.max_prefill_tokens
        pending = sum(len(seq.prompt_ids) for seq in self._running if not seq.generated)
        prefill_budget = most - pending
        paced = False  # stopped by the prefill budget alone: the rest start in later steps
        blocked: int | None = None  # the priority of a head the KV left cannot hold
        while self._free_slots:
            seq = self._waiting.peek()
            if seq is None:
                break
            if self._running:  # an empty batch always admits one, so nothing starves
                if self._reserved + seq.reserved_tokens > self.limits.max_kv_tokens:
                    blocked = seq.priority
                    break
                # A prompt longer than the whole budget never fits what is left of
                # it: it costs the whole budget instead, so it starts at the first
                # boundary with no other prefill pending or admitted, as the only
                # prefill of its step. Waiting for an empty batch instead kept it
                # at the head, stopping everyone behind it, until every running
                # stream had ended.
                if min(len(seq.prompt_ids), most) > prefill_budget:
                    paced = True
                    break
            # The slot and the waiting count change together (stats() reads both), and
            # against `stop`: read once per round, an unload that began after that
            # read started waiting requests here, ran to its drain timeout, billed.
            with self._lock:
                if not self._accepting:
                    break  # never started: refused at the next round (`_refuse_waiting`)
                self._waiting.pop()
                seq.slot = heapq.heappop(self._free_slots)
                self._unwait((seq,))
                seq.started_at = time.monotonic()
            self._reserved += seq.reserved_tokens
            prefill_budget -= len(seq.prompt_ids)
            self._running.append(seq)
            self._prompt_tokens.inc(len(seq.prompt_ids))
            if seq.account is not None:
                seq.account.charge_prompt(len(seq.prompt_ids), seq.weight)
        self._recount_capacity(paced, blocked)

    def _fresh_capacities(self) -> Capacities:
        """Returns what the next admission can start, counting no waiting request."""
        return Capacities(
            *(
                StartCapacity(
                    len(self._free_slots),
                    self.limits.max_kv_tokens - self._reserved,
                    self.limits.max_kv_tokens,
                )
                for _ in range(3)
            )
        )

    def _recount_capacity(self, paced: bool, blocked: int | None = None) -> None:
        """Sets what the next admission can start from the truth, after an admission.

        The waiting requests it did not start are queued, unless only the
        prefill budget stopped it: then they start in the next steps as far as
        slots and KV allow (every prompt fits some step's budget, one longer
        than the whole budget as that step's only prefill), counted in the
        waiting requests' order, priority class first, up to the first that
        does not fit, so at most a free slot's worth of them are looked at
        (admission's fair order within a class may pick others, an estimate
        off by at most those; the live count also skips the copies, at most
        the copy slots' worth). Requests submitted since the inbox was taken
        are counted again against the new truth. Both counts: live requests'
        and every request's (see StartCapacity).

        `blocked`: the priority of the request admission stopped at, the KV budget
        left unable to hold it (None: it did not). Admission is head-of-line, so
        nothing of that class or below starts until running sequences end and
        free it: such a request counts as queued, whatever slots and KV are
        free (`submit`). Counted free, every small request "fit" and was taken
        past `max_queue`, a step's free slots at a time, for as long as the
        head waited (148 waiting with max_queue=2). A request of a higher class
        is admitted first: it still starts if it fits.
        """
        counts = self._fresh_capacities()
        starting = starting_live = starting_interactive = 0
        if paced:
            starting = _starting(counts.every, self._waiting)
            starting_live = _starting(counts.live, (s for s in self._waiting if not s.copy))
            starting_interactive = _starting(
                counts.interactive, (s for s in self._waiting if not _is_batch(s.priority))
            )
        waiting = len(self._waiting)
        with self._lock:
            # What is counted waiting is in the inbox or the waiting requests.
            copies = self._waiting_copies - sum(seq.copy for seq in self._inbox)
            interactive = self._interactive() - sum(
                not _is_batch(seq.priority) for seq in self._inbox
            )
            counts.every.queued = waiting - starting
            counts.live.queued = waiting - copies - starting_live
            counts.interactive.queued = interactive - starting_interactive
            self._blocked_priority = blocked
            for seq in self._inbox:
                may_start = self._may_start(seq.priority)
                counts.count(seq.reserved_tokens, seq.copy, not _is_batch(seq.priority), may_start)
            self._capacity = counts

    def _deliver(
        self, seq: Sequence_, token: int, now: float, every: int, gaps: list[float]
    ) -> None:
        if seq.cancelled:
            self._finish(seq, Finished("cancelled"))
            return
        if token == self.eos_token_id:
            if seq.first_token_at is None:
                # An empty answer: the end of sequence is its first token (its TTFT is
                # when it was answered; 0 read as "never", slower than any rollout bound).
                seq.first_token_at = seq.last_token_at = now
                self._ttft[_is_batch(seq.priority)].observe(now - seq.submitted_at)
            self._finish(seq, Finished("stop"))
            return
        if seq.account is not None:
            seq.account.charge_output(seq.weight)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self._ttft[_is_batch(seq.priority)].observe(now - seq.submitted_at)
        else:
            gaps.append(now - (seq.last_token_at or now))
        seq.last_token_at = now
        seq.generated.append(token)
        seq.held.append(token)
        if len(seq.held) >= every or len(seq.generated) == 1:
            self._release(seq)
        full = len(seq.prompt_ids) + len(seq.generated) >= self.engine.context_length
        if len(seq.generated) >= seq.params.max_tokens or full:
            self._finish(seq, Finished("length"))

    def _release(self, seq: Sequence_) -> None:
        """Hands the held tokens to the sequence's stream (one wake-up for all)."""
        self._outgoing.extend((seq, held) for held in seq.held)
        seq.held.clear()

    def _finish(self, seq: Sequence_, finished: Finished) -> None:
        if seq.finished is not None:
            return
        seq.finished = finished
        self._release(seq)
        self._outgoing.append((seq, finished))
        if finished.reason == "cancelled":
            self.cancelled_total += 1
            metrics.CANCELLATIONS.labels(*self.labels).inc()
        if seq in self._running:
            self._running.remove(seq)
            with self._lock:  # submit may count the freed slot and KV at once
                heapq.heappush(self._free_slots, seq.slot)
                for capacity in self._capacity.all():
                    capacity.slots += 1
                    capacity.kv_tokens += seq.reserved_tokens
            self._reserved -= seq.reserved_tokens
            if seq.account is not None:
                self._waiting.finished(seq.priority, seq.account)

    def _unwait(self, seqs: Sequence[Sequence_]) -> None:
        """Counts sequences out of the waiting ones (under _lock)."""
        self._waiting_count -= len(seqs)
        self._waiting_batch -= sum(_is_batch(seq.priority) for seq in seqs)
        self._waiting_copies -= sum(seq.copy for seq in seqs)

    def _interactive(self) -> int:
        """Returns the interactive requests waiting (in the inbox or waiting)."""
        return self._waiting_count - self._waiting_batch

    def _publish_gauges(self) -> None:
        with self._lock:  # both counts of one moment (submit changes them together)
            interactive, batch = self._interactive(), self._waiting_batch
        self._queue_depth[0].set(interactive)
        self._queue_depth[1].set(batch)
        now = time.monotonic()
        if now >= self._tenant_metrics_due:
            self._tenant_metrics.publish(self._waiting.changed_accounts())
            self._tenant_metrics_due = now + self.TENANT_METRICS_EVERY_S
        self._running_gauge.set(len(self._running))
        self._slots_used.set(self.limits.max_sequences - len(self._free_slots))
        self._kv_reserved.set(self._reserved)
        cache = self.engine.prefix_cache
        if cache is not None and cache.enabled:
            reused, looked_up = cache.stats.reused_tokens, cache.stats.prompt_tokens
            last_reused, last_looked_up = self._prefix_published
            if looked_up < last_looked_up:  # the cache was cleared: its counts start again
                last_reused = last_looked_up = 0
            self._prefix_reused.inc(reused - last_reused)
            self._prefix_computed.inc(looked_up - reused - (last_looked_up - last_reused))
            self._prefix_published = (reused, looked_up)
            self._prefix_held.set(cache.held_tokens)
