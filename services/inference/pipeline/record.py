"""The record stage: one usage event per request, whatever served it.

- `record_computed`: a request that ran its own sequences (today's path, a
  cache miss, the request that led a coalesced computation): the tokens it
  sent its caller, its choices' timing, policy hits and samples, quality
  metrics and GenAI span attributes; the budget reservation is reconciled.
- `record_served`: a request answered without computing (a cache hit, or a
  waiter of another request's computation): `cached: true`, `usage` the
  tokens billed under TOKENMESH_CACHE_BILLING, `served_usage` what the
  caller received (reports show the difference as the cache's saving).
"""

from __future__ import annotations

import time

from services.inference import genai_spans, quality
from services.inference.admission import Admission, token_usage
from services.inference.pipeline.cache import billed
from services.inference.scheduler import refused_by_unload, refused_unstarted
from services.inference.v2 import prompting
from services.inference.v2.choices import Generation
from tokenmesh.inference.v1 import inference_pb2 as v1_pb


def record_computed(
    admission: Admission,
    generation: Generation,
    completion_tokens: int | None = None,
    finish_reason: str | None = None,
) -> None:
    """Records a request that computed (see the module docstring).

    Args:
        admission: where usage is recorded.
        generation: the request.
        completion_tokens: the tokens its caller received (default: what it sent).
        finish_reason: overrides its choices' (a caller that left a shared computation).
    """
    seqs = [choice.seq for choice in generation.choices]
    if refused_unstarted(seqs):
        # Refused while queued (its version unloading): nothing ran, nothing is billed,
        # as for a request its submit refused; the edge tries it again elsewhere.
        admission.release(generation)
        return
    if refused_by_unload(seqs) and not generation.streamed:
        # One choice refused while queued, after a sibling started (n > 1): the request
        # failed with the refusal before anything reached its caller, who (or the edge,
        # trailers-only) tries all of it again elsewhere, billed there. Recorded apart
        # (what its siblings computed), billed nothing, as a prompt refused beside a
        # sibling that ran is (generate.complete_all). Billed, the retry paid twice.
        admission.note_retried(generation)
    timings = [c.timing() for c in generation.choices]
    timing = v1_pb.Timing(
        queue_ms=min((t.queue_ms for t in timings), default=0.0),
        time_to_first_token_ms=min(
            (t.time_to_first_token_ms for t in timings if t.time_to_first_token_ms),
            default=0.0,
        ),
        total_ms=(time.monotonic() - generation.started) * 1000,
    )
    sent = generation.sent_tokens if completion_tokens is None else completion_tokens
    usage = token_usage(generation.prompt_tokens, sent)
    event = generation.usage_event(usage, finish_reason or generation.finish_reason(), timing)
    event.cached_prompt_tokens = generation.cached_prompt_tokens  # priced apart in reports
    template = prompting.template_ref(generation.template)
    if template is not None:
        event.template.CopyFrom(template)
    generation.content.record(event, generation.content.outputs(len(generation.choices)))
    admission.record(generation, event)
    quality.observe_generation(generation)
    genai_spans.annotate_generation(generation)


def record_served(
    admission: Admission,
    generation: Generation,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str,
    first_token_ms: float,
    billing: str,
) -> None:
    """Records a request answered from the cache or another request's computation."""
    timing = v1_pb.Timing(
        time_to_first_token_ms=first_token_ms,
        total_ms=(time.monotonic() - generation.started) * 1000,
    )
    usage = token_usage(*billed(prompt_tokens, completion_tokens, billing))
    event = generation.usage_event(usage, finish_reason, timing)
    event.cached = True
    event.served_usage.CopyFrom(token_usage(prompt_tokens, completion_tokens))
    template = prompting.template_ref(generation.template)
    if template is not None:
        event.template.CopyFrom(template)
    generation.content.record(event)
    admission.record(generation, event)
