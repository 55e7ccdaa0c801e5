"""Shadow traffic on the worker: serving the edge's mirrored copies, and comparison records.

The edge mirrors a share of a shadowed model's live requests to the shadow
version (services.router.shadow). A copy carries contract.SHADOW_HEADER (the
version to serve); the live request carries contract.SHADOWED_HEADER. Both are
edge-only headers: clients' copies are removed on arrival, and any other peer
sending one is refused, so a worker can trust them.

A copy:
- serves the version SHADOW_HEADER names, never a fallback (`routed_version`);
- is metered to the shadow account (tenant contract.SHADOW_TENANT, no key):
  never to the caller's key, and never counted in its request windows or
  token budgets (services.inference.admission, services.inference.request_limits);
- runs only while its caller stands within its limits. Envoy makes the copy
  when it routes the live request, before any worker decides that request's
  limits (they are decided in the live worker, not at the edge), so a copy
  of a refused request still arrived. The copy's worker reads the caller's
  request windows (request_limits, a 0-hit read) and token budgets
  (`CallerBudgets`, a read of the same keys) without counting anything, and
  drops the copy (FAILED_PRECONDITION, which Envoy discards; no usage) when
  they have no room for the request: at its limit, a caller loses copies
  (a sample), never one of its own requests;
- holds one of TOKENMESH_SHADOW_MAX_COPIES slots of its model version on the
  worker while it runs (`CopySlots`): beyond that, copies are dropped, so no
  caller can make copies pile up on a worker;
- waits at batch priority (services.inference.pipeline.generate) behind the
  live interactive requests of its own version, and takes none of that
  version's max_queue places from live requests (scheduler.SHADOW_COPY: a
  live request is never refused QUEUE_FULL for copies). Priority orders the
  requests of one version only, each version having a scheduler of its own:
  on a worker that also serves another version, the copies never wait for
  its requests and share the worker's CPUs with them, bounded there by the
  copy slots alone;
- neither reads nor writes the response cache (pipeline.cache.client_mode): it
  measures the shadow version, not the cache;
- stays out of its version's outcomes (rollout gates, load reports): a canary
  that is also the shadow is judged on its live share
  (services.inference.admission.Admission.record);
- is never sampled (services.inference.pipeline.content, by `is_copy`): its
  live request was sampled, or not, under the caller's tenant;
- answers into nothing: Envoy discards it, and the caller never waits for it.
Copies dropped are counted in tokenmesh_shadow_copies_dropped_total.

Both sides write a compact record keyed by the request id they share (the
edge's x-request-id; a legacy completion's later prompts `<id>:<n>`, the
copy admitting the same prompts in the same order) to
services.router.shadow_pairs, off the request path (`ShadowRecorder`); a
model without a shadow writes nothing. A side that did not compute its answer
(served from the response cache or another request's computation) or that a
fallback model served writes none: there is nothing of the model to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import Counter
from redis.exceptions import RedisError

from gateway import model_routing
from services.core import contract
from services.core.errors import FailedPrecondition, ResourceExhausted, TokenmeshError
from services.core.metadata import RequestMetadata, request_metadata
from services.core.redis_service import LUA_REDIS_NOW_MS, text
from services.inference.budget import READ_SUM, Limits, TokenBudgets, budget_lua
from services.inference.scheduler import SHADOW_COPY
from services.router.shadow_pairs import LIVE, SHADOW, PairStore, Record
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

if TYPE_CHECKING:
    from services.inference.logprobs import Confidence
    from services.inference.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"  # Envoy's, shared by a live request and its copy
MAX_PENDING_WRITES = 256
MAX_COPIES = 32  # copies of one version a worker runs at once (TOKENMESH_SHADOW_MAX_COPIES)

SHADOW_RECORDS = Counter(
    "tokenmesh_shadow_records_total",
    "Shadow comparison records by role (live, shadow) and outcome (written, dropped, "
    "failed; skipped: served without computing, or by a fallback model).",
    ("model", "version", "role", "outcome"),
)
SHADOW_COPIES_DROPPED = Counter(
    "tokenmesh_shadow_copies_dropped_total",
    "Shadow copies a worker did not run, by reason: caller_limited (the caller's request "
    "windows are full), caller_budget (its token budget has no room for the request), "
    "unknown (its standing could not be read), full (TOKENMESH_SHADOW_MAX_COPIES running).",
    ("model", "version", "reason"),
)
# Why a copy was dropped (the label) -> the error's reason.
DROP_REASONS = {
    "caller_limited": "SHADOW_CALLER_LIMITED",
    "caller_budget": "SHADOW_CALLER_OVER_BUDGET",
    "unknown": "SHADOW_CALLER_UNKNOWN",
    "full": "SHADOW_COPIES_FULL",
}


@dataclass(frozen=True)
class ShadowMark:
    """ShadowMark says a request takes part in shadow traffic.

    Attributes:
        role: LIVE (the caller's request of a shadowed model) or SHADOW (the copy).
        shadow_version: the version the copies go to.
        pair_id: the id both sides of the pair record under.
    """

    role: str
    shadow_version: str
    pair_id: str

    @property
    def is_copy(self) -> bool:
        """Tells whether this is the mirrored copy (not the caller's request)."""
        return self.role == SHADOW


def mark(headers: Mapping[str, str], request_id: str, prompt: int = 0) -> ShadowMark | None:
    """Returns the request's part in shadow traffic, from the edge's headers (None: none).

    Args:
        headers: the request's headers.
        request_id: the worker's id of the request (the pair id without an edge id).
        prompt: which of the call's prompts the request is (a legacy completion's
            `prompt` list is one request per prompt): each pairs under an id of its
            own, `<id>:<prompt>` after the first.
    """
    copy_of = headers.get(contract.SHADOW_HEADER, "")
    shadowed = headers.get(contract.SHADOWED_HEADER, "")
    if not (copy_of or shadowed):
        return None
    edge_id = headers.get(REQUEST_ID_HEADER, "")
    pair_id = edge_id if contract.is_request_id(edge_id) else request_id
    if prompt:
        pair_id = f"{pair_id}:{prompt}"
    return ShadowMark(SHADOW if copy_of else LIVE, copy_of or shadowed, pair_id)


# The call whose prompts are being marked, and the index of its next one.
_PROMPTS: ContextVar[tuple[RequestMetadata, Iterator[int]] | None] = ContextVar(
    "tokenmesh_shadow_prompts", default=None
)


def mark_call(context: Any, headers: Mapping[str, str], request_id: str) -> ShadowMark | None:
    """Returns `mark` of one request of the call `context`, numbering the call's prompts.

    A legacy completion with several prompts makes one request per prompt, all
    with the call's headers: under one pair id, their records overwrote each
    other and paired prompt k's live side with prompt j's copy. The copy admits
    the same prompts in the same order (Envoy mirrors the same body), so the
    n-th request of a call is the n-th on both sides. The count is kept in a
    context variable of the call's task, keyed by the call's metadata (read
    once per call: services.core.metadata), like that metadata itself.
    """
    if not (headers.get(contract.SHADOW_HEADER) or headers.get(contract.SHADOWED_HEADER)):
        return None
    call = request_metadata(context)
    current = _PROMPTS.get()
    if current is None or current[0] is not call:
        current = (call, itertools.count())
        _PROMPTS.set(current)
    return mark(headers, request_id, next(current[1]))


def is_copy(headers: Mapping[str, str]) -> bool:
    """Tells whether a request is a mirrored copy (never counted against its caller)."""
    return bool(headers.get(contract.SHADOW_HEADER))


def copy_target(headers: Mapping[str, str]) -> tuple[str, str]:
    """Returns the model and version a copy is for (its metric labels)."""
    model = headers.get(model_routing.ROUTE_MODEL_HEADER) or headers.get(
        model_routing.MODEL_HEADER, ""
    )
    return model, headers.get(contract.SHADOW_HEADER, "")


def dropped(model: str, version: str, why: str, detail: str) -> TokenmeshError:
    """Counts a copy that is not run and returns the error that ends it (Envoy discards it).

    Args:
        model: the copy's model.
        version: the shadow version.
        why: a key of DROP_REASONS (the metric's label).
        detail: what the error says.
    """
    SHADOW_COPIES_DROPPED.labels(model, version, why).inc()
    message = f"shadow copy of {model!r} version {version!r} not run: {detail}"
    if why == "full":
        return ResourceExhausted(message, retry_after_s=1.0, reason=DROP_REASONS[why])
    return FailedPrecondition(message, reason=DROP_REASONS[why])


class CopySlots:
    """CopySlots bounds the copies' sequences of each model version this worker runs at once.

    A copy holds one slot from its first read, and one per sequence once its request
    is read (`need_copy_sequences`: prompts x n): counted per call, 32 copies of
    8 choices each ran 256 batch sequences, on the CPUs of the live version beside.

    Args:
        limit: sequences per model version (TOKENMESH_SHADOW_MAX_COPIES; 0: none run).
    """

    def __init__(self, limit: int = MAX_COPIES) -> None:
        self.limit = limit
        self._held: dict[tuple[str, str], int] = {}

    def running(self, model: str, version: str) -> int:
        """Returns how many slots the copies of a version hold now."""
        return self._held.get((model, version), 0)

    def grow(self, model: str, version: str, held: int, needed: int) -> None:
        """Takes `needed - held` more slots of the version; raises the drop error when they
        are not free."""
        key = (model, version)
        running = self._held.get(key, 0)
        if running - held + needed > self.limit:
            detail = (
                f"its {needed} sequences (prompts x n) do not fit beside the {running - held} "
                "of other copies on this worker (TOKENMESH_SHADOW_MAX_COPIES)"
            )
            raise dropped(model, version, "full", detail)
        self._held[key] = running - held + needed

    @contextlib.contextmanager
    def hold(self, model: str, version: str) -> Iterator[None]:
        """Holds a slot of the version for the block; raises the drop error when none is free.

        The block's sequences are submitted as copies (scheduler.SHADOW_COPY): they
        take no place of the version's max_queue from live requests, since these
        slots bound them.
        """
        key = (model, version)
        held = self._held.get(key, 0)
        if held >= self.limit:
            detail = f"{held} copy sequences of it run on this worker (TOKENMESH_SHADOW_MAX_COPIES)"
            raise dropped(model, version, "full", detail)
        self._held[key] = held + 1
        ticket = CopyTicket(self, model, version)
        marked, ticketed = SHADOW_COPY.set(True), _COPY_TICKET.set(ticket)
        try:
            yield
        finally:
            left = self._held[key] - ticket.held
            if left:
                self._held[key] = left
            else:
                del self._held[key]
            # A stream's generator closed by its finalizer runs this in another context,
            # which never saw the mark (its task, the copy's call, is over).
            with contextlib.suppress(ValueError):
                SHADOW_COPY.reset(marked)
            with contextlib.suppress(ValueError):
                _COPY_TICKET.reset(ticketed)


@dataclass
class CopyTicket:
    """CopyTicket is the slots one running copy holds (one until its request is read)."""

    slots: CopySlots
    model: str
    version: str
    held: int = 1

    def need(self, sequences: int) -> None:
        """Holds at least `sequences` slots; raises the drop error when they are not free."""
        if sequences > self.held:
            self.slots.grow(self.model, self.version, self.held, sequences)
            self.held = sequences


_COPY_TICKET: ContextVar[CopyTicket | None] = ContextVar("tokenmesh_copy_ticket", default=None)


def need_copy_sequences(sequences: int) -> None:
    """Holds a slot per sequence (prompts x n) of the shadow copy running in this context,
    before they are queued; raises the drop error when they do not fit (nothing for
    a live request)."""
    ticket = _COPY_TICKET.get()
    if ticket is not None:
        ticket.need(sequences)


@dataclass(frozen=True)
class CopyCaller:
    """CopyCaller is the caller whose request a copy mirrors (its copy is metered apart).

    Attributes:
        key_id: the caller's key ("" for an anonymous caller).
        limits: the key's token budgets.
    """

    key_id: str
    limits: Limits


# KEYS: the key's minute window, the window's amounts, the month's counter, the
# window's running sum (the keys services.inference.budget._RESERVE reserves in).
# ARGV: amount, tokens per minute (0 = none), monthly (0 = none). Reads only:
# returns the budget with no room for `amount` ("": both have room). The window is
# what _RESERVE keeps after trimming: reservations newer than a minute on Redis's
# clock. Its total is the running sum _RESERVE keeps (one HVALS of the amounts when
# the sum does not describe them), less the reservations a minute old that no
# reservation has trimmed yet (usually none: each reservation trims).
_PEEK_BUDGET = budget_lua(
    LUA_REDIS_NOW_MS
    + """
local amount, tpm, monthly = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 then
  -- The window's running sum (services.inference.budget) when it describes the
  -- amounts (the budgets' own test of it), else the amounts themselves: summed on
  -- every copy, a hot key's window (~20k entries a minute) cost 5 ms of Redis.
"""
    + READ_SUM
    + """
  local used = sum
  if not valid then
    used = 0
    for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
  end
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  -- In chunks: unpack() of more than ~8000 values overflows Lua's stack.
  for i = 1, #expired, 1000 do
    local last = math.min(i + 999, #expired)
    for _, v in ipairs(redis.call('HMGET', KEYS[2], unpack(expired, i, last))) do
      used = used - (tonumber(v) or 0)
    end
  end
  if used + amount > tpm then return 'tpm' end
end
if monthly > 0 and tonumber(redis.call('GET', KEYS[3]) or 0) + amount > monthly then
  return 'monthly'
end
return ''
""",
    SUM=4,
    AMOUNTS=2,
)
# What a budgets read raises while Redis is away or hung (BreakerOpen is one).
_BUDGETS_UNAVAILABLE = (RedisError, TimeoutError, OSError)


class CallerBudgets:
    """CallerBudgets reads whether a copy's caller has room in its token budgets.

    A read, never a reservation: the copy is metered to the shadow account, and
    its caller's live request holds what it reserved. The copy runs when the
    caller's budgets hold its prompt + max_tokens now; the live request needed
    the same, so a refused one's copy is dropped, whichever reached Redis first
    (a live request that took the last room loses its copy too). A legacy
    completion's prompts are read one by one, while its live request reserved
    them together: a copy of one refused by a few tokens may still run, within
    the copy slots (`CopySlots`).

    Args:
        budgets: the worker's token budgets (their keys and breaker).
    """

    def __init__(self, budgets: TokenBudgets) -> None:
        self.budgets = budgets
        self._peek = budgets.redis.register_script(_PEEK_BUDGET)

    async def check(self, caller: CopyCaller, amount: int, model: str, version: str) -> None:
        """Returns when the caller's budgets have room for `amount` tokens; else raises the
        drop error (also when they cannot be read: a copy is never run blind)."""
        limits = caller.limits
        if not (caller.key_id and limits.any):
            return
        try:
            over = await self._read(caller, amount)
        except _BUDGETS_UNAVAILABLE as exc:
            detail = f"its caller's budgets are unavailable ({type(exc).__name__})"
            raise dropped(model, version, "unknown", detail) from None
        if over:
            detail = f"key {caller.key_id} has no room for {amount} tokens ({over})"
            raise dropped(model, version, "caller_budget", detail)

    async def _read(self, caller: CopyCaller, amount: int) -> str:
        """Returns the budget without room for `amount` ("": none), through the budgets'
        breaker (a hung Redis fails the read at once after a few timeouts)."""
        # The budgets' own keys, and the window's running sum.
        keys = [
            *self.budgets._keys(caller.key_id, time.time()),
            self.budgets._sum_key(caller.key_id),
        ]
        self.budgets.breaker.check()
        limits = caller.limits
        try:
            over = await self._peek(
                keys=keys, args=[amount, limits.tokens_per_minute, limits.monthly_tokens]
            )
        except _BUDGETS_UNAVAILABLE as exc:
            self.budgets.breaker.failed_with(exc)  # a timeout or lost connection, not a reply
            raise
        self.budgets.breaker.succeeded()
        return text(over)


def routed_version(headers: Mapping[str, str]) -> str:
    """Returns the version the edge routed a request to: a copy's shadow version, else the
    route's.

    Raises:
        FailedPrecondition: a copy of a request the shadow version itself served (the
            version also takes live traffic): nothing to compare, so nothing is computed.
    """
    route = headers.get(model_routing.ROUTE_VERSION_HEADER, "")
    copy_of = headers.get(contract.SHADOW_HEADER, "")
    if not copy_of:
        return route
    if copy_of == route:
        raise FailedPrecondition(
            f"version {copy_of!r} served this request itself", reason="SHADOW_OF_ITSELF"
        )
    return copy_of


class _Sequence(Protocol):
    generated: list[int]


class _Choice(Protocol):
    tokens: int
    seq: _Sequence
    confidence: Confidence

    def timing(self) -> Any: ...


def _choices(request: object) -> Sequence[_Choice]:
    """A generation's choices (a request served without computing has none)."""
    choices: Sequence[_Choice] = getattr(request, "choices", ())
    return choices


def _reproducible(request: object) -> bool:
    """Seeded or greedy: the same input must give the same text on every version."""
    spec = getattr(request, "spec", None)
    params = getattr(request, "params", ())
    if spec is not None and getattr(spec, "seed", None) is not None:
        return True
    return bool(params) and all(p.temperature == 0 for p in params)


def _text_hash(choices: Sequence[_Choice], tokenizer: Tokenizer | None) -> str:
    if tokenizer is None or not choices:
        return ""
    texts = [tokenizer.decode(c.seq.generated[: c.tokens]) for c in choices]
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def served_usage(event: inference_pb2.UsageEvent) -> types_pb2.TokenUsage:
    """Returns the tokens a request's caller received (its billed usage may be less)."""
    return event.served_usage if event.HasField("served_usage") else event.usage


def record_of(request: object, version: str, event: inference_pb2.UsageEvent) -> Record:
    """Builds the comparison record of a finished generation (see shadow_pairs.Record)."""
    choices = _choices(request)
    timings = [(c.tokens, c.timing().decode_ms) for c in choices]
    itls = [decode_ms / (tokens - 1) for tokens, decode_ms in timings if tokens >= 2 and decode_ms]
    scored = [c.confidence for c in choices if c.confidence.logprobs]
    reproducible = _reproducible(request)
    return Record(
        version=version,
        finish_reason=event.finish_reason or "unknown",
        ttft_ms=round(event.timing.time_to_first_token_ms, 3),
        itl_ms=round(_mean(itls) or 0.0, 3),
        total_ms=round(event.timing.total_ms, 3),
        queue_ms=round(event.timing.queue_ms, 3),
        # What it produced: a served answer's billed usage may be 0 (cache billing).
        output_tokens=served_usage(event).completion_tokens,
        mean_logprob=_mean([c.mean_logprob for c in scored]),
        confidence=_mean([c.score for c in scored]),
        reproducible=reproducible,
        text_hash=_text_hash(choices, getattr(request, "tokenizer", None)) if reproducible else "",
    )


class ShadowRecorder:
    """ShadowRecorder writes comparison records in the background (bounded, never blocking).

    At most MAX_PENDING_WRITES writes are in flight; beyond that, and when Redis
    fails, a record is dropped and counted (tokenmesh_shadow_records_total): a
    comparison loses a pair, a caller loses nothing.
    """

    def __init__(self, store: PairStore, max_pending: int = MAX_PENDING_WRITES) -> None:
        self.store = store
        self.max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()

    def observe(self, request: object, shadow: ShadowMark, event: inference_pb2.UsageEvent) -> None:
        """Records one side of a pair (a finished generation's usage event).

        A side that did not compute its answer (`event.cached`: the response cache,
        or another request's computation) has a replay's timing and no text to
        compare, and one a fallback model served is another model's: neither is
        recorded (its partner waits unpaired, then expires).
        """
        model, version = event.model.name, event.model.version
        if event.cached or bool(getattr(request, "fallback_from", "")):
            SHADOW_RECORDS.labels(model, version, shadow.role, "skipped").inc()
            return
        if len(self._pending) >= self.max_pending:
            SHADOW_RECORDS.labels(model, version, shadow.role, "dropped").inc()
            return
        record = record_of(request, version, event)
        task = asyncio.create_task(self._write(model, shadow, record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, model: str, shadow: ShadowMark, record: Record) -> None:
        labels = (model, record.version, shadow.role)
        try:
            now_ms = int(time.time() * 1000)
            await self.store.write(model, shadow.pair_id, shadow.role, record, now_ms)
        except RedisError as exc:
            logger.warning("shadow record not written (%s)", type(exc).__name__)
            SHADOW_RECORDS.labels(*labels, "failed").inc()
            return
        SHADOW_RECORDS.labels(*labels, "written").inc()

    async def stop(self) -> None:
        """Waits for the writes in flight (each bounded by Redis's socket timeout)."""
        await asyncio.gather(*self._pending, return_exceptions=True)
