"""Webhook receivers for tests: real HTTP servers on 127.0.0.1 (threads of the test
process), one that answers at once (or after a pause of its own) and one that never
finishes its answer."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Received:
    """Received is one request a Receiver answered."""

    path: str
    headers: dict[str, str]
    body: bytes


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a sender's 16 connections at once had
    # SYNs dropped and retried 1-3 s later (or timed out), which tests read as slowness.
    request_queue_size = 128
    daemon_threads = True


class Receiver:
    """An HTTP receiver on 127.0.0.1 that answers every POST 204 (`answer_s` after it
    read it; held, once released) and records it.

    Attributes:
        open: requests it is answering now.
        most_open: the most it answered at once.
    """

    def __init__(self, answer_s: float = 0.0) -> None:
        self.received: list[Received] = []
        self.open = 0
        self.most_open = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver._opened()
                try:
                    # The receiver's pace (a sub-second answer), not a test's wait.
                    time.sleep(answer_s)
                    receiver._released.wait()
                    receiver.received.append(Received(self.path, headers, body))
                    self.send_response(204)
                    self.end_headers()
                finally:
                    receiver._closed()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self) -> None:
        """Answers no request until released."""
        self._released.clear()

    def release(self) -> None:
        """Answers the requests held, and those after them at once."""
        self._released.set()

    def _opened(self) -> None:
        with self._lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)

    def _closed(self) -> None:
        with self._lock:
            self.open -= 1

    @property
    def hosts(self) -> list[str]:
        """The Host header of each request, in order."""
        return [r.headers.get("host", "") for r in self.received]

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


class Tarpit:
    """A receiver that reads a request, sends a 200 status line and headers, then one
    byte of the body every `trickle_s` until released: never idle long enough for a
    read timeout, so only a bound on the whole attempt ends it.

    Attributes:
        open: connections it holds now.
        most_open: the most it held at once.
    """

    def __init__(self, trickle_s: float = 0.2) -> None:
        self.trickle_s = trickle_s
        self.released = threading.Event()
        self.open = 0
        self.most_open = 0
        self._lock = threading.Lock()
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._socket.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.released.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
            # The receiver's pace, not a test's wait: released, it stops at once.
            while not self.released.wait(self.trickle_s):
                conn.sendall(b"x")
        except OSError:
            pass  # the sender gave up and closed the connection
        finally:
            with self._lock:
                self.open -= 1
            conn.close()

    def close(self) -> None:
        self.released.set()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
        except OSError:
            pass
        self._socket.close()
