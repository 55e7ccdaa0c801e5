"""The edge's Envoy admin API is a Unix socket only its user opens, never a TCP port.

On a TCP port (127.0.0.1's included) any web page the operator's browser opened
could send the admin's POSTs cross-site without a preflight: `/logging?http=debug`
wrote every API key into Envoy's log, `/quitquitquit` stopped the edge.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gateway import admin as envoy_admin

LISTEN = "0A"  # a TCP socket's state in /proc/net/tcp


def _listening_ports(pid: int) -> set[int]:
    """Returns the TCP ports the process `pid` listens on (its sockets in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_edges_admin_api_is_a_private_unix_socket_not_a_port(mesh):
    info = os.stat(mesh.admin_socket)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert envoy_admin.text(mesh.admin_socket, "/ready") == "LIVE\n"
    # Its only TCP ports are its listeners: the plaintext and TLS ones.
    listeners = {mesh.edge_port} | ({mesh.edge_tls_port} if mesh.edge_tls_port else set())
    assert _listening_ports(mesh.pid("envoy")) == listeners
