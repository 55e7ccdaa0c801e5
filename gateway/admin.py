"""Envoy's admin API, on a Unix socket only its user can open.

The admin API has no authentication and no Origin check, and its mutating
endpoints are plain POSTs (`/logging?http=debug`, `/quitquitquit`,
`/drain_listeners`, `/healthcheck/fail`): on a TCP port, even 127.0.0.1's,
any web page the operator's browser opened could send them (cross-site, no
preflight). Debug logging wrote every API key into Envoy's log; the others
stop or drain the edge. A Unix socket has no URL a browser can fetch, and
mode 0600 keeps other local users out too. The stats listener
(gateway/stats_listener.py) proxies `GET /stats/prometheus` from it.
"""

from __future__ import annotations

import http.client
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

#: sun_path holds 108 bytes, its terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107
DEFAULT_TIMEOUT_S = 2.0


def check_path(path: Path) -> None:
    """Raises ValueError when `path` cannot be a Unix socket's address (too long)."""
    size = len(str(path).encode())
    if size > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"the admin socket path {path} is {size} bytes; a Unix socket's "
            f"holds at most {MAX_SOCKET_PATH_BYTES} (use a shorter state directory)"
        )


def private_dir(base: Path | None = None) -> Path:
    """Returns this user's own directory for edge admin sockets (under the temporary
    directory), made with mode 0700 when missing.

    Not a socket path straight under /tmp: any local user could create it first
    (the edge then could not start), or read its directory. A directory another
    user made, or one others may open, is refused (ValueError).
    """
    path = (base or Path(tempfile.gettempdir())) / f"tokenmesh-edge-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ValueError(
            f"{path} must be a directory of this user's alone (mode 0700) to hold the "
            "edge's admin socket: remove it, or set TOKENMESH_EDGE_ADMIN_SOCKET"
        )
    return path


def address(path: Path) -> dict[str, Any]:
    """Returns the Envoy address of the admin socket at `path` (mode 0600)."""
    check_path(path)
    return {"pipe": {"path": str(path), "mode": 0o600}}


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection over a Unix socket."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(
    path: Path, target: str, method: str = "GET", timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, str] | None:
    """Sends one admin request (`target`: its path and query); returns (status, body),
    or None when no Envoy answers (gone, not started yet)."""
    connection = _UnixConnection(path, timeout_s)
    try:
        connection.request(method, target)
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def text(
    path: Path, target: str, method: str = "GET", timeout_s: float = DEFAULT_TIMEOUT_S
) -> str | None:
    """Returns an admin request's body when Envoy answers it 200 (else None)."""
    answer = request(path, target, method, timeout_s)
    return answer[1] if answer is not None and answer[0] == 200 else None


def cluster(name: str, path: Path) -> dict[str, Any]:
    """Returns an Envoy cluster whose one host is the admin socket at `path` (HTTP/1.1)."""
    endpoint = {"endpoint": {"address": {"pipe": {"path": str(path)}}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
