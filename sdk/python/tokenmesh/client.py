"""A thin asyncio client for the tokenmesh edge (or a worker of a plaintext development mesh).

`Client` speaks the inference API v2 (`tokenmesh.inference.v2`): chat
messages, prompt templates, n choices, log-probabilities. `V1Client` keeps
the v1 calls for code that has not migrated yet (docs/migration/v1-to-v2.md).

Example::

    async with Client("127.0.0.1:8080", token=api_key) as client:
        async with client.generate(
            "demo-lm", messages=[("user", "In the beginning")], max_output_tokens=16
        ) as stream:
            async for message in stream:
                print(message.text, end="")

Leaving the `async with` (or `await stream.aclose()`) cancels a stream not read
to its end: the worker stops generating, and bills only the tokens it produced.

Plaintext is used only for loopback targets (the edge's local 8080 listener) unless
`tls=False` is passed: any other host gets TLS, so a key never crosses a network
in the clear by default.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import math
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as types_pb
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

#: The per-call deadline by default: a whole stream's, or a non-streamed answer's,
#: which arrives when its generation is done. The OpenAI SDK's default, and as long
#: as the edge lets a call to a worker stay silent; at 60 s a longer generation
#: ended with DEADLINE_EXCEEDED.
DEFAULT_TIMEOUT_S = 600.0
#: The most a model lookup (list_models, get_model) waits unless its call passes
#: timeout_s: it answers at once, and one stuck behind a hung upstream should fail
#: in seconds, not in ten minutes.
LOOKUP_TIMEOUT_S = 30.0
#: The largest message the client sends or receives: the servers' (16 MiB). gRPC's
#: default of 4 MiB refused an answer the worker had generated and billed (a long
#: completion with logprobs, n choices), as RESOURCE_EXHAUSTED, which a caller
#: retried, paying each time.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class _ClientDefault(enum.Enum):
    """The type of CLIENT_DEFAULT (an enum so that type checkers tell it from None)."""

    TIMEOUT = "client default"


#: A call's `timeout_s` when it passes none: the client's (and a lookup's cap).
#: None is not this: None means no deadline at all.
CLIENT_DEFAULT = _ClientDefault.TIMEOUT

#: A call's deadline: seconds, None (none), or CLIENT_DEFAULT.
Timeout = float | None | _ClientDefault

#: A chat turn: a ChatMessage, or a (role, content) pair.
Turn = types_pb.ChatMessage | tuple[str, str]


class TokenmeshRpcError(Exception):
    """TokenmeshRpcError is a failed call with its google.rpc details decoded.

    It pickles (to cross a process pool or task queue), and its text is
    `CODE: message`: the server's client-safe message, never the credentials.

    Attributes:
        code: the gRPC status code.
        message: the server's client-safe message.
        reason: the ErrorInfo reason (UPPER_SNAKE), or "".
        domain: the ErrorInfo domain ("tokenmesh.dev" for tokenmesh's own), or "".
        metadata: the ErrorInfo metadata, e.g. {"model": ..., "version": ...} of an
            unknown model version, {"scope": ...} of a missing scope.
        field_violations: (field, description) pairs from BadRequest.
        quota_violations: (subject, description) pairs from QuotaFailure: which
            quota refused the call, e.g. ("worker:queue", "max_queue=256") or
            ("key:<id>:tokens_per_minute", "tokens_per_minute=1000").
        resource_type: the ResourceInfo type of a missing resource (a prompt
            template's, a job's), or "".
        resource_name: the ResourceInfo name (as the request named it), or "".
        retry_after_s: when to try again, in seconds: the RetryInfo delay, else the
            `retry-after` metadata (a proxy's own reply may send only that), else None.
        status: the google.rpc.Status as the server sent it (None: none was sent,
            as in a proxy's own reply); unknown detail types stay packed in it.
        details: its details that are google.rpc error_details messages, unpacked.
    """

    def __init__(self, error: grpc.aio.AioRpcError, status: status_pb2.Status | None) -> None:
        self.code = error.code()
        self.message = error.details() or ""
        self.reason = ""
        self.domain = ""
        self.metadata: dict[str, str] = {}
        self.field_violations: list[tuple[str, str]] = []
        self.quota_violations: list[tuple[str, str]] = []
        self.resource_type = ""
        self.resource_name = ""
        self.retry_after_s: float | None = None
        self.status = status
        self.details: list[Message] = []
        for packed in status.details if status is not None else ():
            detail = _unpacked(packed)
            if detail is not None:
                self.details.append(detail)
                self._absorb(detail)
        if self.retry_after_s is None:
            self.retry_after_s = _retry_after(error)
        super().__init__(f"{self.code.name}: {self.message}")

    def _absorb(self, detail: Message) -> None:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            self.reason = detail.reason
            self.domain = detail.domain
            self.metadata = dict(detail.metadata)
        elif isinstance(detail, error_details_pb2.BadRequest):
            self.field_violations = [(v.field, v.description) for v in detail.field_violations]
        elif isinstance(detail, error_details_pb2.QuotaFailure):
            self.quota_violations = [(v.subject, v.description) for v in detail.violations]
        elif isinstance(detail, error_details_pb2.ResourceInfo):
            self.resource_type = detail.resource_type
            self.resource_name = detail.resource_name
        elif isinstance(detail, error_details_pb2.RetryInfo):
            self.retry_after_s = detail.retry_delay.ToMilliseconds() / 1000

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own pickling calls cls(*self.args), which is not this
        # constructor's signature (and the AioRpcError is not kept to rebuild from).
        return _unpickled, (type(self), self.args, self.__dict__)


class DeadlineExceeded(TokenmeshRpcError):
    """DeadlineExceeded is a call that ran past its deadline (code DEADLINE_EXCEEDED).

    Mostly the client's own `timeout_s` (then `status` is None): a stream's covers
    the whole stream, so it may come after messages were read. Also a server's,
    e.g. a request still queued at the deadline the edge gave it. The call may
    have been done in part (a stream's earlier messages; tokens already produced
    are billed), so retry only what is safe to repeat.
    """


#: The TokenmeshRpcError subclass of a status code (any other: TokenmeshRpcError).
_ERROR_TYPES: Mapping[grpc.StatusCode, type[TokenmeshRpcError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _unpickled(
    cls: type[TokenmeshRpcError], args: tuple[Any, ...], state: dict[str, Any]
) -> TokenmeshRpcError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


#: The google.rpc error_details messages a status may carry, unpacked by type.
_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RequestInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.DebugInfo,
)


def _unpacked(packed: Any) -> Message | None:
    """Returns the error_details message in a google.protobuf.Any, or None (another type)."""
    for kind in _DETAIL_TYPES:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            return detail
    return None


def _retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """Returns a `retry-after` header's seconds (None: none, or not a number)."""
    for metadata in (error.trailing_metadata(), error.initial_metadata()):
        for key, value in metadata or ():
            if key == "retry-after" and isinstance(value, str):
                try:
                    return max(0.0, float(value))
                except ValueError:
                    return None  # an HTTP date: never sent by tokenmesh
    return None


def _decoded(error: grpc.aio.AioRpcError) -> TokenmeshRpcError:
    status = None
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:  # not ours to read (a proxy's): the code still stands
                status = None
    return _ERROR_TYPES.get(error.code(), TokenmeshRpcError)(error, status)


def _closed_under_a_call() -> TokenmeshRpcError:
    """The error of a call cut by the client's close (grpc.aio cancels its calls)."""
    error = grpc.aio.AioRpcError(
        code=grpc.StatusCode.CANCELLED,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(),
        details="the client was closed",
    )
    return _decoded(error)


def clean_token(token: str) -> str:
    """Returns a credential as sent: without surrounding whitespace (one read from a file
    ends with a newline); raises ValueError for one that cannot be a header value (a
    control character inside). The CLI checks its API keys with it too."""
    token = token.strip()
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in token):
        raise ValueError("token must be one line of printable characters")
    return token


def _checked_timeout(timeout_s: float | None) -> float | None:
    """Returns timeout_s, or raises ValueError: gRPC takes 0 for no deadline and
    math.inf for one already passed, so neither may reach it; None means none."""
    if timeout_s is not None and not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(
            f"timeout_s must be a positive number of seconds, or None for no deadline;"
            f" got {timeout_s!r}"
        )
    return timeout_s


def is_loopback_target(target: str) -> bool:
    """Tells whether a gRPC target names this host: localhost, a loopback address or a
    Unix socket (also in gRPC's `dns:`, `ipv4:`, `ipv6:`, `unix:` forms)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):  # [::1]:8080
        host = target[1 : target.find("]")]
    elif target.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
        host = target.partition(":")[0]
    else:
        host = target
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _open_channel(
    target: str, tls: bool | None, root_certificates: bytes | None
) -> grpc.aio.Channel:
    if tls is None:
        # The edge's plaintext listener is bound to 127.0.0.1 (docs/security.md): any
        # other host is the TLS one, and the key must not reach it in the clear.
        # Roots to verify with mean TLS whatever the host.
        tls = root_certificates is not None or not is_loopback_target(target)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


class _Connection:
    """_Connection owns the channel, the credentials and the deadline of a client.

    The channel opens at the first call, on that call's event loop, and serves that
    loop only (grpc.aio's channels belong to one): a client made at import time and
    used under `asyncio.run` works, as an AsyncOpenAI made there does. Opened when
    the client was made, every call under another loop failed with a bare
    RuntimeError.
    """

    #: The generated stub class of the service a client calls.
    _stub_type: Any = None

    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        timeout_s: float | None,
        tls: bool | None,
        root_certificates: bytes | None,
    ) -> None:
        self._timeout_s = _checked_timeout(timeout_s)
        token = None if token is None else clean_token(token)
        if tls is False and root_certificates is not None:
            # Either way one of the two is ignored: it used TLS, against tls=False.
            raise ValueError("root_certificates need TLS: leave tls at None or True, or drop them")
        self._target, self._tls, self._root_certificates = target, tls, root_certificates
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stub_instance: Any = None
        self._closed = False
        self._metadata: Sequence[tuple[str, str]] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    @property
    def _stub(self) -> Any:
        """The stub over this client's channel, opened on the first call's loop."""
        if self._closed:
            raise RuntimeError("this client is closed: make a new one")
        loop = asyncio.get_running_loop()
        if self._channel is None:
            self._channel = _open_channel(self._target, self._tls, self._root_certificates)
            self._loop = loop
            self._stub_instance = self._stub_type(self._channel)
        elif loop is not self._loop:
            raise RuntimeError(
                "this client's channel belongs to the event loop of its first call: "
                "make one client per event loop (each asyncio.run)"
            )
        return self._stub_instance

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; a call still running ends CANCELLED ("the client was
        closed")."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()

    def _raise_if_closed_under(self) -> None:
        """Raises CANCELLED for a call that the client's close cut, not its task's
        cancel: its reader got CancelledError, which a TaskGroup took for a
        cancelled task (the cut generation silently counted as done)."""
        task = asyncio.current_task()
        if self._closed and (task is None or task.cancelling() == 0):
            raise _closed_under_a_call() from None

    def _deadline(self, timeout_s: Timeout, lookup: bool = False) -> float | None:
        """Returns a call's gRPC timeout: its own timeout_s, else the client's (capped
        at LOOKUP_TIMEOUT_S for a lookup, also under a client without a deadline)."""
        if not isinstance(timeout_s, _ClientDefault):
            return _checked_timeout(timeout_s)
        if lookup:
            return min(self._timeout_s or LOOKUP_TIMEOUT_S, LOOKUP_TIMEOUT_S)
        return self._timeout_s

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise _decoded(error) from None
        except asyncio.CancelledError:
            self._raise_if_closed_under()
            raise

    async def _stream(
        self, method: Any, request: Any, timeout: float | None
    ) -> AsyncGenerator[Any, None]:
        # One deadline for the whole stream, as gRPC's: not a limit on each message.
        call = method(request, metadata=self._metadata, timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise _decoded(error) from None
        except asyncio.CancelledError:
            self._raise_if_closed_under()
            raise
        finally:
            # A caller that stops reading (break, aclose(), an exception, the stream
            # dropped) ends the RPC here: grpc.aio keeps an abandoned call running
            # to its deadline, and the worker generated and billed every token.
            # Nothing happens when the call is already done.
            call.cancel()


_Message = TypeVar("_Message")


class Stream(Generic[_Message]):
    """Stream is the messages of a streamed call, read with `async for`.

    A stream not read to its end should be closed: `await stream.aclose()`,
    `async with client.generate(...) as stream:` or
    `contextlib.aclosing(client.generate(...))`. Closing cancels the call at once,
    so the worker stops generating and bills only the tokens it produced. A
    stream dropped without closing is cancelled when it is garbage-collected.
    """

    def __init__(self, messages: AsyncGenerator[_Message, None]) -> None:
        self._messages = messages

    def __aiter__(self) -> Stream[_Message]:
        return self

    async def __anext__(self) -> _Message:
        return await self._messages.__anext__()

    async def aclose(self) -> None:
        """Cancels the call unless it is done; reading then stops."""
        await self._messages.aclose()

    async def __aenter__(self) -> Stream[_Message]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def _listed(value: str | Iterable[str]) -> list[str]:
    """Returns a list of strings: a single str is one item. (Protobuf extends a
    repeated field from a str character by character; OpenAI's SDK takes a str
    as one input or one stop sequence, and so do we.)"""
    return [value] if isinstance(value, str) else list(value)


def _turns(messages: Iterable[Turn]) -> list[types_pb.ChatMessage]:
    return [
        m if isinstance(m, types_pb.ChatMessage) else types_pb.ChatMessage(role=m[0], content=m[1])
        for m in messages
    ]


#: v1 keyword arguments the v2 client still accepts, so code written for the
#: v1 client (`max_tokens=32, seed=1`) runs unchanged: v1 field -> v2 field.
_V1_FIELDS = {"max_tokens": "max_output_tokens", "stop": "stop_sequences"}
_V1_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")


def _absorb_v1_fields(
    fields: dict[str, Any], sampling: Mapping[str, Any] | types_pb.SamplingParams | None
) -> Mapping[str, Any] | types_pb.SamplingParams | None:
    for old, new in _V1_FIELDS.items():
        if old in fields:
            fields[new] = fields.pop(old)
    if "stop_sequences" in fields:
        fields["stop_sequences"] = _listed(fields["stop_sequences"])
    loose = {name: fields.pop(name) for name in _V1_SAMPLING_FIELDS if name in fields}
    if not loose:
        return sampling
    if isinstance(sampling, types_pb.SamplingParams):
        merged = types_pb.SamplingParams()
        merged.CopyFrom(sampling)
        for name, value in loose.items():
            setattr(merged, name, value)
        return merged
    return {**(sampling or {}), **loose}


def _generation_fields(
    prompt: str | None,
    messages: Iterable[Turn] | None,
    sampling: Mapping[str, Any] | types_pb.SamplingParams | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt= or messages=")
    sampling = _absorb_v1_fields(fields, sampling)
    if prompt is not None:
        fields["prompt"] = prompt
    if messages is not None:
        fields["messages"] = _turns(messages)
    if isinstance(sampling, Mapping):
        fields["sampling"] = types_pb.SamplingParams(**sampling)
    elif sampling is not None:
        fields["sampling"] = sampling
    return fields


class Client(_Connection):
    """Client calls the v2 InferenceService over one shared channel.

    Args:
        target: host:port of the edge (8080 plaintext, 8443 TLS), or of a worker on a
            plaintext development mesh (workers take mTLS clients only otherwise).
        token: a JWT or API key sent as `authorization: Bearer ...`, if any.
        timeout_s: the deadline of each call, in seconds, unless the call passes
            its own `timeout_s`: DEFAULT_TIMEOUT_S (600, the OpenAI SDK's); None
            for none. A stream's covers the whole stream, not each message. A
            model lookup waits at most LOOKUP_TIMEOUT_S (30) unless it passes its
            own. A call past its deadline raises DeadlineExceeded.
        tls: use TLS (the edge's 8443 listener); implied by root_certificates.
            By default (None) plaintext only to a loopback target (localhost,
            127.0.0.0/8, ::1, a Unix socket), TLS to any other; pass False to
            send plaintext (and the token in the clear) to another host.
        root_certificates: PEM roots to verify the edge with (default: system roots).

    Every call takes `timeout_s=`: seconds, or None for no deadline (the
    client's otherwise), as a gRPC stub's `timeout=` or the OpenAI SDK's.

    Errors raise TokenmeshRpcError with the decoded google.rpc details, also a
    failure inside a running stream: generate() first yields the final message
    of every choice still running (finish_reason ERROR, `error` a
    google.rpc.Status), then raises TokenmeshRpcError with the same status, as
    the worker ends the RPC with it. The messages yielded before stay valid.
    """

    _stub_type = rpc.InferenceServiceStub

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        super().__init__(
            target,
            token=token,
            timeout_s=timeout_s,
            tls=tls,
            root_certificates=root_certificates,
        )

    async def __aenter__(self) -> Client:
        return self

    async def list_models(
        self, page_size: int = 0, page_token: str = "", *, timeout_s: Timeout = CLIENT_DEFAULT
    ) -> pb.ListModelsResponse:
        """Returns one page of the models the caller may use."""
        request = pb.ListModelsRequest(page_size=page_size, page_token=page_token)
        response: pb.ListModelsResponse = await self._unary(
            self._stub.ListModels, request, self._deadline(timeout_s, lookup=True)
        )
        return response

    async def get_model(
        self, model: str, *, timeout_s: Timeout = CLIENT_DEFAULT
    ) -> pb.GetModelResponse:
        """Returns one model and its versions."""
        response: pb.GetModelResponse = await self._unary(
            self._stub.GetModel,
            pb.GetModelRequest(model=model),
            self._deadline(timeout_s, lookup=True),
        )
        return response

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Iterable[Turn] | None = None,
        sampling: Mapping[str, Any] | types_pb.SamplingParams | None = None,
        timeout_s: Timeout = CLIENT_DEFAULT,
        **fields: Any,
    ) -> Stream[pb.GenerateResponse]:
        """Streams a generation: one message per delta of a choice.

        Pass `prompt` or `messages` (ChatMessage or (role, content) pairs);
        `sampling` is a SamplingParams or a dict of its fields; `fields` are
        other GenerateRequest fields (n, logprobs, top_logprobs,
        max_output_tokens, stop_sequences, template, variables, metadata, ...).
        The v1 client's keywords still work: max_tokens, stop, and temperature,
        top_p, top_k, seed outside `sampling`. A str `stop_sequences` (or `stop`)
        is one sequence. `timeout_s` is the deadline of the whole stream (None:
        none; by default the client's): messages arriving steadily do not extend it.

        Close a stream you stop reading early (`async with`, `aclose()`; see
        Stream): that cancels the generation, which is then billed only for the
        tokens produced.

        Raises:
            TokenmeshRpcError: the call failed; when it failed after the stream
                started, only after the final message (finish_reason ERROR, with
                `error`) of every choice still running was yielded.
            DeadlineExceeded: (a TokenmeshRpcError) the stream outlived timeout_s;
                the messages read before stay valid.
        """
        request = pb.GenerateRequest(
            model=model, **_generation_fields(prompt, messages, sampling, fields)
        )
        return Stream(self._stream(self._stub.Generate, request, self._deadline(timeout_s)))

    async def complete(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Iterable[Turn] | None = None,
        sampling: Mapping[str, Any] | types_pb.SamplingParams | None = None,
        timeout_s: Timeout = CLIENT_DEFAULT,
        **fields: Any,
    ) -> pb.CompleteResponse:
        """Returns whole choices; arguments as for generate() (`timeout_s` is the
        deadline of the whole answer, which comes when its generation is done)."""
        request = pb.CompleteRequest(
            model=model, **_generation_fields(prompt, messages, sampling, fields)
        )
        response: pb.CompleteResponse = await self._unary(
            self._stub.Complete, request, self._deadline(timeout_s)
        )
        return response

    async def embed(
        self,
        model: str,
        inputs: str | Sequence[str],
        *,
        timeout_s: Timeout = CLIENT_DEFAULT,
        **fields: Any,
    ) -> pb.EmbedResponse:
        """Returns one embedding per input (a str is one input); `fields` are
        EmbedRequest fields (encoding, ...)."""
        request = pb.EmbedRequest(model=model, inputs=_listed(inputs), **fields)
        response: pb.EmbedResponse = await self._unary(
            self._stub.Embed, request, self._deadline(timeout_s)
        )
        return response


class V1Client(_Connection):
    """V1Client calls the v1 InferenceService: for code not yet migrated to v2.

    Arguments, `timeout_s=` on every call and errors as for Client.
    """

    _stub_type = v1_rpc.InferenceServiceStub

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        super().__init__(
            target,
            token=token,
            timeout_s=timeout_s,
            tls=tls,
            root_certificates=root_certificates,
        )

    async def __aenter__(self) -> V1Client:
        return self

    async def list_models(self, *, timeout_s: Timeout = CLIENT_DEFAULT) -> v1_pb.ListModelsResponse:
        """Returns the served models."""
        response: v1_pb.ListModelsResponse = await self._unary(
            self._stub.ListModels, v1_pb.ListModelsRequest(), self._deadline(timeout_s, lookup=True)
        )
        return response

    async def complete(
        self, model: str, prompt: str, *, timeout_s: Timeout = CLIENT_DEFAULT, **fields: Any
    ) -> v1_pb.CompleteResponse:
        """Returns a whole completion; `fields` are CompleteRequest fields (a str
        `stop` is one stop sequence)."""
        request = v1_pb.CompleteRequest(model=model, prompt=prompt, **_v1_stop(fields))
        response: v1_pb.CompleteResponse = await self._unary(
            self._stub.Complete, request, self._deadline(timeout_s)
        )
        return response

    def generate(
        self, model: str, prompt: str, *, timeout_s: Timeout = CLIENT_DEFAULT, **fields: Any
    ) -> Stream[v1_pb.GenerateResponse]:
        """Streams a generation; `fields` are GenerateRequest fields (a str `stop`
        is one stop sequence). Close a stream you stop reading early, as
        Client.generate's; `timeout_s` covers the whole stream, as there.

        A failure after the stream started is raised (TokenmeshRpcError) after the
        final message, whose `error` (v1's StreamError) says the same, was yielded.
        """
        request = v1_pb.GenerateRequest(model=model, prompt=prompt, **_v1_stop(fields))
        return Stream(self._stream(self._stub.Generate, request, self._deadline(timeout_s)))


def _v1_stop(fields: dict[str, Any]) -> dict[str, Any]:
    if "stop" in fields:
        fields["stop"] = _listed(fields["stop"])
    return fields
