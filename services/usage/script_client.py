"""A lean, pipelined Redis client for one Lua script on the rate limiter's hot path.

redis-py's asyncio client spends ~0.25 ms of CPU per command (connection-pool
checkout, argument normalisation, parsing); at hundreds of decisions per
second that was a quarter of the limiter's CPU. On this kind of VM a Redis
round trip also costs ~0.1 ms of CPU in syscalls and event-loop wake-ups, so
the client minimises both:

- Group commit: a call made while nothing is in flight is written at once;
  calls made while a write awaits its replies are held and written together
  (one syscall) when the last reply arrives. An idle limiter answers in one
  round trip; under load batches grow by themselves.
- Replies are parsed in the protocol's `data_received` (hiredis' C parser) and
  resolve their callers' futures there: no reader task to wake in between.
- One timer per written batch, not one per call.

Anything unusual — a lost connection, a timeout, a Redis that is loading,
busy, read-only or out of memory — fails every waiting call with
`ScriptUnavailable` and reconnects on the next call; the caller decides what
an unavailable Redis means. An error the script itself raised (a bug, or a key
of the wrong type) is a `ScriptError`: retrying elsewhere would not help.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import typing
import urllib.parse
from collections.abc import Sequence

import hiredis

from services.core.breaker import StoreAnswered
from services.core.store_errors import REFUSAL_CODES, reply_code

Arg = str | int | bytes


# Codes of error replies that mean "this Redis cannot run commands now", not "the
# script failed": every service's refusals (services/core/store_errors.py), those
# redis-py raises as connection errors (LOADING, NOAUTH), and three more this
# client has always told apart (BUSY: another script runs too long; MISCONF: writes
# stopped after a failed save; NOREPLICAS: too few replicas to write to).
_UNAVAILABLE_CODES = REFUSAL_CODES | {"BUSY", "LOADING", "MISCONF", "NOAUTH", "NOREPLICAS"}


class ScriptUnavailable(Exception):
    """ScriptUnavailable reports that Redis could not run the script."""


class ScriptRefused(ScriptUnavailable, StoreAnswered):
    """ScriptRefused: Redis answered that it cannot run it now (loading, busy,
    read-only, out of memory): unavailable, but not hung."""


class ScriptError(Exception):
    """ScriptError reports that the script ran and failed (its error reply)."""


def _command(*parts: Arg) -> bytes:
    encoded = [p if isinstance(p, bytes) else str(p).encode() for p in parts]
    out = [b"*%d\r\n" % len(encoded)]
    for part in encoded:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _RedisProtocol(asyncio.Protocol):
    """One connection: writes batches, matches replies to waiting futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._parser = hiredis.Reader()
        self._waiting: collections.deque[asyncio.Future[object]] = collections.deque()
        self._in_flight = 0  # commands written, not yet answered
        self._held: list[bytes] = []  # commands waiting for the in-flight batch
        self._held_futures: list[asyncio.Future[object]] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def call(self, command: bytes) -> asyncio.Future[object]:
        """Queues `command`; the future gets its reply (or ScriptUnavailable)."""
        future = self.loop.create_future()
        if self.transport is None:
            future.set_exception(ScriptUnavailable("connection lost"))
        elif self._in_flight:
            self._held.append(command)
            self._held_futures.append(future)
        else:
            self._write([command], [future])
        return future

    def _write(self, commands: list[bytes], futures: list[asyncio.Future[object]]) -> None:
        assert self.transport is not None
        self._waiting.extend(futures)
        self._in_flight += len(commands)
        self.transport.write(b"".join(commands) if len(commands) > 1 else commands[0])
        self._timer = self.loop.call_later(self.timeout_s, self._timed_out)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not False:
                future = self._waiting.popleft()
                self._in_flight -= 1
                if not future.done():  # its caller may have gone
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(ScriptUnavailable(type(exc).__name__))
            return
        if self._in_flight == 0:
            self._cancel_timer()
            if self._held:
                commands, futures = self._held, self._held_futures
                self._held, self._held_futures = [], []
                self._write(commands, futures)

    def _timed_out(self) -> None:
        self.fail(ScriptUnavailable("TimeoutError"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ScriptUnavailable("Redis closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)

    def fail(self, error: Exception) -> None:
        """Drops the connection; every waiting call fails (order is lost with it)."""
        self._cancel_timer()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        for future in (*self._waiting, *self._held_futures):
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        self._held.clear()
        self._held_futures.clear()
        self._in_flight = 0


class ScriptClient:
    """ScriptClient runs one Lua script on a redis:// URL, pipelining concurrent calls.

    Args:
        url: redis://[username:password@]host[:port][/db] (username, optional: an ACL user).
        script: the Lua source.
        timeout_s: how long a call may wait for its reply.
    """

    def __init__(self, url: str, script: str, timeout_s: float = 1.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "redis":
            raise ValueError("ScriptClient speaks plain redis:// only")
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.username = urllib.parse.unquote(parsed.username) if parsed.username else None
        self.password = urllib.parse.unquote(parsed.password) if parsed.password else None
        self.db = int(parsed.path.strip("/") or 0)
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.timeout_s = timeout_s
        self._protocol: _RedisProtocol | None = None
        self._connecting = asyncio.Lock()

    async def __call__(self, *, keys: Sequence[str], args: Sequence[Arg]) -> object:
        """Runs the script; raises ScriptUnavailable or ScriptError."""
        reply = await self._send(_command("EVALSHA", self.sha, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await self._send(_command("EVAL", self.script, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError):
            # reply_code: Redis before 7 wraps a refusal met inside the script in a
            # generic ERR, which read as a script's bug (INTERNAL, with a traceback).
            if reply_code(str(reply)) in _UNAVAILABLE_CODES:
                raise ScriptRefused(str(reply))
            raise ScriptError(str(reply))
        return reply

    async def _send(self, command: bytes) -> object:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            protocol = await self._connection()
        return await protocol.call(command)

    async def _connection(self) -> _RedisProtocol:
        async with self._connecting:
            current = self._protocol
            if current is not None and current.transport is not None:
                return current
            self._protocol = None
            loop = asyncio.get_running_loop()
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _RedisProtocol(loop, self.timeout_s), self.host, self.port
                    ),
                    self.timeout_s,
                )
            except (TimeoutError, OSError) as exc:
                raise ScriptUnavailable(type(exc).__name__) from None
            # Callers see the connection only once it is set up, so no
            # command of theirs can overtake AUTH or SELECT.
            if self.username:
                # An ACL user: AUTH with the password alone would log in as "default".
                auth = _command("AUTH", self.username, self.password or "")
                await self._expect_ok(protocol, auth)
            elif self.password:
                await self._expect_ok(protocol, _command("AUTH", self.password))
            if self.db:
                await self._expect_ok(protocol, _command("SELECT", self.db))
            self._protocol = protocol
            return protocol

    @staticmethod
    async def _expect_ok(protocol: _RedisProtocol, command: bytes) -> None:
        reply = await protocol.call(command)
        if isinstance(reply, hiredis.ReplyError):
            protocol.fail(ScriptUnavailable(str(reply)))
            raise ScriptUnavailable(str(reply))

    async def close(self) -> None:
        """Closes the connection and waits until it is gone."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(ScriptUnavailable("closed"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(protocol.closed, self.timeout_s)
