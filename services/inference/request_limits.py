"""Request-rate limits of inference RPCs, decided in the worker: no Python hop at the edge.

Every request through the edge used to wait for a call from Envoy to the
usage service's RateLimitService (0.7-1.4 ms here, most of the edge's
overhead). Inference RPCs are decided here instead, by a `RequestLimiter` of
the worker's own (services/usage/ratelimit.py) on the same Redis windows,
with the same limits (services/usage/limit_settings.py) and the same
descriptor the edge built from its identity headers: key id, its rpm, tier,
tenant and the model the edge routed by. The edge keeps its rate-limit
filter for every other route (gateway/envoy_config.py).

Exact across replicas: every worker and the usage service count in the same
sliding windows, atomically in Redis; a worker admits from a window lease
only slots already reserved there (leases.py), so no replica can over-admit.
Every try of a request counts, Envoy's retries too (a retry's first try may
never have reached a worker: a connect failure, a refused stream); a try
that a worker refuses in a way Envoy tries again elsewhere (UNAVAILABLE or
CANCELLED, no response header sent: a draining worker, a version not here)
gives its count back first, so a retried request counts once. So does a try
that the worker's own shutdown cut once its grace was over, before any
response header went out (a unary call's leave with its answer): grpc ends
it trailers-only UNAVAILABLE, which Envoy tries again elsewhere.

What a client sees is what the edge's filter gave it:
- draft-03 `x-ratelimit-limit`, `-remaining`, `-reset` on every answer (REST:
  response headers; gRPC: initial metadata, or trailers of an error; a
  unary answer sends them in its trailers, which the edge lifts back:
  services.core.interceptors, HeadersAtEnd), and
  `x-tokenmesh-ratelimit-warning` at >= 80% of a limit;
- over a limit: RESOURCE_EXHAUSTED (REST 429) with `retry-after` and the
  same message, e.g. "rate limit exceeded: requests_per_minute=3 for key
  key_x; retry in 42s" (OpenAI routes: in OpenAI's error shape);
- an unreachable store lets requests through (counted in
  tokenmesh_ratelimit_fail_open_total) unless
  TOKENMESH_RATELIMIT_FAILURE_MODE_DENY, then UNAVAILABLE.

Only calls from the edge are limited: a delegated caller (the jobs service,
running a key's batch items) paces itself.

A shadow copy (services.inference.shadow) is never counted: its live request
is, on its own worker. Envoy makes the copy before any worker decides that
request, though, so the copy's windows are read (0 hits, the same script) and
the copy is dropped when they have no room for a request; it also holds one
of its version's copy slots on this worker while it runs (shadow.CopySlots).

The model window is the one the edge routed by (x-tokenmesh-model, which its
Lua filter read from the request body): a call whose own message names another
model is refused INVALID_ARGUMENT before it counts anywhere (`check_routed_model`).
A crafted body the edge read otherwise than protobuf does (an empty group
between two `model` fields) took one model's route and window while this
worker served another, past that model's limit and the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
from google.api.httpbody_pb2 import HttpBody

from gateway import model_routing
from services.core import contract
from services.core.errors import (
    FieldViolation,
    InvalidArgument,
    TokenmeshError,
    Unavailable,
)
from services.core.identity import peer_identity
from services.core.interceptors import (
    STREAM_OPENER,
    AnnouncingContext,
    Context,
    abort_with,
    request_headers,
    to_domain_error,
)
from services.inference import shadow
from services.inference.openai import errors as openai_errors
from services.inference.openai import params as openai_params
from services.usage.ratelimit import (
    WARNING_HEADER,
    WINDOW_S,
    Hit,
    RequestLimiter,
    WindowStatus,
    latest_freed,
)

INFERENCE_SERVICES = (
    "/tokenmesh.inference.v1.InferenceService/",
    "/tokenmesh.inference.v2.InferenceService/",
    "/tokenmesh.openai.v1.OpenAIService/",
)
OPENAI_SERVICE = "/tokenmesh.openai.v1.OpenAIService/"
# A model lookup is routed by its model (OpenAI's GET /models/{id}) but is no
# request to the model: it counts in its key's and tenant's windows, not in the
# model's, which a client polling models.retrieve would use up.
LOOKUPS = ("/GetModel",)
# Identity header -> descriptor key, as gateway.edge_auth.rate_limits builds it.
DESCRIPTOR_HEADERS = (
    (contract.RPM_HEADER, "rpm"),
    (contract.TIER_HEADER, "tier"),
    (contract.TENANT_HEADER, "tenant"),
    (model_routing.MODEL_HEADER, "model"),
)
# Callers whose requests are limited here: the edge (None: a plaintext
# connection, which only benchmarks and development run, as the edge).
LIMITED_CALLERS = frozenset({contract.EDGE, None})
Handler = Callable[..., Any]


def descriptor(
    headers: Mapping[str, str], model_window: bool = True
) -> tuple[tuple[str, str], ...] | None:
    """Returns the rate-limit descriptor a request counts in (None: anonymous, or the
    edge's shadow copy, never counted); `model_window` False leaves the routed model
    out (a lookup's)."""
    if shadow.is_copy(headers):
        return None  # its live request is counted (the copy's windows are only read)
    return caller_descriptor(headers, model_window)


def caller_descriptor(
    headers: Mapping[str, str], model_window: bool = True
) -> tuple[tuple[str, str], ...] | None:
    """Returns the rate-limit descriptor of a request's identity headers (None: anonymous),
    a shadow copy's included (its caller's)."""
    key_id = headers.get(contract.KEY_ID_HEADER, "")
    if not key_id:
        return None
    entries = [("key_id", key_id)]
    entries += [
        (key, headers[h])
        for h, key in DESCRIPTOR_HEADERS
        if headers.get(h) and (model_window or key != "model")
    ]
    return tuple(entries)


def body_model(request: Any, openai: bool) -> str | None:
    """Returns the model name a request's message names, as this worker's servicers read
    it (an OpenAI id's name, without its "@version"); None: none to compare (JSON the
    OpenAI servicer refuses, or a message without a model).

    An OpenAI body is parsed here once for the call: the servicer takes this parse
    (openai_params.call_body) instead of parsing the body again."""
    if isinstance(request, HttpBody):
        # Its INVALID_JSON, if any, is the servicer's answer, as it was.
        body = openai_params.read_call_body(request).value
        model = body.get("model") if isinstance(body, dict) else None
    else:
        model = getattr(request, "model", None)
    if not isinstance(model, str):
        return None
    return openai_params.parse_model_id(model)[0] if openai else model


def check_routed_model(request: Any, headers: Mapping[str, str], openai: bool) -> None:
    """Raises InvalidArgument when the edge routed (and limits) the call as another model
    than its message names.

    The edge's Lua filter reads the model from the body (gateway/model_routing.lua)
    and refuses a body it cannot read as protobuf does; this is the second guard,
    should the two readers ever part again. No header (a direct internal call, a
    model the edge left unrouted): nothing to compare.
    """
    routed = headers.get(model_routing.MODEL_HEADER)
    if not routed:
        return
    model = body_model(request, openai)
    if model is not None and model != routed:
        # INVALID_ARGUMENT, as the edge answers a body it cannot read: the bytes are
        # ambiguous, not the key short of a right (both models may be allowed).
        raise InvalidArgument(
            [
                FieldViolation(
                    "model",
                    "the edge read another model from this message than protobuf does: "
                    "send one well-formed message",
                )
            ],
            reason="MODEL_MISMATCH",
        )


def draft03_headers(windows: Sequence[WindowStatus]) -> list[tuple[str, str]]:
    """Returns the headers Envoy's ratelimit filter writes (draft 03), and any warning."""
    closest = min(windows, key=lambda w: w.limit.limit - w.used)
    quotas = ", ".join(f'{w.limit.limit};w={WINDOW_S};name="{w.limit.name}"' for w in windows)
    headers = [
        ("x-ratelimit-limit", f"{closest.limit.limit}, {quotas}"),
        ("x-ratelimit-remaining", str(max(0, closest.limit.limit - closest.used))),
        ("x-ratelimit-reset", str(closest.reset_s)),
    ]
    headers += [(WARNING_HEADER, w.warning()) for w in windows if w.warning()]
    return headers


async def _announced(
    result: Any, limited: _Counted | None, cut_by_shutdown: Callable[[], bool]
) -> AsyncIterator[Any]:
    """Streams a handler's messages, announcing the limits' headers before the first
    (or in the trailers of an error before it)."""
    try:
        if inspect.isasyncgen(result):
            async for message in result:
                if limited is not None:
                    await limited.ensure_announced()
                yield message
        elif inspect.isawaitable(result):
            await result
    except grpc.aio.AbortError:
        raise  # aborted through `limited`: the headers are in its trailers
    except Exception as exc:
        if limited is not None:
            await limited.failing(exc)
        raise
    except asyncio.CancelledError:
        if limited is not None and cut_by_shutdown():
            await limited.refund_if_cut(held=False)  # a stream that sent none
        raise
    if limited is not None:
        await limited.ensure_announced()


@dataclass(frozen=True)
class MethodKind:
    """What a limited method's calls count in and how they are refused."""

    openai: bool  # refusals in OpenAI's error shape
    model_window: bool  # counted in the routed model's window (not a lookup)


def method_kind(method: str) -> MethodKind:
    """Returns how a limited inference method's calls are counted and refused."""
    return MethodKind(method.startswith(OPENAI_SERVICE), not method.endswith(LOOKUPS))


# What Envoy tries again on another worker when no response header went out
# (services/router/snapshot.py, retry_on): that try counts, so this one gives back its count.
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class _Counted(AnnouncingContext):
    """The call's context: it announces the limits' headers and knows where the call
    was counted, to take the count back if Envoy tries the call again elsewhere."""

    def __init__(
        self,
        context: Context,
        headers: tuple[tuple[str, str], ...],
        hit: Hit | None,
        limiter: RequestLimiter,
    ) -> None:
        super().__init__(context, headers)
        self._hit = hit
        self._limiter = limiter

    async def refund_if_retried(self, error: BaseException | grpc.StatusCode) -> None:
        """Gives the call's count back if it ends in a way Envoy tries again."""
        code = error if isinstance(error, grpc.StatusCode) else getattr(error, "code", None)
        if not self.sent and code in RETRIED_CODES:
            await self._refund()

    async def refund_if_cut(self, *, held: bool) -> None:
        """Gives the count back of a call the worker's shutdown cut (its grace over)
        before any response header went out: grpc ends it trailers-only UNAVAILABLE,
        which Envoy tries again elsewhere.

        `held`: a unary call, whose headers leave with its answer (the error
        boundary's HeadersAtEnd holds what it sent, `sent` here says only that it
        sent them); a stream's went out when sent.
        """
        if held or not self.sent:
            await self._refund()

    async def _refund(self) -> None:
        """Takes the call's count back, once."""
        if self._hit is not None:
            hit, self._hit = self._hit, None
            await self._limiter.refund(hit)

    async def failing(self, error: Exception) -> None:
        """The handler raised `error`, which an outer layer answers: gives the count back
        if Envoy will try the call again, and keeps the limits' headers for the answer."""
        await self.refund_if_retried(error)
        self.keep_for_error()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> Any:
        await self.refund_if_retried(code)
        return await super().abort(code, details, trailing_metadata)


class RequestLimitInterceptor(grpc.aio.ServerInterceptor):
    """RequestLimitInterceptor decides inference RPCs' request rates (see the module).

    Placed inside the error boundary (services.core.server), which decodes
    requests and maps errors.

    Args:
        limiter: the worker's limiter (the usage service's windows and limits).
        failure_mode_deny: refuse requests while the store is unreachable.
        copies: the worker's shadow copy slots (TOKENMESH_SHADOW_MAX_COPIES per
            model version; default: that many of its own).
        cut_by_shutdown: tells whether a call cancelled now was cut by the worker's
            shutdown (InferenceService.cut_by_shutdown; default: never).
    """

    def __init__(
        self,
        limiter: RequestLimiter,
        failure_mode_deny: bool = False,
        copies: shadow.CopySlots | None = None,
        cut_by_shutdown: Callable[[], bool] = lambda: False,
    ) -> None:
        self.limiter = limiter
        self.failure_mode_deny = failure_mode_deny
        self.cut_by_shutdown = cut_by_shutdown
        self.copies = copies if copies is not None else shadow.CopySlots()
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(INFERENCE_SERVICES):
            return handler
        wrapped = self._wrapped[method] = self._wrap(handler, method_kind(method))
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], kind: MethodKind
    ) -> grpc.RpcMethodHandler[Any, Any]:
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, kind), **codecs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, kind), **codecs
            )
        return handler  # no client-streaming inference RPC exists

    def _unary(self, behavior: Handler, kind: MethodKind) -> Handler:
        async def unary(request: Any, context: Context) -> Any:
            await self.check_model(request, context, kind)
            if shadow.is_copy(request_headers(context)):
                async with self.copy_admitted(context, kind):
                    result = behavior(request, context)
                    return await result if inspect.isawaitable(result) else result
            limited = await self.admit(context, kind)
            if limited is None:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            try:
                result = behavior(request, limited)
                response = await result if inspect.isawaitable(result) else result
            except grpc.aio.AbortError:
                raise  # aborted through `limited`: the headers are in its trailers
            except Exception as exc:
                await limited.failing(exc)  # an error answer carries the limits' headers too
                raise
            except asyncio.CancelledError:
                if self.cut_by_shutdown():
                    await limited.refund_if_cut(held=True)
                raise
            await limited.ensure_announced()
            return response

        return unary

    def _stream(self, behavior: Handler, kind: MethodKind) -> Handler:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async for message in await open_stream(request, context):
                yield message

        async def open_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            # The error boundary calls this instead of `stream` (STREAM_OPENER): an
            # unlimited call's messages then skip this layer.
            await self.check_model(request, context, kind)
            if shadow.is_copy(request_headers(context)):
                return self._copy_stream(behavior, request, context, kind)
            limited = await self.admit(context, kind)
            result = behavior(request, limited or context)
            if limited is None and inspect.isasyncgen(result):
                return cast(AsyncIterator[Any], result)
            return _announced(result, limited, self.cut_by_shutdown)

        setattr(stream, STREAM_OPENER, open_stream)
        return stream

    async def _copy_stream(
        self, behavior: Handler, request: Any, context: Context, kind: MethodKind
    ) -> AsyncIterator[Any]:
        """Streams a shadow copy's messages while it holds its slot (taken at the first
        read: a stream never read holds none)."""
        async with self.copy_admitted(context, kind):
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async with contextlib.aclosing(result):
                    async for message in result:
                        yield message
            elif inspect.isawaitable(result):
                await result

    @contextlib.asynccontextmanager
    async def copy_admitted(self, context: Context, kind: MethodKind) -> AsyncIterator[None]:
        """Runs the block for a shadow copy whose caller has room in its request windows,
        holding one of its version's copy slots; else raises the drop error."""
        headers = request_headers(context)
        model, version = shadow.copy_target(headers)
        with self.copies.hold(model, version):
            await self.check_copy_caller(context, headers, kind, model, version)
            yield

    async def check_copy_caller(
        self,
        context: Context,
        headers: Mapping[str, str],
        kind: MethodKind,
        model: str,
        version: str,
    ) -> None:
        """Raises the drop error of a copy whose caller's windows have no room for a request
        (or cannot be read): read with 0 hits, nothing counted.

        Full means refused: the live request counted in the same windows, so at its
        limit it was refused (or took the last slot, and its copy is lost: a sample).
        """
        if peer_identity(context) not in LIMITED_CALLERS:
            return  # as for the live request: only the edge's calls are limited
        entries = caller_descriptor(headers, kind.model_window)
        if entries is None:
            return
        try:
            windows = await self.limiter.decide(entries, hits=0)
        except Unavailable:
            raise shadow.dropped(
                model, version, "unknown", "its caller's request windows are unavailable"
            ) from None
        except Exception as exc:
            # Not an outage (a window key of the wrong type, a script error): the
            # limiter logged it and counted it (tokenmesh_ratelimit_errors_total, its
            # alert), and `admit` let the live request through. The copy's standing is
            # unknown: dropped, never INTERNAL (an error answer of an inference method
            # counts in the availability SLO; the bug is reported already).
            detail = f"its caller's request windows could not be read ({type(exc).__name__})"
            raise shadow.dropped(model, version, "unknown", detail) from None
        full = next((w for w in windows or () if w.used >= w.limit.limit), None)
        if full is not None:
            detail = f"{full.limit.subject} is at {full.limit.name}={full.limit.limit}"
            raise shadow.dropped(model, version, "caller_limited", detail)

    async def check_model(self, request: Any, context: Context, kind: MethodKind) -> None:
        """Ends a call the edge routed as another model than its message names, before
        it counts in any window (see check_routed_model)."""
        try:
            check_routed_model(request, request_headers(context), kind.openai)
        except InvalidArgument as error:
            await _abort(context, error, kind)

    async def admit(self, context: Context, kind: MethodKind) -> _Counted | None:
        """Counts the call in its windows; returns the context that announces them.

        None: nothing to limit (not the edge's call, anonymous, or the store
        unreachable and failing open). Over a limit, or with the store failing and
        failure_mode_deny, the call ends here (OpenAI routes: in OpenAI's error shape).
        """
        if peer_identity(context) not in LIMITED_CALLERS:
            return None
        incoming = request_headers(context)
        entries = descriptor(incoming, kind.model_window)
        if entries is None:
            return None
        # Refused here (failure_mode_deny), not by the error boundary: an OpenAI route's
        # refusal must carry OpenAI's error JSON, which only _abort adds (the edge
        # answered the transcoder's {"code":14,...} instead).
        try:
            counted = await self.limiter.count(entries)
        except Unavailable as error:
            if self.failure_mode_deny:
                await _abort(context, error, kind)
            return None
        except Exception as exc:
            # Not an outage (a window key of the wrong type, a script error): logged and
            # counted by the limiter; the same failure mode applies, as Envoy applies it
            # to the usage service's INTERNAL. It failed every request of the key.
            if self.failure_mode_deny:
                await _abort(context, to_domain_error(exc, "the rate-limit check"), kind)
            return None
        if counted is None or not counted[0]:
            return None
        windows, hit = counted
        headers = draft03_headers(windows)
        over = latest_freed(windows)
        if over is not None:
            await _abort(context, over.error(), kind, headers)
        return _Counted(context, tuple(headers), hit, self.limiter)


async def _abort(
    context: Context,
    error: TokenmeshError,
    kind: MethodKind,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    """Ends the call with `error` and `headers` (OpenAI routes: in OpenAI's error shape too)."""
    announced = list(headers)
    if kind.openai:
        body = openai_errors.header_value(openai_errors.from_error(error))
        announced.append((contract.OPENAI_ERROR_HEADER, body))
    await abort_with(cast(Context, AnnouncingContext(context, tuple(announced))), error)
