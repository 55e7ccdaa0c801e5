"""gRPC cases: raw request bytes plus credentials, sent through the edge."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_status import rpc_status
from hypothesis import strategies as st

from tools.fuzz.targets import WORK_RPCS, Rpc
from tools.fuzz.verdict import Outcome, problems
from tools.fuzz.wire import message_payloads

# Values a field of that name may hold (so that cases reach past "not found").
FIELD_HINTS = {
    "model": ("deterministic-test", "all-minilm-l6-v2", "demo-lm"),
    "fallback_model": ("deterministic-test", "demo-lm"),
    "version": ("1", "2", "latest"),
    "tenant": ("dev", "default"),
}
# Credentials a case may carry; only "admin" is valid. "spoofed" sends the
# identity headers only the edge may set.
CREDENTIALS = ("admin", "admin", "admin", "none", "bad-key", "bad-jwt", "spoofed")
MAX_STREAM_MESSAGES = 64
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class GrpcCase:
    """GrpcCase is one hostile call: the request's bytes and which credentials it carries."""

    payload: bytes
    credentials: str

    def metadata(self, admin_key: str) -> tuple[tuple[str, str | bytes], ...]:
        """Returns the call's metadata for its credentials."""
        pairs: dict[str, list[tuple[str, str | bytes]]] = {
            "admin": [("x-api-key", admin_key)],
            "none": [],
            "bad-key": [("x-api-key", "tm_" + "A" * 43)],
            "bad-jwt": [("authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")],
            "spoofed": [
                ("x-tokenmesh-scopes", "admin"),
                ("x-tokenmesh-key-id", "spoofed"),
                ("x-tokenmesh-tenant", "spoofed"),
            ],
        }
        return tuple(pairs[self.credentials])

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Makes hypothesis print the short repr (not every field of a multi-MB case)."""
        printer.text(repr(self))

    def __repr__(self) -> str:  # what hypothesis prints for a failing case
        head, size = self.payload[:200], len(self.payload)
        return f"GrpcCase(credentials={self.credentials!r}, payload={head!r} ({size} bytes))"


def grpc_cases(rpc: Rpc) -> st.SearchStrategy[GrpcCase]:
    """Hostile calls of `rpc`."""
    return st.builds(
        GrpcCase, message_payloads(rpc.input, hints=FIELD_HINTS), st.sampled_from(CREDENTIALS)
    )


def _error_text(error: grpc.RpcError) -> str:
    """Everything a client can read from a failed call: message, details, trailers."""
    parts = [str(error.details() or "")] if isinstance(error, grpc.Call) else [str(error)]
    if isinstance(error, grpc.Call):
        for name, value in error.trailing_metadata() or ():
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            parts.append(f"{name}: {value}")
        try:
            status = rpc_status.from_call(error)
        except ValueError:
            status = None
        if status is not None:
            parts.append(str(status))
    return "\n".join(parts)


def _code(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    return code.name if code is not None else "UNKNOWN"


def _stream_errors(rpc: Rpc, messages: Sequence[bytes]) -> str:
    """Returns the in-band error fields of streamed responses (where a stream reports failure)."""
    response = message_factory.GetMessageClass(rpc.method.output_type)
    texts = []
    for raw in messages:
        try:
            parsed = response.FromString(raw)
        except DecodeError:
            texts.append("<undecodable response>")
            continue
        error = response.DESCRIPTOR.fields_by_name.get("error")
        if error is not None and parsed.HasField("error"):
            texts.append(str(getattr(parsed, error.name)))
    return "\n".join(texts)


def call(
    channel: grpc.Channel, rpc: Rpc, case: GrpcCase, admin_key: str, timeout_s: float
) -> Outcome:
    """Sends one case and returns what came back (never raises for an RPC error)."""
    started = time.monotonic()
    metadata = case.metadata(admin_key)
    try:
        if rpc.server_streaming:
            streaming: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(rpc.path)
            stream = streaming(case.payload, metadata=metadata, timeout=timeout_s)
            messages: list[bytes] = []
            for message in stream:
                messages.append(message)
                if len(messages) >= MAX_STREAM_MESSAGES:
                    stream.cancel()
                    break
            return Outcome("OK", _stream_errors(rpc, messages), time.monotonic() - started)
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(rpc.path)
        unary(case.payload, metadata=metadata, timeout=timeout_s)
        return Outcome("OK", "", time.monotonic() - started)
    except grpc.RpcError as error:
        return Outcome(_code(error), _error_text(error), time.monotonic() - started)


def judge(rpc: Rpc, case: GrpcCase, outcome: Outcome) -> list[str]:
    """Returns why `outcome` is our fault (see tools.fuzz.verdict)."""
    return problems(
        outcome,
        case.payload,
        authenticated=case.credentials == "admin",
        public=rpc.public,
        may_take_long=rpc.name in WORK_RPCS,
    )
