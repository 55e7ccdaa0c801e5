"""The schedule-and-stream stage: a submitted generation's deltas as v2 messages.

v2 messages are the pipeline's currency: the v2 servicer sends them as they
are, the v1 servicer and the OpenAI surface translate them, and the response
cache stores and replays them. `produce` yields a Generate stream's messages
(a delta per message, the choice's outcome on its final one); `collect`
gathers a Complete response. Neither records usage: the record stage does,
once per request (services.inference.pipeline.record).

Content policy on output is in the deltas themselves
(`Generation.deltas` wraps them in the request's output filter when a rule
applies), so every surface and the cache see filtered text only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence

from services.core.errors import TokenmeshError
from services.core.interceptors import to_domain_error
from services.inference.admission import Admission
from services.inference.logprobs import TokenLogprob, token_bytes
from services.inference.tokenizer import Tokenizer
from services.inference.v2 import prompting
from services.inference.v2.choices import Choice, ChoiceTiming, Generation
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb

FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "error": inference_pb2.FINISH_REASON_ERROR,
    "quota": inference_pb2.FINISH_REASON_QUOTA,
    "content_filter": inference_pb2.FINISH_REASON_CONTENT_FILTER,
}

REASON_NAMES: dict[int, str] = {int(number): name for name, number in FINISH_REASONS.items()}


def finish_reason_name(reason: int) -> str:
    """Returns the lower-case name of a v2 finish reason ("" when unknown)."""
    return REASON_NAMES.get(int(reason), "")


class StreamAborted(Exception):
    """StreamAborted ends a stream that failed after it sent messages (finals already sent).

    The transport ends the RPC with `error`'s status.
    """

    def __init__(self, error: TokenmeshError) -> None:
        super().__init__(error.message)
        self.error = error


def usage_pb(generation: Generation, completion_tokens: int) -> inference_pb2.Usage:
    """Returns a v2 Usage: the prompt once, `completion_tokens`, and what the cache served."""
    return inference_pb2.Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=generation.prompt_tokens + completion_tokens,
        cached_prompt_tokens=generation.cached_prompt_tokens,
    )


def timing_pb(timing: ChoiceTiming) -> inference_pb2.Timing:
    """Returns a choice's timing as a protobuf message."""
    return inference_pb2.Timing(
        queue_ms=timing.queue_ms,
        prefill_ms=timing.prefill_ms,
        time_to_first_token_ms=timing.time_to_first_token_ms,
        decode_ms=timing.decode_ms,
        total_ms=timing.total_ms,
        output_tokens_per_second=timing.output_tokens_per_second,
    )


def logprobs_pb(
    items: Sequence[TokenLogprob],
    tokenizer: Tokenizer,
    refused: Callable[[str], bool] | None = None,
) -> list[inference_pb2.TokenLogprob]:
    """Returns tokens' log-probabilities with their text (one token decoded alone) and bytes.

    Only requests that ask for logprobs come here, so only they pay for the
    text and bytes of each token and alternative. `refused`: whether an
    alternative's text is left out (an output rule matches it: the filter judges
    the answer's text, not the tokens it did not take).
    """
    pieces = tokenizer.piece_bytes()
    messages = []
    for item in items:
        text = tokenizer.decode([item.token_id])
        message = inference_pb2.TokenLogprob(
            token=text,
            token_id=item.token_id,
            logprob=item.logprob,
            token_bytes=token_bytes(pieces, item.token_id, text),
        )
        for token_id, logprob in item.top:
            top_text = tokenizer.decode([token_id])
            if refused is not None and refused(top_text):
                continue
            message.top_logprobs.add(
                token=top_text,
                token_id=token_id,
                logprob=logprob,
                token_bytes=token_bytes(pieces, token_id, top_text),
            )
        messages.append(message)
    return messages


def _refused(generation: Generation) -> Callable[[str], bool] | None:
    """Returns what judges top_logprobs alternatives (None: no output rule applies)."""
    content = generation.content
    return content.refuses_alternative if content.judges_alternatives else None


def final(
    message: pb.GenerateResponse,
    generation: Generation,
    choice: Choice,
    reason: str,
    completion_tokens: int,
) -> pb.GenerateResponse:
    """Makes `message` the choice's final message: outcome, cumulative usage, timing."""
    choice.finish_reason = reason
    message.finish_reason = FINISH_REASONS[reason]
    message.finish_message = generation.content.finish_message(choice.index)
    message.usage.CopyFrom(usage_pb(generation, completion_tokens))
    message.timing.CopyFrom(timing_pb(choice.timing()))
    message.model.CopyFrom(generation.model_ref())
    template = prompting.template_ref(generation.template)
    if template is not None:
        message.template.CopyFrom(template)
    if choice.confidence.logprobs:
        message.confidence = choice.confidence.score
        message.mean_logprob = choice.confidence.mean_logprob
    return message


def finals(
    generation: Generation,
    reason: str,
    error: TokenmeshError | None = None,
    choices: Sequence[Choice] | None = None,
) -> list[pb.GenerateResponse]:
    """Returns a final message for every running choice, or each of `choices` (they end
    with `reason`)."""
    return [
        final(
            pb.GenerateResponse(
                choice_index=running.index,
                request_id=generation.request_id,
                error=None if error is None else error.to_status(),
            ),
            generation,
            running,
            reason,
            generation.sent_tokens,
        )
        for running in (generation.running() if choices is None else choices)
    ]


def quota_finals(
    generation: Generation, choice_indexes: Sequence[int], completion_tokens: int
) -> list[pb.GenerateResponse]:
    """Returns "quota" final messages of a reader of a shared computation whose own
    budget ran out: the computation's choices run on for the others (untouched)."""
    usage = usage_pb(generation, completion_tokens)
    return [
        pb.GenerateResponse(
            choice_index=index,
            request_id=generation.request_id,
            finish_reason=FINISH_REASONS["quota"],
            usage=usage,
            model=generation.model_ref(),
        )
        for index in choice_indexes
    ]


def delta_pb(
    generation: Generation, choice: Choice, text: str, token_ids: list[int]
) -> pb.GenerateResponse:
    """Returns a delta message of one choice."""
    message = pb.GenerateResponse(
        choice_index=choice.index,
        text=text,
        token_ids=token_ids,
        request_id=generation.request_id,
    )
    items = choice.take_logprobs(len(token_ids))
    if generation.spec.logprobs:
        message.logprobs.extend(logprobs_pb(items, generation.tokenizer, _refused(generation)))
    return message


def _alone() -> bool:
    return False


async def _within_budget(
    admission: Admission, generation: Generation, shared: Callable[[], bool]
) -> bool:
    """Tells whether an unmetered generation may go on (charging it what it used so far).

    A computation others read too (coalesced waiters, each holding its own budget)
    is not ended by its leader's budget: that ended every waiter's answer with
    "quota". A Generate leader's own stream is checked as it reads instead
    (GenerationPipeline._lead_stream); a Complete leader, answered in one message,
    is charged what it was billed when it is recorded.
    """
    if shared():
        return True
    used = generation.prompt_tokens + generation.sent_tokens
    return await admission.within_budget(generation, used)


async def produce(
    admission: Admission,
    generation: Generation,
    shared: Callable[[], bool] = _alone,
    *,
    headers_out: bool = False,
) -> AsyncGenerator[pb.GenerateResponse, None]:
    """Yields a submitted generation's Generate messages; counts what the caller accepted.

    `shared`: tells whether other requests read this computation too (its
    caller's budget then does not end it).

    `headers_out`: the caller's response headers went out before its first
    message (a v1 or v2 stream sends them once it is queued): a failure before
    that message is told in-band too. Its REST client has its 200 and reads SSE
    events only; a status alone came as a bare JSON line after the headers,
    which SSE readers drop: zero events. False for a caller that holds them
    until its first message (the OpenAI servicer, which answers an earlier
    failure with an HTTP error of its own) and for a shared computation (its
    waiters compute their own when it fails before its first message; its
    leader tells its own client: pipeline.generate).

    While it runs with its caller's headers out, the generation is in
    `admission.open_streams`: the worker's shutdown ends it in-band before its
    grace is over (`end_streams`).

    Raises:
        StreamAborted: it failed after messages were sent, or with its headers out
            (each running choice's final message, with the error, was yielded first).
        Exception: it failed before any message and any header (a plain status
            says it all).
    """
    deltas = generation.deltas()
    streamed = False
    if headers_out:
        track(admission, generation)
    try:
        async for choice, delta in deltas:
            # Only a stream admitted while budgets were unreachable is charged as it
            # goes (checked here: no coroutine a message for every other stream).
            if generation.unmetered and not await _within_budget(admission, generation, shared):
                await deltas.aclose()  # frees every sequence's slot
                for message in finals(generation, "quota"):
                    yield message
                return
            message = delta_pb(generation, choice, delta.text, delta.token_ids)
            count = len(delta.token_ids)
            if delta.finish_reason:
                total = generation.sent_tokens + count
                final(message, generation, choice, delta.finish_reason, total)
            yield message
            generation.sent_tokens += count
            if not streamed:  # its caller's headers are out now too (it sent a message)
                streamed = generation.streamed = True
                track(admission, generation)
    except asyncio.CancelledError:
        generation.end_running("cancelled")
        raise
    except Exception as exc:
        if not (streamed or headers_out):
            generation.end_running("error")
            raise
        error = to_domain_error(exc, "Generate")
        for message in finals(generation, "error", error):
            yield message
        raise StreamAborted(error) from exc
    finally:
        admission.open_streams.discard(generation)
        await deltas.aclose()


def track(admission: Admission, generation: Generation) -> None:
    """Puts a stream whose caller's headers went out in `admission.open_streams`, for
    the worker's shutdown to end in-band (`end_streams`); ends it at once when that
    shutdown already ended the others (it went out after: a request that waited for
    its slot, a cache leader whose computation started late)."""
    admission.open_streams.add(generation)
    if admission.streams_ended_by is not None:
        end_streams([generation], admission.streams_ended_by)


def end_streams(generations: Iterable[Generation], error: TokenmeshError) -> int:
    """Ends every running choice of these streams with `error` now; returns how many
    streams had one.

    Each stream's `produce` then yields its running choices' final messages with
    `error` and raises StreamAborted: the RPC ends with a final message and
    `error`'s status, billed what it sent. The worker's shutdown does so shortly
    before its grace is over (services.inference.service): grpc then cancelled
    them, UNAVAILABLE "Cancelling all calls" and no final message, which a
    client could not tell from a crash.
    """
    ended = 0
    for generation in list(generations):
        running = generation.running()
        for choice in running:
            generation.scheduler.end(choice.seq, error)
        ended += bool(running)
    return ended


async def collect(
    admission: Admission, generation: Generation, shared: Callable[[], bool] = _alone
) -> pb.CompleteResponse:
    """Runs a submitted generation to its end; returns the Complete response.

    `shared`: as `produce`'s.
    """
    outputs = {c.index: inference_pb2.Choice(index=c.index) for c in generation.choices}
    deltas = generation.deltas()
    try:
        async for choice, delta in deltas:
            if generation.unmetered and not await _within_budget(admission, generation, shared):
                generation.end_running("quota")
                break
            output = outputs[choice.index]
            output.token_ids.extend(delta.token_ids)
            items = choice.take_logprobs(len(delta.token_ids))
            if generation.spec.logprobs:
                output.logprobs.extend(
                    logprobs_pb(items, generation.tokenizer, _refused(generation))
                )
            output.text += delta.text
            generation.sent_tokens += len(delta.token_ids)
            if delta.finish_reason:
                choice.finish_reason = delta.finish_reason
    except asyncio.CancelledError:
        generation.end_running("cancelled")
        raise
    except Exception:
        generation.end_running("error")
        raise
    finally:
        await deltas.aclose()
    return complete_response(generation, outputs)


def complete_response(
    generation: Generation, outputs: dict[int, inference_pb2.Choice]
) -> pb.CompleteResponse:
    """Returns the Complete response of a generation whose choices have ended."""
    for choice in generation.choices:
        output = outputs[choice.index]
        output.finish_reason = FINISH_REASONS[choice.finish_reason or "cancelled"]
        output.timing.CopyFrom(timing_pb(choice.timing()))
        if choice.confidence.logprobs:
            output.confidence = choice.confidence.score
            output.mean_logprob = choice.confidence.mean_logprob
        output.finish_message = generation.content.finish_message(choice.index)
    return pb.CompleteResponse(
        choices=[outputs[i] for i in sorted(outputs)],
        usage=usage_pb(generation, generation.sent_tokens),
        model=generation.model_ref(),
        template=prompting.template_ref(generation.template),
        request_id=generation.request_id,
    )
