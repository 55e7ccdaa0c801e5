"""REST cases: hostile HTTP/1.1 requests written byte by byte, and a raw client.

Requests are written on a plain socket, not through an HTTP library, so a
case can carry what libraries refuse to send: CR/LF inside a header value,
a NUL in the path, conflicting Content-Length and Transfer-Encoding,
headers of a megabyte, thousands of headers, bodies that do not match
their declared length.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from tools.fuzz.targets import WORK_RPCS, Route, Rpc
from tools.fuzz.verdict import Outcome, problems

MAX_RESPONSE_BYTES = 2_000_000
# Path segments that probe normalisation and decoding.
PATH_TRICKS = (
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F%2E%2E",
    "a%2Fb",
    "a%2fb%2f..%2f..%2fauth%2fkeys",
    "%2F",
    "%00",
    "a%00b",
    "%ff",
    "%C0%AF",
    "%",
    "%zz",
    "a;b",
    "a%3Ab",
    "a:b",
    "*",
    "%20",
    "a%0d%0ax-injected:%201",
    "%E2%80%AE",
    "~",
)
# Whole request targets that probe routing around the public routes, and
# whether each may be answered without credentials (a 2xx to any other one
# without them is a bypass).
TARGET_TRICKS = (
    ("/v1/models/../auth/keys", False),
    ("/v1/models/%2e%2e/auth/keys", False),
    ("/v1/models/..%2Fauth%2Fkeys", False),
    ("//v1/models", False),
    ("/./v1/models", False),
    ("/v1//models", False),
    ("/V1/MODELS", False),
    ("/v1/models#frag", False),
    ("/v1/models?", False),
    ("/v1/models?page_size=1&page_size=2", False),
    ("/v1/models%00", False),
    ("/v1/models\x00", False),
    ("*", False),
    ("http://127.0.0.1/v1/models", False),
    ("/healthz/../v1/auth/keys", False),
    ("/.well-known/jwks.json/..", True),
    ("/.well-known/jwks.json?x=1", True),
    ("/healthz?x=1", True),
    ("/tokenmesh.auth.v1.AuthService/ListApiKeys", False),
    ("/tokenmesh.inference.v1.InferenceAdminService/UnloadModel", False),
    ("/tokenmesh.router.v1.WorkerRegistryService/RegisterWorker", False),
    ("/tokenmesh.usage.v1.UsageService/GetUsage", False),
    ("/grpc.health.v1.Health/Check", True),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
    ("/envoy.service.auth.v3.Authorization/Check", False),
    ("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", False),
    ("/stats", False),
    ("/metrics", False),
    ("/" + "a" * 70_000, False),
)
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin1",
    "text/plain",
    "text/event-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/grpc",
    "application/grpc+proto",
    "application/grpc-web",
    "application/grpc-web-text",
    "application/xml",
    "*/*",
    "",
    "application/json\x00",
)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO")
HUGE_BODY_SIZES = (1_100_000, 8_500_000)
HUGE_HEADER_SIZES = (9_000, 70_000, 1_100_000)
NESTING_DEPTHS = (100, 1_000, 100_000)


@dataclass(frozen=True)
class HttpCase:
    """HttpCase is one hostile HTTP/1.1 request, exactly as it goes on the wire."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    credentials: str  # "admin" or a kind of missing/invalid credential
    public: bool  # whether the target may answer 2xx without credentials
    content_length: bool = True  # add a Content-Length that matches the body

    @property
    def framed(self) -> bool:
        """Tells whether the edge can know where the request ends (so it must answer in time)."""
        framing = {"content-length", "transfer-encoding", "expect", "content-encoding"}
        return self.content_length and not any(
            n.lower() in framing or "\r" in v or "\n" in v or "\r" in n for n, v in self.headers
        )

    def wire(self, host: str, admin_key: str) -> bytes:
        """Returns the request's bytes."""
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}", "Connection: close"]
        if self.credentials == "admin":
            lines.append(f"x-api-key: {admin_key}")
        elif self.credentials == "bad-key":
            lines.append("x-api-key: tm_" + "A" * 43)
        elif self.credentials == "bad-jwt":
            lines.append("authorization: Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
        elif self.credentials == "spoofed":
            lines += ["x-tokenmesh-scopes: admin", "x-tokenmesh-key-id: spoofed"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.content_length:
            lines.append(f"Content-Length: {len(self.body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Makes hypothesis print the short repr (not every field of a multi-MB case)."""
        printer.text(repr(self))

    def __repr__(self) -> str:  # what hypothesis prints for a failing case
        headers = [(n[:80], v[:80]) for n, v in self.headers[:8]]
        return (
            f"HttpCase({self.method} {self.target[:300]!r} credentials={self.credentials!r} "
            f"headers={headers} ({len(self.headers)}) body={self.body[:300]!r} "
            f"({len(self.body)} bytes) content_length={self.content_length})"
        )


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


def _quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def path_values(hints: Sequence[str]) -> st.SearchStrategy[str]:
    """A path variable's value: a hint, random text (percent-encoded), or a trick."""
    options = [
        st.text(max_size=30).map(_quoted),
        st.sampled_from(PATH_TRICKS),
        st.binary(min_size=1, max_size=20).map(lambda b: urllib.parse.quote_from_bytes(b, safe="")),
        st.sampled_from((200, 5_000, 70_000)).map(lambda n: "a" * n),
    ]
    if hints:
        options.insert(0, st.sampled_from(tuple(hints)))
    return st.one_of(options)


def _json_scalars() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.sampled_from(("", "NaN", "Infinity", "-1", "1e999", "\ud800", "\x00", "../..")),
    )


def _json_values() -> st.SearchStrategy[object]:
    return st.recursive(
        _json_scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _field_value(
    field: FieldDescriptor, hints: Mapping[str, Sequence[str]]
) -> st.SearchStrategy[object]:
    """A JSON value for `field`: sometimes of its type, often not."""
    typed: st.SearchStrategy[object]
    if field.type == FieldDescriptor.TYPE_STRING:
        typed = st.one_of(
            st.sampled_from(tuple(hints.get(field.name, ("x",)))), st.text(max_size=40)
        )
    elif field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        typed = st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from(("NaN", "Infinity", "-Infinity", "1e39")),
        )
    elif field.type == FieldDescriptor.TYPE_BOOL:
        typed = st.booleans()
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        typed = st.dictionaries(st.text(max_size=10), _json_scalars(), max_size=3)
    else:  # integers and enums (as numbers or names)
        typed = st.one_of(
            st.integers(-(2**65), 2**65), st.text(max_size=12), st.sampled_from(("1e3", "0x10"))
        )
    if field.is_repeated:
        typed = st.one_of(
            st.lists(typed, max_size=5),
            st.sampled_from((1_000, 50_000)).map(lambda n: ["x"] * n),
        )
    return st.one_of(typed, typed, _json_values())


def json_bodies(
    message: Descriptor, hints: Mapping[str, Sequence[str]]
) -> st.SearchStrategy[bytes]:
    """JSON objects with the message's field names (mostly) and hostile values."""
    known = {f.name: _field_value(f, hints) for f in message.fields}
    fields = st.fixed_dictionaries({}, optional=known)
    extra = st.dictionaries(st.text(max_size=12), _json_values(), max_size=2)
    return st.tuples(fields, extra).map(
        lambda t: json.dumps({**t[1], **t[0]}, allow_nan=True).encode("utf-8", "surrogatepass")
    )


def hostile_bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are not the JSON the route expects."""
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            (
                b"",
                b"{",
                b"{}}",
                b"null",
                b"[]",
                b'"x"',
                b"1e999999",
                b'{"prompt": NaN}',
                b'{"prompt": "\xff\xfe"}',
                b'{"prompt": "\\ud800"}',
                b'{"model": "a", "model": "b"}',
                b"\xef\xbb\xbf{}",
                b'{"prompt": "x"}' + b"\x00" * 8,
            )
        ),
        st.sampled_from(NESTING_DEPTHS).map(lambda n: b"[" * n + b"]" * n),
        st.sampled_from(NESTING_DEPTHS).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.sampled_from(HUGE_BODY_SIZES).map(lambda n: b'{"prompt": "' + b"A" * n + b'"}'),
        st.sampled_from(HUGE_BODY_SIZES).map(lambda n: b"[" + b"1," * (n // 2) + b"1]"),
    )


def hostile_headers() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Headers that attack parsing and trust: injection, size, count, spoofing, smuggling."""
    one = st.one_of(
        st.sampled_from(
            (
                ("x-test", "a\r\nx-injected: 1"),
                ("x-test", "a\nx-injected: 1"),
                ("x-test", "a\rb"),
                ("x-test", "a\x00b"),
                ("x-test", "\xff\xfe"),
                ("x test", "1"),
                ("x-test:", "1"),
                ("", "empty name"),
                ("x-test", " folded\r\n continued"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "5"),
                ("content-length", "-1"),
                ("content-length", "99999999999999999999"),
                ("content-encoding", "gzip"),
                ("expect", "100-continue"),
                ("upgrade", "h2c"),
                ("connection", "upgrade, x-api-key"),
                ("te", "trailers"),
                ("grpc-timeout", "1n"),
                ("grpc-encoding", "gzip"),
                ("x-envoy-upstream-rq-timeout-ms", "1"),
                ("x-envoy-original-path", "/v1/auth/keys"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-tokenmesh-models", "*"),
                ("x-tokenmesh-route-model", "demo-lm"),
                ("x-tokenmesh-model", "demo-lm"),
                ("x-model-version", "../../etc"),
                ("x-model-version", "a\tb"),
                ("x-request-id", "\u202eevil"),
                ("x-api-key", "\x00"),
                ("authorization", "Bearer " + "A" * 9000),
                ("authorization", "Basic Og=="),
                ("host", "evil.example"),
            )
        ),
        st.tuples(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
            st.text(max_size=40),
        ),
    )
    return st.one_of(
        st.lists(one, max_size=3).map(tuple),
        st.sampled_from(HUGE_HEADER_SIZES).map(lambda n: (("x-huge", "A" * n),)),
        st.sampled_from((150, 2_000)).map(lambda n: tuple((f"x-h{i}", "1") for i in range(n))),
    )


def _query(
    route: Route, message: Descriptor, hints: Mapping[str, Sequence[str]]
) -> st.SearchStrategy[str]:
    """A query string: the request's fields (for GET routes) and others, with hostile values."""
    names = [f.name for f in message.fields if f.name not in route.variables()]
    name = st.one_of(st.sampled_from(names or ["x"]), st.text(max_size=10).map(_quoted))
    value = st.one_of(
        st.sampled_from(("1", "-1", "0", "99999999999999999999", "abc", "1.5", "true", "")),
        st.text(max_size=20).map(_quoted),
        st.sampled_from(PATH_TRICKS),
    )
    pairs = st.lists(st.tuples(name, value), max_size=4)
    return pairs.map(lambda ps: "&".join(f"{k}={v}" for k, v in ps))


@st.composite
def _target(
    draw: st.DrawFn, rpc: Rpc, route: Route, hints: Mapping[str, Sequence[str]]
) -> tuple[str, bool]:
    """(request target, whether it may answer without credentials)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(TARGET_TRICKS))
    message = rpc.input
    path = route.template
    for name in route.variables():
        value = draw(path_values(hints.get(name, ())))
        start = path.index("{" + name)
        path = path[:start] + value + path[path.index("}", start) + 1 :]
    query = draw(_query(route, message, hints)) if route.body == "" or draw(st.booleans()) else ""
    return (f"{path}?{query}" if query else path), rpc.public


@st.composite
def http_cases(
    draw: st.DrawFn, rpc: Rpc, hints: Mapping[str, Sequence[str]], credentials: Sequence[str]
) -> HttpCase:
    """Hostile requests for `rpc`'s REST route."""
    assert rpc.route is not None
    route = rpc.route
    method = route.method if draw(st.integers(0, 5)) else draw(st.sampled_from(METHODS))
    target, public = draw(_target(rpc, route, hints))
    body = b""
    if route.body or draw(st.integers(0, 5)) == 0:
        body = draw(
            st.one_of(
                json_bodies(rpc.input, hints), json_bodies(rpc.input, hints), hostile_bodies()
            )
        )
    headers: list[tuple[str, str]] = []
    if body or draw(st.booleans()):
        content_type = (
            "application/json" if draw(st.booleans()) else draw(st.sampled_from(CONTENT_TYPES))
        )
        headers.append(("content-type", content_type))
    headers += draw(hostile_headers()) if draw(st.integers(0, 2)) == 0 else ()
    content_length = draw(st.integers(0, 15)) != 0
    return HttpCase(
        method,
        target,
        tuple(headers),
        body,
        draw(st.sampled_from(credentials)),
        public,
        content_length,
    )


# ---------------------------------------------------------------------------
# Sending and judging
# ---------------------------------------------------------------------------


def _complete(response: bytes) -> bool:
    """Tells whether `response` holds a whole final HTTP/1.1 response.

    Envoy keeps a connection open for a second after a local reply even when
    asked to close it, so the reader stops at the end of the message instead.
    """
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    if re.match(rb"HTTP/1\.[01] 1\d\d ", head):
        return _complete(body)  # 100 Continue: the answer follows
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    if length is not None:
        return len(body) >= int(length.group(1))
    if re.search(rb"\r\ntransfer-encoding: *chunked", head, re.IGNORECASE):
        return (
            body.startswith(b"0\r\n")
            and body.endswith(b"\r\n\r\n")
            or (b"\r\n0\r\n" in body and body.endswith(b"\r\n\r\n"))
        )
    return False  # read until the edge closes


def _read(sock: socket.socket, deadline: float) -> bytes:
    received = bytearray()
    while len(received) < MAX_RESPONSE_BYTES and not _complete(bytes(received)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


def _grpc_status(response: bytes) -> str | None:
    """The grpc-status of a gRPC response carried over HTTP/1.1 (in headers or trailers)."""
    match = re.search(rb"\r\ngrpc-status: *(\d+)", response, re.IGNORECASE)
    return match.group(1).decode() if match else None


def send(host: str, port: int, case: HttpCase, admin_key: str, timeout_s: float) -> Outcome:
    """Sends one case on a fresh connection and returns what came back."""
    started = time.monotonic()
    deadline = started + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(case.wire(f"{host}:{port}", admin_key))
        except (TimeoutError, ConnectionError):
            pass  # the edge may answer (413, 400) and close before it read everything
        response = _read(sock, deadline)
    elapsed = time.monotonic() - started
    if not response:
        return Outcome("timeout" if time.monotonic() >= deadline else "closed", "", elapsed)
    while re.match(rb"HTTP/1\.[01] 1\d\d ", response):  # 100 Continue, then the answer
        response = response.partition(b"\r\n\r\n")[2]
    match = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    if match is None:
        return Outcome("garbled", response.decode("latin-1"), elapsed)
    code = int(match.group(1))
    status = f"HTTP {code}"
    grpc_status = _grpc_status(response)
    if grpc_status is not None and grpc_status != "0":
        status += f" grpc-status {grpc_status}"
    # A success's body is the API's output (which may hold what earlier cases
    # stored): only errors and event streams (in-band errors) are read for leaks.
    readable = code >= 300 or b"text/event-stream" in response.partition(b"\r\n\r\n")[0]
    return Outcome(status, response.decode("latin-1") if readable else "", elapsed)


_GRPC_FAULTS = {
    "2",
    "13",
    "15",
    "14",
    "12",
}  # UNKNOWN, INTERNAL, DATA_LOSS, UNAVAILABLE, UNIMPLEMENTED


def judge(rpc: Rpc, case: HttpCase, outcome: Outcome) -> list[str]:
    """Returns why `outcome` is our fault (see tools.fuzz.verdict)."""
    found = problems(
        outcome,
        case.wire("", ""),
        authenticated=case.credentials == "admin",
        public=case.public,
        may_take_long=rpc.name in WORK_RPCS or not case.framed,
    )
    grpc_status = (
        outcome.status.rpartition("grpc-status ")[2] if "grpc-status" in outcome.status else None
    )
    if grpc_status in _GRPC_FAULTS:
        found.append(f"server error {outcome.status}")
    return found
