"""n choices of one prompt: submitted together, streamed interleaved, summarised per choice.

A v2 generation queues its n sequences in the model version's scheduler at
once, with the same prompt (a prefill step computes the prompt once and
copies its KV to the other slots; later requests meet it in the prefix
cache). Each choice streams through services.inference.generation exactly as
a v1 request does (stop sequences, incremental detokenization); `interleave`
merges the choices' deltas in the order they are ready.

Every sequence records its tokens' log-probabilities (top 0 unless the
request asked for more): a choice's confidence is reported whether or not
the request asked for logprobs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace

from services.core.interceptors import Context
from services.inference.admission import Request, Target
from services.inference.generation import Delta, GenerationState, stream_deltas, tagged_deltas
from services.inference.logprobs import Confidence, TokenLogprob
from services.inference.pipeline.content import NO_CONTENT, RequestContent
from services.inference.scheduler import PRIORITY_INTERACTIVE, Scheduler, Sequence_
from services.inference.templates import TemplateId
from services.inference.tokenizer import Tokenizer
from services.inference.v2.validation import GenerationSpec
from services.inference.validation import check_context

API_VERSION = "v2"
# The request's finish reason, for usage and metrics, is the most serious of its
# choices' reasons.
_SEVERITY = ("stop", "length", "content_filter", "cancelled", "quota", "error")


def request_finish_reason(reasons: Sequence[str]) -> str:
    """Returns the finish reason of a request from its choices' ("cancelled" if none)."""
    known = [r for r in reasons if r in _SEVERITY]
    return max(known, key=_SEVERITY.index) if known else "cancelled"


@dataclass(frozen=True)
class ChoiceTiming:
    """ChoiceTiming is where a choice's time went, in milliseconds from submission."""

    queue_ms: float
    prefill_ms: float
    time_to_first_token_ms: float
    decode_ms: float
    total_ms: float
    output_tokens_per_second: float


@dataclass
class Choice:
    """Choice is one of a request's n sequences and what it has produced so far."""

    index: int
    seq: Sequence_
    state: GenerationState
    tokens: int = 0  # generated tokens handed to the caller so far
    confidence: Confidence = field(default_factory=Confidence)
    finish_reason: str = ""

    def take_logprobs(self, count: int) -> list[TokenLogprob]:
        """Returns the log-probabilities of the next `count` tokens (and counts them)."""
        items = self.seq.token_logprobs[self.tokens : self.tokens + count]
        self.tokens += count
        if items:  # none when no one asked (v1): nothing to add, per stream message
            self.confidence.add(items)
        return items

    def timing(self) -> ChoiceTiming:
        """Returns the choice's timing so far (final once it has finished)."""
        seq = self.seq
        now = time.monotonic()
        started = seq.started_at or now
        first = seq.first_token_at
        last = seq.last_token_at or first
        decode_s = (last - first) if first is not None and last is not None else 0.0
        rate = (self.tokens - 1) / decode_s if self.tokens >= 2 and decode_s > 0 else 0.0
        return ChoiceTiming(
            queue_ms=(started - seq.submitted_at) * 1000,
            prefill_ms=(first - started) * 1000 if first is not None else 0.0,
            time_to_first_token_ms=(first - seq.submitted_at) * 1000 if first is not None else 0.0,
            decode_ms=decode_s * 1000,
            total_ms=(now - seq.submitted_at) * 1000,
            output_tokens_per_second=rate,
        )


class Generation(Request):
    """Generation is an admitted v2 Generate/Complete request: n choices of one prompt.

    Args:
        context: the RPC's context.
        target: the model version that serves it.
        spec: the validated request.
        prompt_ids: the rendered prompt's token ids.
        rpc: the full RPC name.
        template: the template version that rendered the prompt (None: used as is).
        api_version: the API version the request came through (usage events record it).
        token_logprobs: compute every token's log-probability even when the request
            did not ask for logprobs (for the choice's confidence; see ApiSurface).

    Raises:
        InvalidArgument: the prompt and max_output_tokens do not fit the context.
    """

    def __init__(
        self,
        context: Context,
        target: Target,
        spec: GenerationSpec,
        prompt_ids: list[int],
        rpc: str,
        template: TemplateId | None = None,
        *,
        api_version: str = API_VERSION,
        token_logprobs: bool = True,
    ) -> None:
        super().__init__(context, target, spec.request_id, rpc, api_version, spec.metadata)
        self.template = template
        self.token_logprobs = token_logprobs
        model = target.model
        assert model.scheduler is not None
        self.scheduler: Scheduler = model.scheduler
        self.tokenizer: Tokenizer = model.tokenizer
        self.spec = spec
        self.prompt_ids = prompt_ids
        self.params = spec.choice_params(model.defaults)
        room = model.context_length - len(prompt_ids)
        if spec.max_output_tokens is None and 0 < room < self.params[0].max_tokens:
            # The caller set no limit: the model's default is cut to the context's
            # room, as OpenAI and vLLM do (it refused a prompt near the context
            # length, naming a max_output_tokens the caller never sent).
            self.params = [replace(p, max_tokens=room) for p in self.params]
        max_tokens = self.params[0].max_tokens
        check_context(len(prompt_ids), max_tokens, model.context_length, "max_output_tokens")
        # Billed: the prompt once, plus up to max_tokens per choice.
        self.needed_tokens = len(prompt_ids) + spec.n * max_tokens
        self.choices: list[Choice] = []
        self.sent_tokens = 0  # completion tokens in messages the caller accepted
        self.content: RequestContent = NO_CONTENT  # its content policies (output filter)

    @property
    def batch_priority(self) -> bool:
        """Whether it waits behind every interactive request (it asked for batch priority,
        or is a shadow copy)."""
        return self.spec.priority != PRIORITY_INTERACTIVE

    @property
    def prompt_tokens(self) -> int:
        """Returns the prompt's length in tokens (counted once for all choices)."""
        return len(self.prompt_ids)

    @property
    def cached_prompt_tokens(self) -> int:
        """Returns the prompt tokens no choice's prefill computed (0 until all were prefilled).

        With n choices the first usually computes the prompt and the others copy
        it: the request's prompt was then computed once, and only what the
        prefix cache served it is cached.
        """
        return min((c.seq.cached_prompt_tokens for c in self.choices), default=0)

    def submit(self, timeout_s: float | None) -> None:
        """Queues every choice's sequence; none stays queued if one is refused."""
        top: int | None = self.spec.top_logprobs if self.spec.logprobs else 0
        if not (self.spec.logprobs or self.token_logprobs):
            top = None  # nothing will show a log-probability: the scheduler skips them
        try:
            for index, params in enumerate(self.params):
                seq = self.scheduler.submit(
                    self.prompt_ids,
                    params,
                    self.spec.priority,
                    timeout_s,
                    top_logprobs=top,
                    tenant=self.tenant,
                    tier=self.tier,
                    cache_scope=self.prefix_scope,
                )
                self.choices.append(Choice(index, seq, GenerationState(len(self.prompt_ids))))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancels every choice still running (frees their slots)."""
        for choice in self.choices:
            self.scheduler.cancel(choice.seq)

    def running(self) -> list[Choice]:
        """Returns the choices without a final message yet."""
        return [c for c in self.choices if not c.finish_reason]

    def end_running(self, reason: str) -> None:
        """Records `reason` as the finish reason of every choice still running."""
        for choice in self.running():
            choice.finish_reason = reason

    def finish_reason(self) -> str:
        """Returns the request's finish reason (the most serious of its choices')."""
        return request_finish_reason([c.finish_reason for c in self.choices])

    def deltas(self) -> AsyncGenerator[tuple[Choice, Delta], None]:
        """Streams every choice's deltas, interleaved as they are ready."""
        merged: AsyncGenerator[tuple[Choice, Delta], None]
        if len(self.choices) == 1:
            # One choice (every v1 request, most v2 ones): nothing to interleave, so no
            # reader task, no queue hop and no pairing generator per delta.
            (choice,) = self.choices
            merged = tagged_deltas(
                choice, self.scheduler, choice.seq, self.tokenizer, self.spec.stop, choice.state
            )
        else:
            streams = [
                stream_deltas(self.scheduler, c.seq, self.tokenizer, self.spec.stop, c.state)
                for c in self.choices
            ]
            merged = interleave(self.choices, streams)
        # Output rules (or sampling): deltas are held back until no rule can match them.
        return self.content.filter(merged, self) if self.content.filters_output else merged


async def interleave(
    choices: Sequence[Choice], streams: Sequence[AsyncGenerator[Delta, None]]
) -> AsyncGenerator[tuple[Choice, Delta], None]:
    """Yields (choice, delta) from every stream as they come; raises the first error.

    Each stream is read by a task of its own; closing this generator (or an
    error) cancels them, which cancels their sequences.
    """
    queue: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue(
        maxsize=4 * len(streams)
    )
    tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choices[index], item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    index: int,
    stream: AsyncGenerator[Delta, None],
    queue: asyncio.Queue[tuple[int, Delta | Exception | None]],
) -> None:
    """Moves one choice's deltas into the shared queue, then None (or its error)."""
    try:
        async for delta in stream:
            await queue.put((index, delta))
        await queue.put((index, None))
    except Exception as exc:  # handed over: interleave() raises it in the request's task
        await queue.put((index, exc))
    finally:
        await stream.aclose()  # a cancelled pump leaves no sequence running
