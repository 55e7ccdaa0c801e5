"""The content-policy stage of a request: policy on input, policy on output, samples.

`ContentStage` is what the servicers call (every API surface goes through
the v2 servicer, so v1 and the OpenAI surface get it too):

- `admit(context, target, spec, rpc, api_version)` before the prompt is
  rendered: the caller's policies (tenant's, then key's; from memory, see
  services.inference.policy_cache) check and redact the request's own texts
  (prompt, message contents, variables). A block raises
  `ContentPolicyViolation` (INVALID_ARGUMENT, reason CONTENT_POLICY) after
  recording a usage event with no tokens and finish reason "content_filter"
  (so the block reaches the audit log with its rule). Returns the spec the
  model sees and a `RequestContent`, the request's policy state.
- `RequestContent.filter(stream, generation)` wraps a generation's
  (choice, delta) stream when an output rule applies or the request is
  sampled: an `OutputFilter` per choice holds deltas back; a match ends the
  choice with finish reason "content_filter" (its held tokens counted as
  sent: they were generated and are billed) and cancels its sequence.
- `RequestContent.record(event, ...)` adds the hits to the usage event and
  writes the redacted sample when the request was sampled (a shadow copy
  never is: services.inference.shadow).
- `adopt_stop(generation, match)`: a request answered without its own
  computation (a coalesced waiter, or one joining a computation that just
  ended) received a choice an output rule stopped; the rule is its hit too
  (its usage event and audit entry name it, and it is counted once more:
  tokenmesh_policy_hits_total counts hits per request, as input hits are).
  Stopped answers are never stored in the response cache (only "stop" and
  "length" ones are), so no cache entry has hits to carry.

With no policy attached and no sampling, `admit` is two dict lookups and the
stream is not wrapped: the disabled path costs what it cost before.

The input check runs on the event loop when it is certainly short: no admin
regex and at most INLINE_CHECK_CHARS of text (the detectors are linear), or
at most INLINE_REGEX_CHARS with admin regexes, tried within
INLINE_REGEX_BUDGET_S of CPU time (a slow rule may take longer: then it is
checked again on a thread). Otherwise it runs on one of CHECK_THREADS
threads of its own (not the default executor, which tokenizes every
request), within its budget (policy.CHECK_BUDGET_S): a 256-input Embed of
crafted text held the loop, and every stream of the worker, for ~45 s. The
threads are shared by every tenant, which take turns (fair_threads): first
come first served, one tenant's burst of big checks held every other
tenant's check for as long as it lasted, and a policy with one keyword sent
an 11-character prompt behind them (1.2-3.4 s). A tenant may have
MAX_WAITING_CHECKS checks waiting; more are refused. Samples are built
(every detector on up to nine texts) on a thread of their own, so they never
queue ahead of a check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio as aioredis
from prometheus_client import Counter

from services.core.errors import QuotaViolation, ResourceExhausted
from services.core.interceptors import Context, request_headers
from services.inference import shadow
from services.inference.pipeline import samples
from services.inference.pipeline.fair_threads import FairThreads, QueueFull
from services.inference.pipeline.policy import (
    ContentPolicyViolation,
    Hit,
    InputCheck,
    OutputFilter,
    OutputMatch,
    Policy,
    check_input,
    policy_labels,
    refuses_alone,
    try_check_input,
)
from services.inference.policy_cache import PolicyCache
from services.inference.templates import Message
from tokenmesh.inference.v1 import inference_pb2

if TYPE_CHECKING:
    from services.inference.admission import Request, Target
    from services.inference.generation import Delta
    from services.inference.v2.choices import Choice, Generation
    from services.inference.v2.validation import GenerationSpec

CONTENT_FILTER = "content_filter"
#: Inputs up to this many characters (all texts together), under policies without
#: admin regexes, are checked on the event loop (the thread hop costs more).
INLINE_CHECK_CHARS = 16 * 1024
#: Inputs up to this many characters, under policies with admin regexes, are
#: checked on the event loop first, within INLINE_REGEX_BUDGET_S.
INLINE_REGEX_CHARS = 2 * 1024
#: The CPU time a check on the event loop may take, in seconds: one that needs
#: more (a slow admin regex) is checked again, from the start, on a thread. It
#: bounds how long one request's rules can hold every stream of the worker.
INLINE_REGEX_BUDGET_S = 0.005
#: Input checks running at once; more wait for a thread, the tenants taking turns.
CHECK_THREADS = 2
#: Input checks one tenant may have waiting for a thread; past it its request is
#: refused RESOURCE_EXHAUSTED (QUEUE_FULL, retry in a second): each holds its texts.
MAX_WAITING_CHECKS = 32
_CHECKS = FairThreads(CHECK_THREADS, MAX_WAITING_CHECKS, "content")
# Sample builds: best-effort, never ahead of a check in the queue.
_SAMPLES = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="content-samples")
#: Sample writes waiting or running at once; past it a sampled request's sample is
#: dropped (tokenmesh_samples_written_total{outcome="dropped"}). Each holds its
#: request's input and outputs until its build on the one sample thread ends: a
#: burst of sampled large requests grew that queue, and the worker's memory, without
#: bound while the thread redacted them one by one.
MAX_PENDING_SAMPLES = 128
POLICY_HITS = Counter(
    "tokenmesh_policy_hits_total",
    "Content-policy rules that fired, by policy (name@version), rule, action and direction.",
    ("policy", "rule", "action", "direction"),
)


class UsageSink(Protocol):
    """UsageSink is where a blocked request's usage event goes (the worker's UsageLog)."""

    def append(self, event: inference_pb2.UsageEvent) -> None: ...


def count(hits: Sequence[Hit]) -> None:
    """Counts hits in tokenmesh_policy_hits_total."""
    for hit in hits:
        POLICY_HITS.labels(hit.policy, hit.rule, hit.action, hit.direction).inc()


@dataclass
class RequestContent:
    """RequestContent is one request's policy state: policies, hits, sampling, filters."""

    policies: Sequence[Policy] = ()
    hits: list[Hit] = field(default_factory=list)
    sampled: bool = False
    input_text: str = ""  # as the model sees it (sampled requests only)
    redis: aioredis.Redis | None = None  # where samples go
    sample_stream_max_bytes: int = samples.MAX_STREAM_BYTES
    filters: dict[int, OutputFilter[Any]] = field(default_factory=dict)
    stops: dict[int, OutputMatch] = field(default_factory=dict)
    _alternatives: dict[str, bool] = field(default_factory=dict)  # refuses_alternative's

    @property
    def filters_output(self) -> bool:
        """Tells whether the output stream must go through `filter`."""
        return self.sampled or any(p.output_block_patterns for p in self.policies)

    def refuses_alternative(self, text: str) -> bool:
        """Tells whether a top_logprobs alternative's text must be left out: an output
        rule matches it alone (see policy.refuses_alone). Judged once per distinct text
        of a request: the alternatives repeat from token to token."""
        verdict = self._alternatives.get(text)
        if verdict is None:
            verdict = self._alternatives[text] = refuses_alone(self.policies, text)
        return verdict

    @property
    def judges_alternatives(self) -> bool:
        """Tells whether top_logprobs alternatives go through `refuses_alternative`."""
        return any(p.output_block_patterns for p in self.policies)

    def finish_message(self, choice_index: int) -> str:
        """Returns why a choice ended with content_filter ("" if it did not)."""
        match = self.stops.get(choice_index)
        return match.message() if match is not None else ""

    async def filter(
        self,
        stream: AsyncGenerator[tuple[Choice, Delta], None],
        generation: Generation,
    ) -> AsyncGenerator[tuple[Choice, Delta], None]:
        """Yields the stream's deltas once their choice's output rules let them through."""
        from services.inference.generation import Delta

        try:
            async for choice, delta in stream:
                if choice.index in self.stops:
                    # Generated after the match, before the cancel took effect: never
                    # sent, nor billed. Billed, they made the bill depend on how far the
                    # engine ran ahead of this loop (16 to 200 tokens for one request),
                    # and it exceeded the usage the choice's final message had shown.
                    continue
                flt = self.filters.setdefault(choice.index, OutputFilter(self.policies))
                released = flt.feed(delta.text, delta)
                if flt.match is not None:
                    self._stop(choice, flt, generation)
                    yield choice, Delta("", [], CONTENT_FILTER)
                    continue
                if delta.finish_reason:
                    released += flt.flush(delta.unsent)
                for item in released:
                    yield choice, item
                if flt.match is not None:
                    # The choice's last scan (at its end, by flush) found a rule: the
                    # output is too short for feed to have scanned it, or the match
                    # ends it. What was held is never sent; the choice ends here.
                    self._stop(choice, flt, generation)
                    yield choice, Delta("", [], CONTENT_FILTER)
        finally:
            await stream.aclose()

    def _stop(self, choice: Choice, flt: OutputFilter[Any], generation: Generation) -> None:
        assert flt.match is not None
        self.stops[choice.index] = flt.match
        self.hits.append(flt.match.hit)
        count([flt.match.hit])
        # Generated, never sent, yet billed: the tokens held back count as sent.
        generation.sent_tokens += sum(len(d.token_ids) for d in flt.held_items)
        generation.scheduler.cancel(choice.seq)

    def outputs(self, count_: int) -> list[str]:
        """Returns each choice's released text (sampling)."""
        return [
            "".join(self.filters[i].released_text) if i in self.filters else ""
            for i in range(count_)
        ]

    def record(self, event: inference_pb2.UsageEvent, outputs: Sequence[str] = ()) -> None:
        """Adds the hits to the usage event; writes the sample if the request is sampled."""
        event.policy_hits.extend(policy_labels(self.hits))
        if not (self.sampled and self.redis is not None):
            return
        if len(_SAMPLE_WRITES) >= MAX_PENDING_SAMPLES:
            samples.SAMPLES_WRITTEN.labels("dropped").inc()
            return
        build = functools.partial(
            samples.build,
            request_id=event.request_id,
            tenant=event.tenant,
            key_id=event.key_id,
            model=(event.model.name, event.model.version),
            rpc=event.rpc,
            input_text=self.input_text,
            outputs=list(outputs),
            finish_reason=event.finish_reason,
            policy_hits=list(event.policy_hits),
        )
        task = asyncio.create_task(_write_sample(self.redis, build, self.sample_stream_max_bytes))
        _SAMPLE_WRITES.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(_SAMPLE_WRITES.discard)


NO_CONTENT = RequestContent()


def adopt_stop(generation: Generation, match: OutputMatch) -> None:
    """Records, as `generation`'s own hit, the output rule that stopped a choice of an
    answer it was served but did not compute (the computing request recorded it for
    itself; its record is only read here)."""
    if generation.content is NO_CONTENT:  # shared by every request: never written
        generation.content = RequestContent()
    generation.content.hits.append(match.hit)
    count([match.hit])


# Sample writes in flight (a request's state may be gone before its write ends).
_SAMPLE_WRITES: set[asyncio.Task[None]] = set()


async def _write_sample(
    redis: aioredis.Redis, build: functools.partial[Any], max_bytes: int
) -> None:
    """Builds a sample off the event loop (every detector on every text), writes it."""
    sample = await asyncio.get_running_loop().run_in_executor(_SAMPLES, build)
    await samples.write(redis, sample, max_bytes)


def spec_texts(spec: GenerationSpec) -> list[str]:
    """Returns a request's own texts: prompt, message contents, variable values."""
    texts = [spec.prompt] if spec.prompt is not None else []
    texts += [m.content for m in spec.messages]
    texts += [spec.variables[k] for k in sorted(spec.variables)]
    return texts


def with_texts(spec: GenerationSpec, texts: Sequence[str]) -> GenerationSpec:
    """Returns `spec` with its own texts replaced (in `spec_texts` order)."""
    rest = list(texts)
    prompt = rest.pop(0) if spec.prompt is not None else None
    messages = tuple(Message(m.role, rest.pop(0)) for m in spec.messages)
    variables = {k: rest.pop(0) for k in sorted(spec.variables)}
    return replace(spec, prompt=prompt, messages=messages, variables=variables)


async def _check(
    policies: Sequence[Policy], texts: Sequence[str], field_name: str, tenant: str
) -> InputCheck:
    """Runs `check_input`: on the loop when it is certainly short, else on a thread
    when `tenant`'s turn comes.

    Raises:
        ResourceExhausted: `tenant` already has MAX_WAITING_CHECKS checks waiting.
    """
    chars = sum(len(t) for t in texts)
    regexes = any(p.input_rules for p in policies)
    if not policies or (chars <= INLINE_CHECK_CHARS and not regexes):
        return check_input(policies, texts, field_name)  # nothing to check, or linear
    if chars <= INLINE_REGEX_CHARS:
        # Admin rules may be slow on any text: tried within a few ms, else on a thread.
        checked = try_check_input(policies, texts, field_name, INLINE_REGEX_BUDGET_S)
        if checked is not None:
            return checked
    try:
        return await _CHECKS.run(
            tenant, functools.partial(check_input, policies, list(texts), field_name)
        )
    except QueueFull:
        bound = _CHECKS.max_waiting
        raise ResourceExhausted(
            f"too many input checks of this tenant are waiting ({bound})",
            retry_after_s=1.0,
            quota_violations=[QuotaViolation("worker:content-checks", f"max_waiting={bound}")],
            reason="QUEUE_FULL",
        ) from None


class ContentStage:
    """ContentStage applies the callers' content policies and sampling (module docstring).

    Args:
        cache: the worker's policy cache (None: no policies, no sampling).
        usage_log: where a blocked request's usage event goes.
        redis: where samples are written.
        sample_stream_max_bytes: bytes of samples kept per tenant (the oldest go).
    """

    def __init__(
        self,
        cache: PolicyCache | None = None,
        usage_log: UsageSink | None = None,
        redis: aioredis.Redis | None = None,
        sample_stream_max_bytes: int = samples.MAX_STREAM_BYTES,
    ) -> None:
        self.cache = cache
        self.usage_log = usage_log
        self.redis = redis
        self.sample_stream_max_bytes = sample_stream_max_bytes

    async def _lookup(self, context: Context) -> tuple[list[Policy], bool, str, str]:
        assert self.cache is not None
        await self.cache.ready()
        headers = request_headers(context)
        from services.inference.admission import KEY_ID_HEADER, TENANT_HEADER

        tenant, key_id = headers.get(TENANT_HEADER, ""), headers.get(KEY_ID_HEADER, "")
        policies = self.cache.policies(tenant, key_id)
        # A shadow copy is never sampled: its live request had the caller's chance,
        # under the caller's tenant. The copy's usage event names the shadow account
        # (contract.SHADOW_TENANT): its sample went to one stream shared by every
        # tenant, out of the caller's export, retention and consent.
        sampled = not shadow.is_copy(headers) and samples.sampled(self.cache.sample_rate(tenant))
        return policies, sampled, tenant, key_id

    async def check_texts(
        self,
        context: Context,
        target: Target,
        texts: Sequence[str],
        *,
        field_name: str,
        request_id: str,
        rpc: str,
        api_version: str,
    ) -> tuple[list[str], RequestContent]:
        """Checks and redacts a request's texts; returns them and the request's state.

        Raises:
            ContentPolicyViolation: a block rule fired (its usage event is recorded).
            Unavailable: the policies were never loaded and Redis is unreachable.
            ResourceExhausted: the tenant has MAX_WAITING_CHECKS input checks waiting.
        """
        if self.cache is None:
            return list(texts), NO_CONTENT
        policies, sampled, tenant, _ = await self._lookup(context)
        if not policies and not sampled:
            return list(texts), NO_CONTENT
        try:
            checked = await _check(policies, texts, field_name, tenant)
        except ContentPolicyViolation as blocked:
            count([blocked.hit])
            self._record_block(context, target, blocked.hit, request_id, rpc, api_version)
            raise
        count(checked.hits)
        content = RequestContent(
            policies,
            checked.hits,
            sampled,
            redis=self.redis,
            sample_stream_max_bytes=self.sample_stream_max_bytes,
        )
        if sampled:
            content.input_text = "\n".join(checked.texts)
        return checked.texts, content

    async def admit(
        self, context: Context, target: Target, spec: GenerationSpec, rpc: str, api_version: str
    ) -> tuple[GenerationSpec, RequestContent]:
        """Checks a generation request's texts; returns the spec the model sees (redacted)."""
        field_name = "prompt" if spec.prompt is not None else "messages"
        texts, content = await self.check_texts(
            context,
            target,
            spec_texts(spec),
            field_name=field_name,
            request_id=spec.request_id,
            rpc=rpc,
            api_version=api_version,
        )
        if content is NO_CONTENT or not content.hits:
            return spec, content
        return with_texts(spec, texts), content

    def _record_block(
        self,
        context: Context,
        target: Target,
        hit: Hit,
        request_id: str,
        rpc: str,
        api_version: str,
    ) -> None:
        if self.usage_log is None:
            return
        from services.inference.admission import Request, token_usage

        request: Request = Request(context, target, request_id, rpc, api_version)
        event = request.usage_event(token_usage(0, 0), CONTENT_FILTER, None)
        event.policy_hits.append(hit.label)
        self.usage_log.append(event)
