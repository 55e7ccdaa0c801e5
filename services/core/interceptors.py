"""The server's single error boundary, with per-RPC Prometheus metrics.

Every handler runs inside `BoundaryInterceptor`: domain errors become a gRPC
status with google.rpc details, unexpected exceptions become a generic
INTERNAL (traceback logged here, never sent), and each RPC is counted and
timed by method and status code. The interceptor also decodes unary
requests itself, so that bytes that are not the request message (corrupt
protobuf, a string field that is not UTF-8) are INVALID_ARGUMENT naming the
message, not grpc's UNKNOWN "Unexpected <class ...DecodeError>".

It also keeps API versions' life cycle (services/core/api_versions.py): each
tokenmesh RPC is counted by API version, a deprecated version's responses
carry Deprecation/Sunset/Link, and after its sunset it answers
UNIMPLEMENTED (REST 410) before its handler runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from grpc_status import rpc_status
from prometheus_client import Counter, Histogram

from services.core import contract
from services.core.api_versions import DeprecationSchedule, VersionPolicy, parse_rpc
from services.core.errors import (
    FieldViolation,
    InvalidArgument,
    TokenmeshError,
    Unavailable,
    Unimplemented,
    internal_error,
)
from services.core.identity import Authorizer
from services.core.metadata import request_metadata
from services.core.store_errors import STORE_UNREACHABLE, is_store_refusal

logger = logging.getLogger(__name__)

RPC_TOTAL = Counter(
    "tokenmesh_rpc_total", "Finished RPCs by method and status code.", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "tokenmesh_rpc_duration_seconds",
    "RPC duration (for streams: until the last message).",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

API_REQUESTS = Counter(
    "tokenmesh_api_requests_total",
    "RPCs received by API (inference, auth, ...), API version (v1, v2) and RPC name; "
    "counted on arrival, so calls to a retired version count too.",
    ["api", "api_version", "rpc"],
)

Context = grpc.aio.ServicerContext[Any, Any]
#: STREAM_OPENER: an inner interceptor's streaming handler (an async generator
#: function, so grpc can call it directly) may carry, under this attribute, a
#: coroutine function `(request, context) -> AsyncIterator` that does the same
#: setup and returns the stream to send without a generator of its own: the
#: boundary then iterates that stream itself, one re-yield per message fewer.
STREAM_OPENER = "tokenmesh_open_stream"
Clock = Callable[[], float]
Handler = Callable[..., Any]
Decoder = Callable[[bytes], Any]


def request_headers(context: Context) -> Mapping[str, str]:
    """Returns the request metadata as a lower-case mapping (text values only; read once
    per call, shared: never modify it)."""
    return request_metadata(context).headers


def to_domain_error(exc: BaseException, method: str) -> TokenmeshError:
    """Maps any exception to the most specific client-safe error."""
    if isinstance(exc, TokenmeshError):
        return exc
    if isinstance(exc, NotImplementedError):
        return Unimplemented(f"{method} is not implemented yet")
    if isinstance(exc, STORE_UNREACHABLE):
        # Redis out of reach (or too slow to answer) is transient, not our bug:
        # clients may retry. It was INTERNAL, e.g. ListWorkers while Redis stalled.
        logger.warning("%s: Redis unavailable (%s)", method, exc)
        return _store_unavailable()
    if is_store_refusal(exc):
        # So is a Redis refusing for now (READONLY during a failover, OOM at
        # maxmemory): it was INTERNAL with a traceback per call, and clients did
        # not retry what passes by itself.
        logger.warning("%s: Redis refused (%s: %s)", method, type(exc).__name__, exc)
        return _store_unavailable()
    logger.exception("unhandled error in %s", method, exc_info=exc)
    return internal_error()


def _store_unavailable() -> Unavailable:
    return Unavailable("a backing store is unavailable; retry shortly", retry_after_s=1.0)


async def abort_with(context: Context, error: TokenmeshError) -> None:
    """Ends the RPC with `error`'s status and google.rpc details, keeping the trailing
    metadata the RPC set before (grpc.aio's abort replaces it)."""
    status = rpc_status.to_status(error.to_status())
    kept = getattr(context, "trailing_metadata", None)
    metadata = (*tuple((kept() if kept is not None else None) or ()), *status.trailing_metadata)
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        # REST clients behind the transcoder see this as a Retry-After header.
        # Rounded up: a client retrying after a rounded-down wait is refused again.
        metadata += (("retry-after", str(max(1, math.ceil(retry_after)))),)
    http_status = getattr(error, "http_status", None)
    if http_status is not None:
        # The edge answers REST clients this status instead of the code's mapping.
        metadata += ((contract.HTTP_STATUS_HEADER, str(http_status)),)
    await context.abort(status.code, status.details, metadata)


def request_decoder(deserializer: Callable[[bytes], Any] | None) -> Decoder | None:
    """Wraps a request deserializer so that undecodable bytes raise InvalidArgument."""
    if deserializer is None:
        return None
    message = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(message, "full_name", "the request message")

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            problem = "a string field is not UTF-8" if "UTF-8" in str(exc) else "malformed"
            raise InvalidArgument(
                [FieldViolation("request", f"is not a valid {name} ({problem})")],
                reason="UNDECODABLE_REQUEST",
            ) from None

    return decode


# How near its deadline a cancelled call counts as timed out: grpc cancels the
# handler when its deadline timer fires, but time_remaining() reads the wall
# clock, which may be a few microseconds behind that timer.
DEADLINE_SLACK_S = 0.005


def cancellation_code(context: Context) -> str:
    """Names why grpc cancelled a handler: its deadline passed (DEADLINE_EXCEEDED),
    else CANCELLED (the client cancelled, or the server stopped past its grace).

    grpc sets no status on the context then, so without this the call counted as
    OK: the availability SLO never saw a worker too slow for its callers.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name


def _code_name(context: Context, failed: TokenmeshError | None, ended: str | None) -> str:
    if failed is not None:
        return failed.code.name
    if ended is not None:
        return ended
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if code in (None, 0) else str(code)


def _add_trailing_metadata(context: Context, pairs: tuple[tuple[str, Any], ...]) -> None:
    """Adds `pairs` after the trailing metadata the RPC set before (grpc.aio's setter
    replaces it)."""
    kept = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata((*kept, *pairs))


class _AnnouncingContext:
    """The RPC's context, adding a deprecated version's headers to what the RPC sends first.

    They join the initial metadata (REST: the response headers, also of an SSE
    stream), whether the handler sends it or the boundary does before the first
    response; an RPC that fails before sending any carries them in its error's
    trailing metadata (a trailers-only response, which REST also sees as headers).
    """

    def __init__(self, context: Context, headers: tuple[tuple[str, str], ...]) -> None:
        self._context = context
        self._headers = headers
        self._sent = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    @property
    def sent(self) -> bool:
        """Tells whether the headers went out (or wait in the error's trailers)."""
        return self._sent

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._sent = True
        await self._context.send_initial_metadata((*tuple(metadata), *self._headers))

    async def ensure_announced(self) -> None:
        """Sends the headers as initial metadata unless the RPC sent its own already."""
        if not self._sent:
            await self.send_initial_metadata(())

    async def write(self, message: Any) -> None:
        await self.ensure_announced()
        await self._context.write(message)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> Any:
        if not self._sent:
            trailing_metadata = (*tuple(trailing_metadata), *self._headers)
        return await self._context.abort(code, details, trailing_metadata)

    def keep_for_error(self) -> None:
        """Puts the headers in the trailing metadata unless they were sent: the RPC is
        failing, and an outer layer (the error boundary) ends it on its own context."""
        if not self._sent:
            self._sent = True
            _add_trailing_metadata(self._context, self._headers)


# Public: other interceptors announce headers the same way (services.inference.request_limits).
AnnouncingContext = _AnnouncingContext


# What a transcoded (REST) request carries: the transcoder records the path it rewrote.
ORIGINAL_PATH_HEADER = "x-envoy-original-path"


class _HeadersAtEnd:
    """A unary RPC's context whose response headers leave with its answer, in one batch.

    grpc.aio sends a handler's `send_initial_metadata` as a batch of its own and
    the answer's initial metadata empty, in its final batch (message and status).
    That extra batch cost a worker 200 µs per ListModels through the edge, and
    0.5 ms per Complete under load (bench.profile E1, E2). The headers a unary
    handler sends (request id, serving version, rate limits, deprecation) are
    held here and put in the final batch's trailing metadata, with
    RESPONSE_HEADERS_TRAILER naming them: the edge lifts them back into the
    response headers, so REST and gRPC clients there see no change. A direct
    gRPC caller (only the mesh's own components) reads them from the trailing
    metadata.

    Sent first instead, as before:
    - with a large answer, marked HEADERS_SENT: the edge buffers the answers it
      lifts headers from, within its buffer limit (1 MiB). A REST answer is
      buffered as JSON, up to ~8x its protobuf size (usage buckets), so a
      transcoded call's bound is REST_HEADERS_AT_END_MAX_BYTES;
    - with an error, once the handler sent them: an error without any response
      header is trailers-only, and Envoy retries a trailers-only UNAVAILABLE or
      CANCELLED on another worker. A Complete that failed after it started
      (its model unloaded) would run, and be billed, again.
    """

    def __init__(self, context: Context) -> None:
        self._context = context
        self._held: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._held += tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> Any:
        await self._send_held()
        return await self._context.abort(code, details, trailing_metadata)

    async def answer(self, encoded: bytes | None) -> bytes | None:
        """Places the held headers with the `encoded` answer (see the class); returns it."""
        size = 0 if encoded is None else len(encoded)
        # The request's headers are read only for a size between the two bounds.
        if size > contract.REST_HEADERS_AT_END_MAX_BYTES and size > self._bound():
            await self._send_held(mark=True)
        elif self._held:
            names = ",".join(dict.fromkeys(name for name, _ in self._held))
            named = (contract.RESPONSE_HEADERS_TRAILER, names)
            _add_trailing_metadata(self._context, (*self._held, named))
        return encoded

    def _bound(self) -> int:
        if ORIGINAL_PATH_HEADER in request_headers(self._context):
            return contract.REST_HEADERS_AT_END_MAX_BYTES
        return contract.HEADERS_AT_END_MAX_BYTES

    async def _send_held(self, mark: bool = False) -> None:
        marked = ((contract.RESPONSE_HEADERS_TRAILER, contract.HEADERS_SENT),) if mark else ()
        if self._held or marked:
            held, self._held = self._held, ()
            await self._context.send_initial_metadata((*held, *marked))


class _MethodMetrics:
    """The metric children and version policy of one method, bound once (label
    lookups take a lock)."""

    def __init__(
        self,
        method: str,
        authorizer: Authorizer | None,
        policy: VersionPolicy | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.method = method
        self.authorizer = authorizer
        self.seconds = RPC_SECONDS.labels(method)
        self._totals: dict[str, Any] = {}
        name = parse_rpc(method)
        self._requests = (
            None if name is None else API_REQUESTS.labels(name.api, name.version, name.rpc)
        )
        self._policy = policy
        self._clock = clock
        #: Whether its responses carry a deprecated version's headers.
        self.announces = policy is not None

    def arrived(self, context: Context) -> Context:
        """Counts the call; returns the context the handler gets (a deprecated
        version's announces it)."""
        if self._requests is not None:
            self._requests.inc()
        if self._policy is None:
            return context
        return cast(Context, _AnnouncingContext(context, self._policy.headers))

    def refuse_retired(self) -> None:
        """Raises ApiVersionSunset when the method's API version is past its sunset."""
        if self._policy is not None and self._policy.is_sunset(self._clock()):
            raise self._policy.sunset_error()

    def record(
        self,
        started: float,
        context: Context,
        failed: TokenmeshError | None,
        ended: str | None = None,
    ) -> None:
        """Counts the finished call: `failed`'s code, else `ended` (a cancelled call's
        code), else the status the call set (none: OK)."""
        self.seconds.observe(time.perf_counter() - started)
        code = _code_name(context, failed, ended)
        total = self._totals.get(code)
        if total is None:
            total = self._totals[code] = RPC_TOTAL.labels(self.method, code)
        total.inc()


async def _announce(context: Context) -> None:
    if isinstance(context, _AnnouncingContext):
        await context.ensure_announced()


class BoundaryInterceptor(grpc.aio.ServerInterceptor):
    """BoundaryInterceptor maps errors to statuses and records RPC metrics.

    grpc.aio calls an interceptor on every RPC: the wrapped handler of each
    method is built once and reused, so the per-call cost is one dict lookup.

    Args:
        authorizer: checks each caller against the contract's caller rules.
        deprecations: the API versions' deprecation schedule.
        clock: Unix time now (tests pass another).
    """

    def __init__(
        self,
        authorizer: Authorizer | None = None,
        deprecations: DeprecationSchedule | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._authorizer = authorizer
        self._deprecations = deprecations
        self._clock = clock

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: nothing to cache
        policy = self._deprecations.policy(method) if self._deprecations else None
        metrics = _MethodMetrics(method, self._authorizer, policy, self._clock)
        wrapped = self._wrapped[method] = self._wrap(handler, metrics)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], metrics: _MethodMetrics
    ) -> grpc.RpcMethodHandler[Any, Any]:
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        # Unary requests arrive as bytes and are decoded inside the boundary; unary
        # answers leave as bytes, encoded inside it (_HeadersAtEnd needs their size).
        decode = request_decoder(handler.request_deserializer)
        encode = handler.response_serializer
        raw = {**codecs, "request_deserializer": None}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, metrics, encode, decode),
                request_deserializer=None,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, metrics, decode), **raw
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, metrics, encode),
                request_deserializer=handler.request_deserializer,
            )
        if handler.stream_stream is None:
            return handler
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, metrics), **codecs
        )

    @staticmethod
    def _wrap_unary(
        behavior: Handler,
        metrics: _MethodMetrics,
        encode: Callable[[Any], bytes] | None,
        decode: Decoder | None = None,
    ) -> Handler:
        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            failed: TokenmeshError | None = None
            ended: str | None = None
            at_end = _HeadersAtEnd(context)
            try:
                context = metrics.arrived(cast(Context, at_end))
                metrics.refuse_retired()
                if decode is not None:
                    request = decode(request)
                if metrics.authorizer is not None:
                    metrics.authorizer.authorize(metrics.method, context, request)
                result = behavior(request, context)
                response = await result if inspect.isawaitable(result) else result
                await _announce(context)
                encoded = response if encode is None or response is None else encode(response)
                return await at_end.answer(encoded)
            except grpc.aio.AbortError:
                raise  # already aborted with a status: must not be suppressed
            except Exception as exc:
                failed = to_domain_error(exc, metrics.method)
                await abort_with(context, failed)
            except asyncio.CancelledError:
                # grpc cancelled the handler: its deadline passed or the client left.
                ended = cancellation_code(context)
                raise
            finally:
                metrics.record(started, context, failed, ended)

        return unary

    @staticmethod
    def _wrap_stream(
        behavior: Handler, metrics: _MethodMetrics, decode: Decoder | None = None
    ) -> Handler:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            failed: TokenmeshError | None = None
            ended: str | None = None
            try:
                context = metrics.arrived(context)
                metrics.refuse_retired()
                if decode is not None:
                    request = decode(request)
                if metrics.authorizer is not None:
                    metrics.authorizer.authorize(metrics.method, context, request)
                opener = getattr(behavior, STREAM_OPENER, None)
                if opener is None:
                    result = behavior(request, context)
                else:  # the inner layer's stream, without its re-yield per message
                    result = await opener(request, context)
                if opener is not None or inspect.isasyncgen(result):
                    async for message in result:
                        if metrics.announces:
                            await _announce(context)
                        yield message
                elif inspect.isawaitable(result):
                    await result
                await _announce(context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                failed = to_domain_error(exc, metrics.method)
                await abort_with(context, failed)
            except (asyncio.CancelledError, GeneratorExit):
                # Cancelled while working, or closed at a `yield` once grpc stopped
                # taking messages (the client cancelled, or the deadline passed).
                ended = cancellation_code(context)
                raise
            finally:
                metrics.record(started, context, failed, ended)

        return stream
