"""reserve_port hands out listening ports the kernel never gives outgoing
connections: a released :0 port is in the ephemeral range, and the mesh's own
traffic took it as a source port now and then before Envoy or Redis bound it
("cannot bind ... Address already in use", seen in CI)."""

from __future__ import annotations

import socket
from pathlib import Path

from services.launcher.processes import RESERVED_PORTS_FROM, reserve_port


def _ephemeral_from() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_reserved_ports_are_below_the_ephemeral_range_and_free() -> None:
    ports = [reserve_port() for _ in range(20)]
    assert all(RESERVED_PORTS_FROM <= port < _ephemeral_from() for port in ports), ports
    assert len(set(ports)) == len(ports)  # never handed out twice
    for port in ports:  # each can be listened on
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen()


def test_a_port_in_use_is_not_handed_out() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", reserve_port()))
    taken.listen()
    try:
        held = taken.getsockname()[1]
        assert all(reserve_port() != held for _ in range(200))
    finally:
        taken.close()
