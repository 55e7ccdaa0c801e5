"""tokenmesh.openai.v1.OpenAIService: OpenAI's JSON in, OpenAI's bytes out, v2 inside.

Each RPC reads the raw request (services.inference.openai.params), calls the
inference v2 servicer's own RPC with the equivalent v2 request (so routing,
budgets, scheduling, logprobs and usage records are v2's, one code path),
and writes OpenAI's objects (services.inference.openai.shapes): one JSON body,
or one Server-Sent Event per HttpBody message.

Response headers wait for the first body (`_ResponseContext`): an error
before it is a status with OpenAI's error JSON in the trailing metadata,
which the edge turns into the response body; an error after it is a last
`data: {"error": ...}` event, then the status. Once v2 sent its headers (the
work started and is billed), they go out before the error: without them the
error is trailers-only, which Envoy retries (UNAVAILABLE, CANCELLED), running
and billing the request again.

A non-streamed answer is one JSON body; chat and legacy completions (server
streams) write it as several HttpBody messages of at most BODY_CHUNK_BYTES,
which the transcoder passes on as they come: one message of the whole answer
had to fit the edge's buffer (1 MiB), and a larger one became a 500.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from typing import Any, TypeVar, cast

import grpc
from google.api.httpbody_pb2 import HttpBody

from gateway import model_routing
from services.core import contract
from services.core.errors import TokenmeshError
from services.core.interceptors import Context, abort_with, request_headers, to_domain_error
from services.core.model_access import check_model_allowed
from services.inference import validation as v1_validation
from services.inference.admission import route_target, visible_models
from services.inference.openai import errors, params, shapes
from services.inference.openai.params import GenerationCall, Renames
from services.inference.v2.servicer import InferenceServicer as V2Servicer
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.openai.v1 import openai_service_pb2 as pb
from tokenmesh.openai.v1 import openai_service_pb2_grpc
from tokenmesh.type.v1 import types_pb2

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OpenAIService"].full_name
CHAT_RPC = f"/{SERVICE_NAME}/CreateChatCompletion"
COMPLETION_RPC = f"/{SERVICE_NAME}/CreateCompletion"
EMBEDDING_RPC = f"/{SERVICE_NAME}/CreateEmbedding"
MODELS_RPC = f"/{SERVICE_NAME}/ListModels"
MODEL_RPC = f"/{SERVICE_NAME}/GetModel"
# Response headers the v2 servicer sends that name the serving version (and the
# model, when a fallback serves).
VERSION_HEADER = model_routing.VERSION_HEADER
FALLBACK_MODEL_HEADER = model_routing.MODEL_HEADER
# The largest HttpBody message of a non-streamed chat or legacy completion. The
# transcoder buffers each message whole (within the edge's 1 MiB buffer) before it
# passes its bytes on; an answer's size has no bound of its own (n x max_tokens x
# top_logprobs), so the worker splits it (tests/e2e/test_openai_large_answers.py).
BODY_CHUNK_BYTES = 256 * 1024
# Sent with an error after work started: OpenAI's SDKs read `x-should-retry`
# before their own retry rules (openai-python's _base_client._should_retry).
NO_CLIENT_RETRY = (contract.SHOULD_RETRY_HEADER, "false")
# Refusals of a request before any of it ran, or of one of which nothing is billed
# although part of it ran: a multi-prompt completion's later prompt refused
# (pipeline.generate.complete_all), or one of n choices refused by the unload after
# a sibling started (pipeline.record): tried again elsewhere, all of it.
REFUSALS = frozenset({"QUEUE_FULL", "MODEL_UNLOADING"})


def _cache_status(held: Sequence[tuple[str, str]], more: Sequence[tuple[str, str]]) -> str:
    """Returns the x-tokenmesh-cache of a request whose prompts said these: the same
    word when they agree, else `miss` when any computed (miss, bypass), else
    `coalesced` (nothing computed, something awaited)."""
    first = dict(held).get(contract.CACHE_HEADER, "")
    second = dict(more).get(contract.CACHE_HEADER, "")
    if first == second:
        return first
    return "miss" if {first, second} & {"miss", "bypass"} else "coalesced"


class _ResponseContext:
    """The RPC's context as the v2 servicer sees it: its response headers wait for ours.

    v2 sends response headers (request id, serving version) when generation
    starts. Held back until the first body (once a body went out a REST client
    only sees the 200). An error before it carries OpenAI's error JSON in its
    trailers, which the edge makes the body; it is sent after those headers
    when v2 sent them: the work started (and was billed), and a trailers-only
    UNAVAILABLE or CANCELLED is retried by Envoy on a worker that runs and
    bills it again (as services.core.interceptors' HeadersAtEnd does for v2).
    An error before any work (a bad request, a refusal) stays trailers-only.
    A legacy completion's several prompts (several v2 calls) send them once.
    """

    def __init__(self, context: Context) -> None:
        self._context = context
        self.headers: tuple[tuple[str, str], ...] = ()
        self.sent = False
        self.error_json = ""
        self.refused = False  # the error is a refusal: nothing of the request was billed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def header(self, name: str) -> str:
        """Returns a response header v2 sent ("" when absent)."""
        return next((v for k, v in self.headers if k == name), "")

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        if not self.headers:
            self.headers = tuple(metadata)
        elif not self.sent:
            # Another prompt of a legacy completion, before any body: its cache status
            # joins the first's (which alone said `hit` for prompts mostly computed).
            # A stream's later prompts come after its headers went: they keep the first's.
            status = _cache_status(self.headers, metadata)
            self.headers = tuple(
                (k, status if k == contract.CACHE_HEADER else v) for k, v in self.headers
            )

    async def flush(self) -> None:
        """Sends the held response headers (before the first body)."""
        if not self.sent:
            self.sent = True
            await self._context.send_initial_metadata(self.headers)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        extra: tuple[tuple[str, str], ...] = ()
        if self.error_json:  # set only while no body went out (`fail`)
            extra = ((contract.OPENAI_ERROR_HEADER, self.error_json),)
        # v2 sent them: the work started (see the class). Not for a refusal: a
        # multi-prompt completion whose later prompt was refused (its queue full, its
        # version unloading) after an earlier one had started bills nothing, nor does a
        # request of n choices one of which the unload refused after another started;
        # the edge (and the SDK) may try it again elsewhere.
        if self.headers and not self.refused:
            # OpenAI's SDKs retry a 5xx (twice, by default) unless told not to: each
            # retry would run, and bill, the request again.
            if not self.sent:
                self.headers = (*self.headers, NO_CLIENT_RETRY)
            await self.flush()
        await self._context.abort(code, details, (*tuple(trailing_metadata), *extra))

    def fail(
        self, exc: Exception, rpc: str, renames: Renames
    ) -> tuple[TokenmeshError, HttpBody | None]:
        """Returns `exc` as the error to abort with and, when output started, the
        stream's last event; before that the error JSON goes with the status."""
        error = errors.renamed(to_domain_error(exc, rpc), renames)
        self.refused = error.reason in REFUSALS
        body = errors.from_error(error)
        if self.sent:
            return error, HttpBody(data=shapes.sse(body))
        self.error_json = errors.header_value(body)
        return error, None


def _generator(stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Returns an async generator RPC method's stream as what it is (it can be closed)."""
    return cast(AsyncGenerator[T, None], stream)


def _json(value: shapes.Json) -> HttpBody:
    return HttpBody(content_type=shapes.JSON, data=shapes.json_bytes(value))


def _json_parts(value: shapes.Json) -> Iterator[HttpBody]:
    """Yields a server stream's one JSON answer in messages of at most BODY_CHUNK_BYTES,
    the content type on the first (the transcoder forwards each one's bytes as they are)."""
    data = shapes.json_bytes(value)
    for start in range(0, len(data), BODY_CHUNK_BYTES):
        part = data[start : start + BODY_CHUNK_BYTES]
        yield HttpBody(content_type=shapes.JSON, data=part) if not start else HttpBody(data=part)


class _Stream:
    """_Stream writes one request's Server-Sent Events (content type on the first)."""

    def __init__(self) -> None:
        self.started = False

    def event(self, value: shapes.Json | bytes) -> HttpBody:
        data = value if isinstance(value, bytes) else shapes.sse(value)
        if self.started:
            return HttpBody(data=data)
        self.started = True
        return HttpBody(content_type=shapes.EVENT_STREAM, data=data)


class OpenAIServicer(openai_service_pb2_grpc.OpenAIServiceServicer):
    """OpenAIServicer serves tokenmesh.openai.v1.OpenAIService on the v2 servicer.

    Args:
        v2: the worker's inference v2 servicer (its admission: routing, budgets, usage).
    """

    def __init__(self, v2: V2Servicer) -> None:
        self.v2 = v2
        self.registry = v2.registry
        self.started = int(time.time())  # the models' `created`

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> HttpBody:
        models = self.v2.admission.mesh_models
        names, _ = visible_models(models, context, "", v1_validation.MAX_PAGE_SIZE)
        ids: list[str] = []
        for name in names:
            ids.append(name)
            ids.extend(f"{name}@{v.version}" for v in models.describe(name).versions)
        return _json(shapes.model_list(ids, self.started))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> HttpBody:
        ctx = _ResponseContext(context)
        try:
            name, version = params.parse_model_id(request.model)
            v1_validation.validate_model_name(name)
            headers = request_headers(context)
            check_model_allowed(headers, name)
            # The edge routes the lookup as the model's requests (an alias resolved
            # to its version, which only the routes know); a direct call resolves it here.
            route_target(self.registry, headers, name, version)
            return _json(shapes.model(request.model, self.started))
        except Exception as exc:
            error, _ = ctx.fail(exc, MODEL_RPC, Renames())
            await abort_with(cast(Context, ctx), error)
            raise

    async def CreateEmbedding(self, request: HttpBody, context: Context) -> HttpBody:
        ctx = _ResponseContext(context)
        try:
            call = params.parse_embedding(params.call_body(request))
            response = await self.v2.Embed(call.request, cast(Context, ctx))
            body = _json(shapes.embeddings(response, call.base64))
            await ctx.flush()
            return body
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error, _ = ctx.fail(exc, EMBEDDING_RPC, Renames(input="input"))
            await abort_with(cast(Context, ctx), error)
            raise  # not reached: abort_with raised

    async def CreateChatCompletion(
        self, request: HttpBody, context: Context
    ) -> AsyncIterator[HttpBody]:
        async for body in self._serve(request, context, params.parse_chat, CHAT_RPC):
            yield body

    async def CreateCompletion(
        self, request: HttpBody, context: Context
    ) -> AsyncIterator[HttpBody]:
        async for body in self._serve(request, context, params.parse_completion, COMPLETION_RPC):
            yield body

    async def _serve(
        self, request: HttpBody, context: Context, parse: Any, rpc: str
    ) -> AsyncIterator[HttpBody]:
        ctx = _ResponseContext(context)
        # Before the body is read too (its own problems): a legacy completion's
        # input is `prompt` (a problem with it was reported as `messages`).
        renames = Renames() if rpc == CHAT_RPC else Renames("max_tokens", "prompt", "logprobs")
        try:
            # Parsed once: the request limits read it already for an edge call.
            call: GenerationCall = parse(params.call_body(request))
            renames = call.renames
            bodies = _generator(self._bodies(call, ctx, chat=rpc == CHAT_RPC))
            async with aclosing(bodies):
                async for body in bodies:
                    await ctx.flush()
                    yield body
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error, last = ctx.fail(exc, rpc, renames)
            if last is not None:
                yield last
            await abort_with(cast(Context, ctx), error)

    def _bodies(
        self, call: GenerationCall, ctx: _ResponseContext, *, chat: bool
    ) -> AsyncIterator[HttpBody]:
        if chat:
            return self._chat_stream(call, ctx) if call.stream else self._chat_once(call, ctx)
        if call.stream:
            return self._completion_stream(call, ctx)
        return self._completion_once(call, ctx)

    async def _chat_once(
        self, call: GenerationCall, ctx: _ResponseContext
    ) -> AsyncIterator[HttpBody]:
        created = int(time.time())
        [request] = call.complete_requests()
        response = await self.v2.Complete(request, cast(Context, ctx))
        for part in _json_parts(shapes.chat_completion(response, created)):
            yield part

    def _served(self, ctx: _ResponseContext, request: v2_pb.GenerateRequest) -> types_pb2.ModelRef:
        """Returns the version serving a stream, from v2's response headers."""
        name = ctx.header(FALLBACK_MODEL_HEADER) or request.model
        return types_pb2.ModelRef(name=name, version=ctx.header(VERSION_HEADER))

    async def _chat_stream(
        self, call: GenerationCall, ctx: _ResponseContext
    ) -> AsyncIterator[HttpBody]:
        created = int(time.time())
        [request] = call.generate_requests()
        stream = _Stream()
        chat: shapes.ChatShapes | None = None
        begun: set[int] = set()
        totals = inference_pb2.Usage()
        failed = False
        messages = _generator(self.v2.Generate(request, cast(Context, ctx)))
        async with aclosing(messages):
            async for message in messages:
                if chat is None:
                    served = self._served(ctx, request)
                    chat = shapes.ChatShapes(message.request_id, created, served)
                    if not message.HasField("error"):
                        # Every choice opens with its role, in index order, before any
                        # text, as OpenAI and vLLM frame it: a choice opened when its
                        # first text came (an output rule holds each choice's apart)
                        # could come before choice 0, and the SDK's stream helper
                        # (chat.completions.stream) failed with an IndexError.
                        for opened in range(max(1, request.n)):
                            begun.add(opened)
                            role = {"role": "assistant", "content": ""}
                            yield stream.event(
                                chat.chunk(opened, role, None, None, call.include_usage)
                            )
                if message.HasField("error"):
                    if not failed:  # every running choice ends with the same error
                        failed = True
                        yield stream.event(errors.from_status(message.error))
                    continue
                index = message.choice_index
                if message.text or message.token_ids or index not in begun:
                    delta = {"content": message.text}
                    if index not in begun:
                        begun.add(index)
                        delta = {"role": "assistant", **delta}
                    logprobs = shapes.chat_logprobs(message.logprobs) if call.logprobs else None
                    yield stream.event(chat.chunk(index, delta, logprobs, None, call.include_usage))
                if message.HasField("finish_reason"):
                    totals = message.usage
                    reason = shapes.finish_reason(message.finish_reason)
                    yield stream.event(chat.chunk(index, {}, None, reason, call.include_usage))
        if chat is None:
            return
        if call.include_usage:
            yield stream.event(chat.usage_chunk(shapes.usage([totals])))
        yield stream.event(shapes.DONE)

    async def _completion_once(
        self, call: GenerationCall, ctx: _ResponseContext
    ) -> AsyncIterator[HttpBody]:
        created = int(time.time())
        requests = call.complete_requests()
        pipeline, context = self.v2.pipeline, cast(Context, ctx)
        if len(requests) == 1:
            responses = [await pipeline.complete(context, requests[0])]
        else:
            # Every prompt passes validation, the context length and input policy,
            # then its budget and the queue, before any runs: a refused one fails the
            # request before its siblings are computed (and billed for an answer the
            # client never gets). GenerationPipeline.complete_all says what remains.
            admitted = [await pipeline.admit(context, r, "Complete") for r in requests]
            responses = await pipeline.complete_all(context, requests, admitted)
        n = max(1, requests[0].n)
        for part in _json_parts(shapes.text_completion(responses, n, call.logprobs, created)):
            yield part

    async def _completion_stream(
        self, call: GenerationCall, ctx: _ResponseContext
    ) -> AsyncIterator[HttpBody]:
        created = int(time.time())
        stream = _Stream()
        shaper: shapes.CompletionShapes | None = None
        usages: list[inference_pb2.Usage] = []
        requests = call.generate_requests()
        n = max(1, requests[0].n)
        failed = False
        for p, request in enumerate(requests):  # prompts one after the other
            offsets: dict[int, int] = {}
            totals = inference_pb2.Usage()
            messages = _generator(self.v2.Generate(request, cast(Context, ctx)))
            async with aclosing(messages):
                async for message in messages:
                    if shaper is None:
                        served = self._served(ctx, request)
                        shaper = shapes.CompletionShapes(message.request_id, created, served)
                    if message.HasField("error"):
                        if not failed:  # v2 aborts with the status next
                            failed = True
                            yield stream.event(errors.from_status(message.error))
                        continue
                    index = p * n + message.choice_index
                    offset = offsets.get(index, 0)
                    offsets[index] = offset + len(message.text)
                    logprobs = (
                        shapes.completion_logprobs(message.logprobs, offset)
                        if call.logprobs
                        else None
                    )
                    finish = None
                    if message.HasField("finish_reason"):
                        finish = shapes.finish_reason(message.finish_reason)
                        totals = message.usage
                    choice = shaper.text_choice(index, message.text, logprobs, finish)
                    yield stream.event(shaper.text_completion([choice], None))
            usages.append(totals)
        if shaper is None:
            return
        if call.include_usage:
            yield stream.event({**shaper.text_completion([], None), "usage": shapes.usage(usages)})
        yield stream.event(shapes.DONE)
