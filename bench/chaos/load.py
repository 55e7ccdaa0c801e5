"""A steady, bounded, mixed load through the edge, and what each request saw.

Each lane is a thread that calls the edge back to back (closed loop) with one
API key until it is stopped or reaches its request cap: gRPC Generate streams,
gRPC Complete and Embed, and REST (an SSE stream and a unary completion). Every
request carries its own `request_id`, so its usage can be found in the audit log.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import httpx

from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

GENERATE_MODEL = "deterministic-test"
EMBED_MODEL = "all-minilm-l6-v2"
# A stream is 32 steps of the test model (20 ms each): most of the time a lane
# is mid-stream, so a fault finds streams in flight.
STREAM_TOKENS = 32
STREAM_TIMEOUT_S = 30.0
UNARY_TIMEOUT_S = 15.0
PAUSE_AFTER_FAILURE_S = 0.05  # a failing lane does not spin
# The response header a worker sends with the headers of a stream it took.
WORKER_HEADER = "x-tokenmesh-worker"
# Reconnect within a second once the edge is back (gRPC's default backoff grows
# to two minutes): the suite measures the mesh, not the client's backoff.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class Outcome:
    """Outcome is what the client saw of one request."""

    lane: str
    request_id: str
    start: float  # monotonic
    end: float
    status: str  # "OK", a gRPC code name, "HTTP 503", "transport", "in-band error"
    stream: bool = False
    cut: bool = False  # a stream that started and ended without its final message
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        """Tells whether the request succeeded (and was received whole)."""
        return self.status == "OK"


@dataclass
class _Partial:
    """_Partial is what a lane collected while a request ran."""

    messages: int = 0
    final: dict[str, int] | None = None  # the usage of the final message
    # The worker's response headers arrived: it had taken the stream, and the edge
    # can no longer retry it elsewhere.
    started: bool = False


class Lane:
    """Lane sends one kind of request back to back from its own thread."""

    def __init__(self, name: str, call: Callable[[str], Outcome], prefix: str, cap: int) -> None:
        self.name = name
        self._call = call
        self._prefix = prefix
        self._cap = cap
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lane-{name}", daemon=True)

    def start(self) -> None:
        """Starts sending."""
        self._thread.start()

    def stop(self, timeout_s: float = STREAM_TIMEOUT_S + 5) -> None:
        """Stops after the request in flight (which is recorded)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def ok_since(self, t: float) -> int:
        """Returns how many requests started at or after `t` succeeded."""
        return sum(1 for o in list(self.outcomes) if o.ok and o.start >= t)

    def _run(self) -> None:
        for n in range(self._cap):
            if self._stop.is_set():
                return
            outcome = self._call(f"{self._prefix}-{self.name}-{n}")
            self.outcomes.append(outcome)
            if not outcome.ok:
                self._stop.wait(PAUSE_AFTER_FAILURE_S)


class Clients:
    """Clients holds one key's gRPC channel and HTTP client to the edge."""

    def __init__(self, edge_address: str, edge_url: str, secret: str) -> None:
        self.metadata = (("x-api-key", secret),)
        self.channel = grpc.insecure_channel(edge_address, options=CHANNEL_OPTIONS)
        self.stub = rpc.InferenceServiceStub(self.channel)
        self.http = httpx.Client(
            base_url=edge_url, headers={"x-api-key": secret}, timeout=STREAM_TIMEOUT_S
        )

    def close(self) -> None:
        """Closes the channel and the HTTP client."""
        self.channel.close()
        self.http.close()

    def lanes(self, prefix: str, cap: int) -> list[Lane]:
        """Returns the mixed load's lanes, not started."""
        calls: dict[str, Callable[[str], Outcome]] = {
            "grpc-stream-a": self.grpc_generate,
            "grpc-stream-b": self.grpc_generate,
            "grpc-complete": self.grpc_complete,
            "grpc-embed": self.grpc_embed,
            "rest-sse": self.rest_generate,
            "rest-complete": self.rest_complete,
        }
        return [Lane(name, call, prefix, cap) for name, call in calls.items()]

    def grpc_generate(self, request_id: str) -> Outcome:
        """One gRPC Generate stream, read to its end."""
        request = pb.GenerateRequest(
            model=GENERATE_MODEL,
            prompt=_prompt(request_id),
            max_tokens=STREAM_TOKENS,
            request_id=request_id,
        )
        start, seen = time.monotonic(), _Partial()
        try:
            call = self.stub.Generate(request, metadata=self.metadata, timeout=STREAM_TIMEOUT_S)
            seen.started = any(name == WORKER_HEADER for name, _ in call.initial_metadata() or ())
            for message in call:
                seen.messages += 1
                if message.finish_reason:
                    seen.final = _usage(message.usage) if message.finish_reason != "error" else {}
        except grpc.RpcError as exc:
            return _stream_outcome("grpc-stream", request_id, start, seen, exc.code().name)
        return _stream_outcome("grpc-stream", request_id, start, seen, None)

    def grpc_complete(self, request_id: str) -> Outcome:
        """One gRPC Complete call."""
        request = pb.CompleteRequest(
            model=GENERATE_MODEL, prompt=_prompt(request_id), max_tokens=4, request_id=request_id
        )
        start = time.monotonic()
        try:
            reply = self.stub.Complete(request, metadata=self.metadata, timeout=UNARY_TIMEOUT_S)
        except grpc.RpcError as exc:
            return Outcome("grpc-complete", request_id, start, time.monotonic(), exc.code().name)
        return _ok("grpc-complete", request_id, start, _usage(reply.usage))

    def grpc_embed(self, request_id: str) -> Outcome:
        """One gRPC Embed call of two short texts."""
        request = pb.EmbedRequest(
            model=EMBED_MODEL, inputs=["kitten", "a cat"], request_id=request_id
        )
        start = time.monotonic()
        try:
            reply = self.stub.Embed(request, metadata=self.metadata, timeout=UNARY_TIMEOUT_S)
        except grpc.RpcError as exc:
            return Outcome("grpc-embed", request_id, start, time.monotonic(), exc.code().name)
        return _ok("grpc-embed", request_id, start, _usage(reply.usage))

    def rest_complete(self, request_id: str) -> Outcome:
        """One REST completion."""
        body = {"prompt": _prompt(request_id), "max_tokens": 4, "request_id": request_id}
        start = time.monotonic()
        try:
            reply = self.http.post(
                f"/v1/models/{GENERATE_MODEL}:complete", json=body, timeout=UNARY_TIMEOUT_S
            )
        except httpx.TransportError:
            return Outcome("rest-complete", request_id, start, time.monotonic(), "transport")
        if reply.status_code != 200:
            status = f"HTTP {reply.status_code}"
            return Outcome("rest-complete", request_id, start, time.monotonic(), status)
        return _ok("rest-complete", request_id, start, reply.json().get("usage", {}))

    def rest_generate(self, request_id: str) -> Outcome:
        """One REST Generate as Server-Sent Events, read to its end."""
        body = {
            "prompt": _prompt(request_id),
            "max_tokens": STREAM_TOKENS,
            "request_id": request_id,
        }
        start, seen = time.monotonic(), _Partial()
        try:
            with self.http.stream(
                "POST", f"/v1/models/{GENERATE_MODEL}:generate", json=body
            ) as response:
                if response.status_code != 200:
                    status = f"HTTP {response.status_code}"
                    return Outcome("rest-sse", request_id, start, time.monotonic(), status)
                seen.started = WORKER_HEADER in response.headers
                for line in response.iter_lines():
                    _read_event(line, seen)
        except httpx.TransportError:
            return _stream_outcome("rest-sse", request_id, start, seen, "transport")
        return _stream_outcome("rest-sse", request_id, start, seen, None)


def _prompt(request_id: str) -> str:
    """Returns a prompt whose head varies, so the edge's prefix hashing spreads the load."""
    return f"{zlib.crc32(request_id.encode()) % 997} chaos"


def _read_event(line: str, seen: _Partial) -> None:
    if not line.startswith("data: "):
        return
    event = json.loads(line[6:])
    seen.messages += 1
    reason = event.get("finish_reason")
    if reason:
        seen.final = event.get("usage", {}) if reason != "error" else {}


def _stream_outcome(
    lane: str, request_id: str, start: float, seen: _Partial, error: str | None
) -> Outcome:
    """Classifies a stream: whole, failed before a worker took it, cut (after its
    worker's headers or first message), or in-band error."""
    end = time.monotonic()
    if seen.final:
        return _ok(lane, request_id, start, seen.final, stream=True)
    if seen.final is not None:
        return Outcome(lane, request_id, start, end, "in-band error", stream=True)
    if seen.messages == 0 and not seen.started:
        return Outcome(lane, request_id, start, end, error or "empty stream", stream=True)
    return Outcome(lane, request_id, start, end, error or "truncated", stream=True, cut=True)


def _usage(message: object) -> dict[str, int]:
    return {
        "prompt_tokens": int(getattr(message, "prompt_tokens", 0)),
        "completion_tokens": int(getattr(message, "completion_tokens", 0)),
    }


def _ok(
    lane: str, request_id: str, start: float, usage: dict[str, int], stream: bool = False
) -> Outcome:
    """Returns a success that received `usage`."""
    return Outcome(
        lane,
        request_id,
        start,
        time.monotonic(),
        "OK",
        stream=stream,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )
