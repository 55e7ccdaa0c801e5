"""The Generate/Complete request path, in order, as small stages.

    validate -> content policy on input -> render the prompt
      -> cache / coalesce -> budget reservation -> schedule
      -> stream (content policy on output inside) -> record

Each stage lives in a module of its own with a narrow interface:
services.inference.v2.validation (validate), pipeline.content (policy in and
out), v2.prompting (render), pipeline.cache + pipeline.coalesce (this module
wires them), admission (budget), v2.choices (schedule), pipeline.stream
(messages), pipeline.record (usage). The servicers are transport adapters:
v2 sends the messages, v1 and OpenAI translate them.

With the cache off (TOKENMESH_CACHE=off) the cache stage is not on the path
at all: the request costs what it cost before the pipeline existed. With it
on, a request that may not be cached (not deterministic, `no-store`, or
sampled for the redacted-sample log) is `bypass` and computes as before.
A request answered by another's computation (coalesced, or joining one that
just ended) records the output rules that stopped its choices as its own hits.

`complete_all` runs one request's several prompts (a legacy completion's
`prompt` list) all or none: every budget reserved and room in the queue for
all before any runs; one refused, the others bill nothing. The cache is read
for all of them first: a prompt it answers needs no room in the queue and
reserves what it is billed, as it would alone.

A Complete still computing when the worker's shutdown grace ends is cut
before its held headers went out (a trailers-only UNAVAILABLE, which the
edge tries again on another worker): it is recorded apart, billed nothing,
its reservation given back (Admission.note_cancelled); so is every prompt
of a legacy completion's several (`complete_all`), those that had finished
too, and an OpenAI stream cut before its first chunk (its headers held
until then). A v1/v2 Generate stream sent its headers when it started: a
failure from then on, also before its first token, is told in-band (each
running choice's final message with `error`, then the status), and the
shutdown ends one still running shortly before the grace is over that way
(UNAVAILABLE, WORKER_STOPPING), billed what it sent (pipeline.stream.produce,
end_streams).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import TypeVar

from services.core.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
)
from services.core.interceptors import Context, request_headers, to_domain_error
from services.inference import shadow
from services.inference.admission import Admission, check_whole_budget
from services.inference.load_report import ERROR_REASON
from services.inference.pipeline import cache as cache_stage
from services.inference.pipeline import stream as stream_stage
from services.inference.pipeline.cache import (
    BYPASS,
    CACHE_REQUESTS,
    COALESCED,
    COMPUTED_SEQUENCES,
    HIT,
    MISS,
    CacheConfig,
    CacheStage,
    ClientMode,
)
from services.inference.pipeline.coalesce import Flight
from services.inference.pipeline.content import adopt_stop
from services.inference.pipeline.policy import OutputMatch
from services.inference.pipeline.record import record_computed, record_served
from services.inference.pipeline.stream import (
    StreamAborted,
    collect,
    finish_reason_name,
    produce,
    quota_finals,
)
from services.inference.scheduler import PRIORITY_BATCH, Scheduler, kv_reservation
from services.inference.surface import ApiSurface
from services.inference.template_cache import TemplateCache
from services.inference.v2 import prompting
from services.inference.v2.choices import Generation, request_finish_reason
from services.inference.v2.validation import GenerationSpec
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb

logger = logging.getLogger(__name__)

GenerationRequest = pb.GenerateRequest | pb.CompleteRequest
_LENGTH = struct.Struct(">I")
_STORED_REASONS = frozenset({"stop", "length"})
T = TypeVar("T")


@dataclass(frozen=True)
class CachePlan:
    """CachePlan is what the cache stage may do for one request (key None: bypass)."""

    key: str | None
    mode: ClientMode

    @property
    def read_key(self) -> str | None:
        """Returns the key the request may be answered under, from the cache or a shared
        computation (None: it computes its own)."""
        return self.key if self.mode.read else None


@dataclass(frozen=True)
class CacheLookup:
    """CacheLookup is one prompt's cache plan and the answer read for it before the
    request was admitted (`complete_all`): the answer served (it cannot expire in
    between), or, on a miss, the prompt joins or computes without reading again.

    Attributes:
        plan: what the cache stage may do for the prompt.
        hit: the cached answer (None: a miss, or a prompt that does not read the cache).
    """

    plan: CachePlan
    hit: pb.CompleteResponse | None = None


def deterministic(generation: Generation) -> bool:
    """Tells whether every choice draws the same tokens each time (seeded, or greedy)."""
    return all(p.seed is not None or p.temperature == 0 for p in generation.params)


def generation_key(
    config: CacheConfig, generation: Generation, method: str, surface: ApiSurface
) -> str:
    """Returns the cache key of a generation (services.inference.pipeline.cache)."""
    spec = generation.spec
    template = generation.template
    return cache_stage.make_key(
        "gen",
        [
            cache_stage.scope(
                config, generation.tenant, generation.model.name, generation.fallback_from
            ),
            method,
            surface.api_version,
            surface.token_logprobs,
            generation.model.name,
            generation.model.version,
            None if template is None else [template.name, template.version],
            [p.label for p in generation.content.policies],
            generation.prompt_ids,
            spec.n,
            [
                [p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, list(p.stop)]
                for p in generation.params
            ],
            spec.logprobs,
            spec.top_logprobs if spec.logprobs else 0,
        ],
    )


def plan(
    stage: CacheStage,
    context: Context,
    generation: Generation,
    field: int,
    method: str,
    surface: ApiSurface,
) -> CachePlan:
    """Decides whether the request is served through the cache, and under which key."""
    mode = cache_stage.client_mode(request_headers(context), field)
    if not mode.write or generation.content.sampled or not deterministic(generation):
        return CachePlan(None, mode)
    return CachePlan(generation_key(stage.config, generation, method, surface), mode)


def encode_stream(messages: Sequence[pb.GenerateResponse]) -> bytes:
    """Returns a Generate stream as one cache entry (length-prefixed messages)."""
    parts = []
    for message in messages:
        body = message.SerializeToString()
        parts.append(_LENGTH.pack(len(body)) + body)
    return b"".join(parts)


def decode_stream(entry: bytes) -> list[pb.GenerateResponse]:
    """Returns the messages of a Generate stream's cache entry."""
    messages, position = [], 0
    while position < len(entry):
        (size,) = _LENGTH.unpack_from(entry, position)
        start = position + _LENGTH.size
        messages.append(pb.GenerateResponse.FromString(entry[start : start + size]))
        position = start + size
    return messages


def delivered_tokens(items: Iterable[pb.GenerateResponse | inference_pb2.Choice]) -> int:
    """Returns the completion tokens of an answer served without its own computation (a
    hit, a coalesced one): those its caller receives, the token ids of its messages or
    choices. What it bills under TOKENMESH_CACHE_BILLING=full, in every path.

    Not its usage's completion_tokens: that is the computation's, which counts the
    tokens an output rule held back and never released (billed to the request that
    computed them: services.inference.pipeline.content).
    """
    return sum(len(item.token_ids) for item in items)


def _storable_stream(messages: Sequence[pb.GenerateResponse], n: int) -> bool:
    """Tells whether a stream may be replayed: every choice ended once, well."""
    finals = [m for m in messages if m.HasField("finish_reason")]
    if sorted(m.choice_index for m in finals) != list(range(n)):
        return False  # a choice without its final message: a cut stream
    return all(
        finish_reason_name(m.finish_reason) in _STORED_REASONS and not m.HasField("error")
        for m in finals
    )


def _storable_completion(response: pb.CompleteResponse) -> bool:
    return all(finish_reason_name(c.finish_reason) in _STORED_REASONS for c in response.choices)


class GenerationPipeline:
    """GenerationPipeline runs Generate and Complete requests through the stages.

    Args:
        admission: routing, budgets, usage; its `cache` is the cache stage (None: off).
        templates: the worker's prompt-template cache.
        surface: the API version the requests come through.
    """

    def __init__(
        self, admission: Admission, templates: TemplateCache | None, surface: ApiSurface
    ) -> None:
        self.admission = admission
        self.templates = templates
        self.surface = surface

    @property
    def cache(self) -> CacheStage | None:
        """Returns the worker's cache stage (None: the cache is off)."""
        return self.admission.cache

    async def admit(self, context: Context, request: GenerationRequest, method: str) -> Generation:
        """Validates the request, applies input policy, renders the prompt."""
        spec = GenerationSpec.from_pb(request)
        target = self.admission.resolve(context, spec.model, spec.version, generative=True)
        rpc, api_version = self.surface.rpc(method), self.surface.api_version
        # Content policy on input: the model sees the redacted texts (or nothing: a block).
        spec, content = await self.admission.content.admit(context, target, spec, rpc, api_version)
        if shadow.is_copy(request_headers(context)):
            # A shadow copy waits behind the live interactive requests of its own version
            # (each version has its own scheduler; the copy bound protects the others).
            spec = replace(spec, priority=PRIORITY_BATCH)
        prompt = await prompting.prepare(spec, target.model, self.templates)
        generation = Generation(
            context,
            target,
            spec,
            prompt.token_ids,
            rpc,
            prompt.template,
            api_version=api_version,
            token_logprobs=self.surface.token_logprobs,
        )
        generation.content = content
        return generation

    async def schedule(
        self, context: Context, generation: Generation, *, shared: bool = False
    ) -> None:
        """Reserves the request's tokens in its caller's budget, then queues its sequences.

        `shared`: the sequences are a computation other requests may read (coalesced):
        queued with no deadline, since a deadline is one caller's. Each reader leaves
        at its own deadline and the last to leave cancels the computation
        (services.inference.pipeline.coalesce), which frees its sequences; queued
        with its leader's deadline, the scheduler ended every reader's answer with
        the leader's DEADLINE_EXCEEDED.
        """
        if len(generation.params) > 1:  # all its choices or none (a sibling ran first)
            _check_queue_room([generation])
        await self.admission.reserve(generation)
        try:
            generation.submit(None if shared else context.time_remaining())
        except BaseException:
            # Refused (queue full, model unloading): nothing ran, so nothing is charged.
            self.admission.release(generation)
            raise
        COMPUTED_SEQUENCES.labels(generation.model.name).inc(len(generation.choices))

    # ---------------------------------------------------------------- Generate

    async def generate(
        self, context: Context, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Yields the Generate stream of `request` (raises StreamAborted after a late error)."""
        generation = await self.admit(context, request, "Generate")
        stage = self.cache
        if stage is None:
            async for message in self._generate_computed(context, generation):
                yield message
            return
        cache_plan = plan(stage, context, generation, request.cache, "Generate", self.surface)
        messages = self._generate_cached(stage, cache_plan, context, generation)
        async for cached in messages:
            yield cached

    async def _generate_computed(
        self, context: Context, generation: Generation
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        await self.schedule(context, generation)
        try:
            await _send_headers_or_cancel(context, generation)
            stream = produce(self.admission, generation, headers_out=_headers_out(context))
            async for message in stream:
                yield message
        except asyncio.CancelledError:
            self._note_cut_stream(context, generation)
            raise
        finally:
            record_computed(self.admission, generation)

    async def _generate_cached(
        self, stage: CacheStage, cache_plan: CachePlan, context: Context, generation: Generation
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        key = cache_plan.key
        if key is None:
            _count(generation, BYPASS)
            generation.cache_status = BYPASS
            async for message in self._generate_computed(context, generation):
                yield message
            return
        if cache_plan.mode.read:
            flight = stage.streams.join(key)
            if flight is None:
                entry = await stage.store.get(key)
                if entry is not None:
                    async for message in self._replay_stream(context, generation, entry):
                        yield message
                    return
                flight = stage.streams.join(key)
            while flight is not None:
                followed = self._follow_stream(context, generation, flight)
                joined = True
                async for shared in followed:
                    joined = joined and shared is not None
                    if shared is not None:
                        yield shared
                if joined:
                    return
                # The computation never started (its leader was refused, e.g. by its
                # own budget, or left): this request computes its answer with the other
                # waiters: the first of them to get here leads, the rest follow it (each
                # led a computation of its own before). An ended flight is never joined.
                flight = stage.streams.join(key)
        async for message in self._lead_stream(stage, cache_plan, key, context, generation):
            yield message

    async def _replay_stream(
        self, context: Context, generation: Generation, entry: bytes
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        messages = decode_stream(entry)
        finals = [m for m in messages if m.HasField("finish_reason")]
        prompt_tokens = finals[0].usage.prompt_tokens if finals else generation.prompt_tokens
        completion = delivered_tokens(messages)
        await self._reserve_served(generation, prompt_tokens, completion)
        _count(generation, HIT)
        generation.cache_status = HIT
        await self._send_headers_or_release(context, generation)
        first_ms = _elapsed_ms(generation)
        sent, reasons = 0, []
        try:
            for message in messages:
                message.request_id = generation.request_id
                if message.HasField("finish_reason"):
                    _replayed_timing(message.timing, first_ms, _elapsed_ms(generation))
                    reasons.append(finish_reason_name(message.finish_reason))
                yield message
                sent += len(message.token_ids)
        finally:
            record_served(
                self.admission,
                generation,
                prompt_tokens=prompt_tokens,
                completion_tokens=sent,
                finish_reason=_reason(reasons, generation.spec.n),
                first_token_ms=first_ms,
                billing=self._billing,
            )

    async def _follow_stream(
        self, context: Context, generation: Generation, flight: Flight[pb.GenerateResponse]
    ) -> AsyncGenerator[pb.GenerateResponse | None, None]:
        """Yields a coalesced waiter's messages; None once if the flight never started."""
        # A computation that already ended is being stored: its answer is a hit.
        status = HIT if flight.done else COALESCED
        items = flight.follow()
        sent, reasons, first_ms = 0, [], 0.0
        started = False
        try:
            try:
                first = await anext(items)
            except StopAsyncIteration:  # it ended with no message
                yield None  # nothing received: compute it ourselves
                return
            except Exception as exc:
                if not flight.left_to_waiters(exc):
                    # The computation failed: so does this identical request, recorded
                    # as its own (each caller's audit entry; it had none).
                    self._record_shared_failure(generation)
                    raise
                yield None
                return
            # Refused by its own budget: raised before anything is sent or billed.
            await self._reserve_served(generation, generation.prompt_tokens, 0, upper=True)
            _count(generation, status)
            generation.cache_status = status
            # Its caller gone before the headers went: nothing served, nothing billed.
            await self._send_headers_or_release(context, generation)
            started = True
            first_ms = _elapsed_ms(generation)
            async for item in _prepend(first, items):
                message = pb.GenerateResponse()
                message.CopyFrom(item)
                message.request_id = generation.request_id
                if message.HasField("finish_reason"):
                    reasons.append(finish_reason_name(message.finish_reason))
                    _adopt_stop(generation, flight.stops, message.choice_index, message)
                    if status == HIT:
                        _replayed_timing(message.timing, first_ms, _elapsed_ms(generation))
                yield message
                sent += len(message.token_ids)
        except asyncio.CancelledError:
            self._note_cut_stream(context, generation)
            raise
        finally:
            await items.aclose()  # type: ignore[attr-defined]
            if started:
                record_served(
                    self.admission,
                    generation,
                    prompt_tokens=generation.prompt_tokens,
                    completion_tokens=sent,
                    finish_reason=_reason(reasons, generation.spec.n),
                    first_token_ms=first_ms,
                    billing=self._billing,
                )

    async def _lead_stream(
        self,
        stage: CacheStage,
        cache_plan: CachePlan,
        key: str,
        context: Context,
        generation: Generation,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        flight = stage.streams.open(key, register=stage.streams.join(key) is None)
        flight.stops = generation.content.stops  # its waiters record the rules as theirs

        def compute() -> AsyncIterator[pb.GenerateResponse]:
            # Its waiters' answers are not cut by its own budget (each holds its own).
            return produce(self.admission, generation, lambda: flight.waiters > 1)

        async def store(ended: Flight[pb.GenerateResponse]) -> None:
            # The computation ended (its reader, `produce`, may never have started).
            self.admission.open_streams.discard(generation)
            if ended.error is None and _storable_stream(ended.items, generation.spec.n):
                await stage.store.put(key, encode_stream(ended.items))

        items = await self._lead_flight(flight, context, generation, compute, store)
        received, ended, reason = 0, set[int](), "cancelled"
        started = False
        if _headers_out(context):
            # Its computation is shared (produce tracks it only from its first
            # message): the worker's stop must end its own client's stream in-band
            # too, queued or not, before grpc cuts it at the grace's end.
            stream_stage.track(self.admission, generation)
        try:
            try:
                async for message in items:
                    started = True
                    if not await self._leader_within_budget(flight, generation, received):
                        # Its budget is out while others read on: only its own answer ends.
                        running = [c.index for c in generation.choices if c.index not in ended]
                        for final in quota_finals(generation, running, received):
                            yield final
                        reason = "quota"
                        break
                    yield message
                    received += len(message.token_ids)
                    if message.HasField("finish_reason"):
                        ended.add(message.choice_index)
            except Exception as exc:
                # The computation failed before its first message (so do its waiters):
                # with its headers out, the leader's client reads it in-band.
                if started or not _headers_out(context):
                    raise
                error = to_domain_error(exc, "Generate")
                for final in stream_stage.finals(generation, "error", error, generation.choices):
                    yield final
                raise StreamAborted(error) from exc
        except asyncio.CancelledError:
            self._note_cut_stream(context, generation)
            raise
        finally:
            if flight.done:
                # Else it runs on for its waiters: the worker's stop must still end it
                # in-band (they were cut with no final message); `store` untracks it.
                self.admission.open_streams.discard(generation)
            await items.aclose()  # type: ignore[attr-defined]
            if flight.done and reason != "quota":
                record_computed(self.admission, generation)
            else:  # left a computation others still wait for: billed what it received
                record_computed(self.admission, generation, received, reason)

    async def _leader_within_budget(
        self, flight: Flight[pb.GenerateResponse], generation: Generation, received: int
    ) -> bool:
        """Charges an unmetered leader what it received while others share its computation
        (which its budget does not end: `produce`); False once its budget is out."""
        if not (generation.unmetered and flight.waiters > 1):
            return True
        return await self.admission.within_budget(generation, generation.prompt_tokens + received)

    async def _lead_flight(
        self,
        flight: Flight[T],
        context: Context,
        generation: Generation,
        compute: Callable[[], AsyncIterator[T]],
        store: Callable[[Flight[T]], Awaitable[None]],
    ) -> AsyncIterator[T]:
        """Queues the computation of the flight `generation` leads, sends its headers and
        starts it; returns the leader's reader (iterate or close it at once).

        The sequences are queued with no deadline (`schedule`) and at the leader's
        priority, which waiters do not raise: most join after the sequences were
        queued, and the scheduler fixes a queued sequence's place by its priority
        (an interactive request joining a batch job's computation waits as batch;
        one that must not sends `no-cache` and computes its own).

        The reader is taken once the headers went, with no await between the start
        and it: the leader counts as a waiter before the computation's first step,
        and one whose caller left while its headers were sent holds none (closing
        a reader never iterated did not count it out: the computation ran to its
        end for nobody, holding its slots). Such a leader served nothing: its
        sequences are cancelled, nothing is billed, its waiters compute their own.
        """
        try:
            await self.schedule(context, generation, shared=True)
        except BaseException as exc:
            flight.fail(exc)
            raise
        _count(generation, MISS)
        generation.cache_status = MISS
        try:
            await generation.send_headers(context)
        except BaseException as exc:
            generation.cancel()
            flight.fail(exc)
            self.admission.release(generation)
            raise
        flight.start(compute(), store)
        return flight.follow()

    def _note_cut_stream(self, context: Context, generation: Generation) -> None:
        """Notes a Generate stream cancelled before its caller's held headers went out
        (an OpenAI stream before its first chunk: _headers_out): cut by the worker's
        shutdown, it ends trailers-only, which the edge tries again elsewhere, so it
        is billed nothing here (Admission.note_cancelled). Billed its prompt, it was
        billed twice. One that sent its headers is billed what it sent."""
        if not _headers_out(context):
            self.admission.note_cancelled(generation)

    # ---------------------------------------------------------------- Complete

    async def complete(self, context: Context, request: pb.CompleteRequest) -> pb.CompleteResponse:
        """Returns the Complete response of `request`."""
        generation = await self.admit(context, request, "Complete")
        return await self.complete_admitted(context, request, generation)

    async def complete_admitted(
        self, context: Context, request: pb.CompleteRequest, generation: Generation
    ) -> pb.CompleteResponse:
        """Returns the Complete response of `request`, admitted as `generation` (`admit`)."""
        stage = self.cache
        if stage is None:
            return await self._complete_computed(context, generation)
        cache_plan = plan(stage, context, generation, request.cache, "Complete", self.surface)
        return await self._complete_cached(stage, cache_plan, context, generation)

    async def _complete_cached(
        self,
        stage: CacheStage,
        cache_plan: CachePlan,
        context: Context,
        generation: Generation,
        looked_up: CacheLookup | None = None,
    ) -> pb.CompleteResponse:
        """Serves a Complete request through the cache stage.

        `looked_up`: the cache was read for it already (`complete_all`): its
        answer is served, or on a miss the request joins or computes without
        reading the store again.
        """
        key = cache_plan.key
        if key is None:
            _count(generation, BYPASS)
            generation.cache_status = BYPASS
            return await self._complete_computed(context, generation)
        if cache_plan.mode.read:
            if looked_up is not None and looked_up.hit is not None:
                return await self._serve_completion(
                    context, generation, looked_up.hit, HIT, stops={}
                )
            flight = stage.completions.join(key)
            if flight is None and looked_up is None:
                entry = await stage.store.get(key)
                if entry is not None:
                    return await self._replay_completion(context, generation, entry)
                flight = stage.completions.join(key)
            while flight is not None:  # as _generate_cached: waiters lead again together
                response = await self._follow_completion(context, generation, flight)
                if response is not None:
                    return response
                flight = stage.completions.join(key)
        return await self._lead_completion(stage, key, context, generation)

    async def _complete_computed(
        self, context: Context, generation: Generation
    ) -> pb.CompleteResponse:
        await self.schedule(context, generation)
        try:
            await _send_headers_or_cancel(context, generation)
            return await collect(self.admission, generation)
        except asyncio.CancelledError:
            self.admission.note_cancelled(generation)  # its headers are held: see there
            raise
        finally:
            record_computed(self.admission, generation)

    async def _replay_completion(
        self, context: Context, generation: Generation, entry: bytes
    ) -> pb.CompleteResponse:
        response = pb.CompleteResponse.FromString(entry)
        return await self._serve_completion(context, generation, response, HIT, stops={})

    async def _follow_completion(
        self, context: Context, generation: Generation, flight: Flight[pb.CompleteResponse]
    ) -> pb.CompleteResponse | None:
        """Returns the shared computation's response (None: it never started)."""
        status = HIT if flight.done else COALESCED  # ended: being stored, a hit
        items = flight.follow()
        try:
            shared = await anext(items, None)
        except Exception as exc:
            if not flight.left_to_waiters(exc):
                self._record_shared_failure(generation)  # see _follow_stream
                raise
            shared = None
        finally:
            await items.aclose()  # type: ignore[attr-defined]
        if shared is None:
            return None
        response = pb.CompleteResponse()
        response.CopyFrom(shared)
        return await self._serve_completion(
            context, generation, response, status, stops=flight.stops
        )

    def _record_shared_failure(self, generation: Generation) -> None:
        """Records a waiter of a computation that failed before it sent anything: an error,
        billed nothing (the computation's leader is billed what it used)."""
        record_served(
            self.admission,
            generation,
            prompt_tokens=0,
            completion_tokens=0,
            finish_reason=ERROR_REASON,
            first_token_ms=0.0,
            billing=self._billing,
        )

    async def _serve_completion(
        self,
        context: Context,
        generation: Generation,
        response: pb.CompleteResponse,
        status: str,
        *,
        stops: Mapping[int, OutputMatch],
    ) -> pb.CompleteResponse:
        """Answers this caller with a completion it did not compute (a hit, or a shared one).

        A hit's per-choice timing is replayed as this caller's; a coalesced
        caller keeps the timing of the computation it waited for. `stops`: the
        output rules that stopped the computation's choices (hits of this caller's too).
        """
        prompt_tokens = response.usage.prompt_tokens
        completion = delivered_tokens(response.choices)
        await self._reserve_served(generation, prompt_tokens, completion)
        _count(generation, status)
        generation.cache_status = status
        await self._send_headers_or_release(context, generation)
        elapsed = _elapsed_ms(generation)
        response.request_id = generation.request_id
        for choice in response.choices:
            _adopt_stop(generation, stops, choice.index, choice)
            if status == HIT:
                _replayed_timing(choice.timing, elapsed, elapsed)
        record_served(
            self.admission,
            generation,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            finish_reason=_reason([finish_reason_name(c.finish_reason) for c in response.choices]),
            first_token_ms=elapsed,
            billing=self._billing,
        )
        return response

    async def _lead_completion(
        self, stage: CacheStage, key: str, context: Context, generation: Generation
    ) -> pb.CompleteResponse:
        flight = stage.completions.open(key, register=stage.completions.join(key) is None)
        flight.stops = generation.content.stops  # its waiters record the rules as theirs

        async def compute() -> AsyncIterator[pb.CompleteResponse]:
            # Its waiters' answers are not cut by its own budget (each holds its own).
            yield await collect(self.admission, generation, lambda: flight.waiters > 1)

        async def store(ended: Flight[pb.CompleteResponse]) -> None:
            if ended.error is None and ended.items and _storable_completion(ended.items[0]):
                await stage.store.put(key, ended.items[0].SerializeToString())

        items = await self._lead_flight(flight, context, generation, compute, store)
        try:
            response = await anext(items)
            assert isinstance(response, pb.CompleteResponse)
            return response
        except asyncio.CancelledError:
            self.admission.note_cancelled(generation)  # its headers are held: see there
            raise
        finally:
            await items.aclose()  # type: ignore[attr-defined]
            if flight.done:
                record_computed(self.admission, generation)
            else:
                record_computed(self.admission, generation, finish_reason="cancelled")

    # ---------------------------------------------------------------- several prompts

    async def complete_all(
        self,
        context: Context,
        requests: Sequence[pb.CompleteRequest],
        generations: Sequence[Generation],
    ) -> list[pb.CompleteResponse]:
        """Returns the Complete responses of one request's several prompts, admitted as
        `generations` (`admit`), computed at once: all answered, or none billed.

        Before any runs, the cache is read for every prompt that may use it (one
        round trip), the model's queue must hold the sequences of those it does not
        answer (a repeated prompt counted once: the repeats join its computation),
        and every prompt's tokens are reserved in the caller's budget: prompt +
        max_tokens, or what a cached answer is billed (TOKENMESH_CACHE_BILLING), as
        for a single prompt. A refusal gives every reservation back. A cached
        answer read here is the one served: it cannot expire before its prompt
        runs. The queue check is an estimate: a prompt may still be refused when
        it is to run (the queue filled up since the check, the model is unloading).

        Their usage events are held until all are answered (or the request failed,
        or its caller left, after they ran: recorded then); if a prompt was refused
        when it was to run, its cancelled siblings' are dropped with their
        reservations: the request was refused, nothing of it is billed. If the
        whole request is tried again elsewhere, its answer unsent (cut by the
        worker's shutdown, or a prompt refused by the unload after one of its
        choices started: `Request.cut`), every prompt is recorded apart, billed
        nothing, those that had finished too: the retry runs and bills them all.

        Raises:
            RequestOverBudget: the prompts together need more than the caller's whole
                tokens_per_minute or monthly_tokens (each alone may fit: no wait
                would ever admit them together).
        """
        # The cache first (one read for all): a prompt it answers takes no sequence,
        # and holds in the budget what it will be billed, as it does alone.
        lookups = await self._look_up_all(context, requests, generations)
        _check_queue_room(_computing(generations, lookups))
        for generation, lookup in zip(generations, lookups, strict=True):
            if lookup is not None and lookup.hit is not None:
                generation.needed_tokens = self._billed_tokens(
                    lookup.hit.usage.prompt_tokens, delivered_tokens(lookup.hit.choices)
                )
        await self._reserve_all(generations)
        for generation in generations:
            generation.held_events = []
        tasks = [
            asyncio.ensure_future(self._complete_prompt(context, request, generation, lookup))
            for request, generation, lookup in zip(requests, generations, lookups, strict=True)
        ]
        bill = True
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException as exc:
            # Decided now: the wind-down below awaits, and the caller leaving (the
            # deadline that failed a prompt ends the RPC too) may cut it short.
            bill = not _one_refused(tasks, generations)
            if isinstance(exc, asyncio.CancelledError):
                for generation in generations:  # finished, computing or following
                    self.admission.note_cancelled(generation)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._end_together(generations, bill=bill)

    async def _look_up_all(
        self,
        context: Context,
        requests: Sequence[pb.CompleteRequest],
        generations: Sequence[Generation],
    ) -> list[CacheLookup | None]:
        """Plans every prompt's use of the cache and reads the answers of those that may be
        answered from it, in one round trip (None for each: the cache is off)."""
        stage = self.cache
        if stage is None:
            return [None] * len(generations)
        plans = [
            plan(stage, context, generation, request.cache, "Complete", self.surface)
            for request, generation in zip(requests, generations, strict=True)
        ]
        keys = list(dict.fromkeys(k for p in plans if (k := p.read_key) is not None))
        entries = dict(zip(keys, await stage.store.get_many(keys), strict=True))
        lookups: list[CacheLookup | None] = []
        for cache_plan in plans:
            key = cache_plan.read_key
            entry = None if key is None else entries[key]
            hit = None if entry is None else pb.CompleteResponse.FromString(entry)
            lookups.append(CacheLookup(cache_plan, hit))
        return lookups

    async def _complete_prompt(
        self,
        context: Context,
        request: pb.CompleteRequest,
        generation: Generation,
        lookup: CacheLookup | None,
    ) -> pb.CompleteResponse:
        """Answers one of `complete_all`'s prompts as its lookup decided."""
        stage = self.cache
        if stage is None or lookup is None:
            return await self.complete_admitted(context, request, generation)
        return await self._complete_cached(stage, lookup.plan, context, generation, lookup)

    async def _reserve_all(self, generations: Sequence[Generation]) -> None:
        """Reserves every prompt's tokens; one refused, gives all of them back and raises.

        A prompt the cache answers billed nothing reserves nothing (alone, it is
        served whatever the budget holds). Prompts that together need more than a
        whole budget are refused for good first (`check_whole_budget`).
        """
        check_whole_budget(generations)
        try:
            outcomes = await asyncio.gather(
                *(self.admission.reserve(g) for g in generations if g.needed_tokens),
                return_exceptions=True,
            )
        except BaseException:  # the caller left: each cancelled reservation was forgotten
            self._release_all(generations)
            raise
        refused = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if refused is not None:
            self._release_all(generations)
            raise refused

    def _release_all(self, generations: Sequence[Generation]) -> None:
        for generation in generations:
            self.admission.release(generation)  # nothing for one that holds none

    def _end_together(self, generations: Sequence[Generation], *, bill: bool) -> None:
        """Records (or drops) the held usage events; gives back what nobody recorded.

        One prompt cut (`Request.cut`: the request is tried again elsewhere, its
        answer unsent) cuts them all: a prompt that had finished was billed
        here, and again where the retry ran.
        """
        if any(generation.cut for generation in generations):
            for generation in generations:
                self.admission.note_retried(generation)
        for generation in generations:
            events, generation.held_events = generation.held_events or [], None
            try:
                for event in events if bill else ():
                    self.admission.record(generation, event)
            except Exception:  # one prompt's failure must not lose the others' usage
                logger.exception("recording a prompt's usage of %s failed", generation.request_id)
            # A recorded prompt's reservation was reconciled: this gives back only
            # those of dropped events and of prompts that ended without one.
            self.admission.release(generation)

    # ---------------------------------------------------------------- shared

    @property
    def _billing(self) -> str:
        stage = self.cache
        return stage.config.billing if stage is not None else "full"

    async def _send_headers_or_release(self, context: Context, generation: Generation) -> None:
        """Sends an answer's headers; gives its reservation back if they could not go (the
        caller left: nothing was served, nothing is recorded)."""
        try:
            await generation.send_headers(context)
        except BaseException:
            self.admission.release(generation)
            raise

    async def _reserve_served(
        self,
        generation: Generation,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        upper: bool = False,
    ) -> None:
        """Holds what an answer served without computing will be billed (before sending it).

        Args:
            generation: the request.
            prompt_tokens: its prompt.
            completion_tokens: the answer's tokens (with `upper`: unknown yet, the
                request's maximum is held and reconciled at the end).
            upper: reserve the request's maximum completion.
        """
        if upper:
            completion_tokens = generation.needed_tokens - generation.prompt_tokens
        generation.needed_tokens = self._billed_tokens(prompt_tokens, completion_tokens)
        if generation.needed_tokens:
            await self.admission.reserve(generation)

    def _billed_tokens(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Returns what an answer served without computing is billed, in all."""
        prompt, completion = cache_stage.billed(prompt_tokens, completion_tokens, self._billing)
        return prompt + completion


async def _prepend(
    first: pb.GenerateResponse, rest: AsyncIterator[pb.GenerateResponse]
) -> AsyncIterator[pb.GenerateResponse]:
    yield first
    async for item in rest:
        yield item


def _adopt_stop(
    generation: Generation,
    stops: Mapping[int, OutputMatch],
    choice_index: int,
    final: pb.GenerateResponse | inference_pb2.Choice,
) -> None:
    """Records the output rule that stopped a choice this request was served as its own
    hit (services.inference.pipeline.content.adopt_stop); other finals have none."""
    if final.finish_reason != inference_pb2.FINISH_REASON_CONTENT_FILTER:
        return
    match = stops.get(choice_index)
    if match is not None:
        adopt_stop(generation, match)


def _headers_out(context: Context) -> bool:
    """Tells whether the response headers a stream sent (`Generation.send_headers`) went
    out: a failure from now on is told in-band (pipeline.stream.produce).

    A caller that holds them until its first message says so in `sent` (the
    OpenAI servicer's _ResponseContext): it answers an earlier failure with an
    HTTP error of its own. grpc's context, and the interceptors' wrappers of it,
    sent them when asked.
    """
    return bool(getattr(context, "sent", True))


async def _send_headers_or_cancel(context: Context, generation: Generation) -> None:
    """Sends a scheduled generation's headers; cancels its sequences if they could not
    go (its caller left: nobody reads what they would compute; they ran to max_tokens)."""
    try:
        await generation.send_headers(context)
    except BaseException:
        generation.cancel()
        raise


def _computing(
    generations: Sequence[Generation], lookups: Sequence[CacheLookup | None]
) -> list[Generation]:
    """Returns the prompts that will queue sequences: not one whose cached answer is in
    hand, nor a repeat of an earlier prompt that may share its computation (it joins it).

    An estimate, like the queue check it feeds: a prompt joining another request's
    computation counts (that computation may end without an answer, its caller
    gone: the prompt then computes its own).
    """
    computing: list[Generation] = []
    leading: set[str] = set()
    for generation, lookup in zip(generations, lookups, strict=True):
        if lookup is not None and lookup.hit is not None:
            continue  # answered from the cache
        key = None if lookup is None else lookup.plan.read_key
        if key is not None:
            if key in leading:
                continue
            leading.add(key)
        computing.append(generation)
    return computing


def _check_queue_room(generations: Sequence[Generation]) -> None:
    """Refuses (QUEUE_FULL, as the scheduler's submit does) prompts whose sequences their
    model's queue cannot all take now: submitted one by one, the last ones were refused
    after the first ones ran.

    An admission estimate: the queue may fill up before they are submitted; a prompt
    refused then fails the request, and `complete_all` bills none of it.
    """
    reserved: dict[Scheduler, list[int]] = {}
    priorities: dict[Scheduler, int] = {}
    for generation in generations:
        reserved.setdefault(generation.scheduler, []).extend(
            kv_reservation(generation.prompt_ids, params) for params in generation.params
        )
        priorities[generation.scheduler] = generation.spec.priority
    # A shadow copy's slots are its sequences (its copy of every prompt computes).
    shadow.need_copy_sequences(sum(len(g.params) for g in generations))
    for scheduler, tokens in reserved.items():
        if not scheduler.ever_fits(tokens):
            # No wait makes room: refused QUEUE_FULL (retry in 1 s), it was retried
            # for good, on an idle worker too.
            limits = scheduler.limits
            raise InvalidArgument(
                [
                    FieldViolation(
                        "n",
                        f"this request's {len(tokens)} sequences (prompts x n) are more "
                        "than this model version runs and queues at once "
                        f"({limits.max_sequences} slots, {limits.max_kv_tokens} KV tokens, "
                        f"{limits.max_queue} queued)",
                    )
                ]
            )
        if not scheduler.has_room(tokens, priorities[scheduler]):
            max_queue = scheduler.limits.max_queue
            raise ResourceExhausted(
                f"worker queue is full ({max_queue} requests waiting): this request's "
                f"{len(tokens)} sequences do not fit",
                retry_after_s=1.0,
                quota_violations=[QuotaViolation("worker:queue", f"max_queue={max_queue}")],
                reason="QUEUE_FULL",
            )


def _one_refused(
    tasks: Sequence[asyncio.Future[pb.CompleteResponse]], generations: Sequence[Generation]
) -> bool:
    """Tells whether a prompt failed before it ran: raised (not cancelled) with no usage
    event held, which every prompt that ran (or was answered) records."""
    return any(
        task.done()
        and not task.cancelled()
        and task.exception() is not None
        and not generation.held_events
        for task, generation in zip(tasks, generations, strict=True)
    )


def _count(generation: Generation, result: str) -> None:
    CACHE_REQUESTS.labels(generation.model.name, result).inc()


def _elapsed_ms(generation: Generation) -> float:
    return (time.monotonic() - generation.started) * 1000


def _replayed_timing(timing: inference_pb2.Timing, first_ms: float, total_ms: float) -> None:
    """Sets a replayed answer's timing: no queue, no prefill, the first token at `first_ms`."""
    timing.CopyFrom(
        inference_pb2.Timing(time_to_first_token_ms=first_ms, total_ms=max(total_ms, first_ms))
    )


def _reason(reasons: Sequence[str], n: int = 0) -> str:
    """Returns the request's finish reason from its choices' ("cancelled" for a missing one)."""
    return request_finish_reason([*reasons, *(["cancelled"] * max(0, n - len(reasons)))])
