"""Worker addresses as Envoy's endpoints take them: IP literals.

A worker may register a host name (compose advertises `inference:50051`; its
certificate names it). EDS endpoints must be IP addresses (or name a
resolver), and every worker shares the `inference` cluster, whose endpoints
go out in one response: one name there made every edge reject every
endpoint update, so new versions got no workers and drains stopped
applying. The router resolves names when it builds the routes (the registry
keeps what the worker registered, which its own-address checks compare),
caching each answer for `TTL_S`; a name that does not resolve leaves its
worker out of the endpoints until it does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence

from services.router.registry import WorkerEntry

logger = logging.getLogger(__name__)

TTL_S = 30.0  # how long a resolved name is reused
LOOKUP_TIMEOUT_S = 2.0  # a build does not wait longer for a name


def is_ip(host: str) -> bool:
    """Tells whether `host` is an IP literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostResolver:
    """HostResolver gives workers IP hosts, resolving and caching names (see the module)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, float]] = {}  # name -> (IP, monotonic expiry)

    async def with_ip_hosts(self, workers: Sequence[WorkerEntry]) -> list[WorkerEntry]:
        """Returns `workers` with IP hosts; a worker whose name does not resolve is left out."""
        resolved = []
        for worker in workers:
            if is_ip(worker.host):
                resolved.append(worker)
                continue
            address = await self._resolve(worker.host)
            if address is None:
                logger.warning(
                    "worker %s: %s does not resolve; left out of the endpoints",
                    worker.worker_id,
                    worker.host,
                )
                continue
            resolved.append(dataclasses.replace(worker, host=address))
        return resolved

    async def _resolve(self, name: str) -> str | None:
        cached = self._cache.get(name)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                found = await asyncio.get_running_loop().getaddrinfo(
                    name, None, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError):
            return cached[0] if cached is not None else None  # a stale answer beats none
        addresses = [str(info[4][0]) for info in found]
        if not addresses:
            return None
        # IPv4 first: what a dual-stack name's workers listen on most often.
        address = next((a for a in addresses if ":" not in a), addresses[0])
        self._cache[name] = (address, time.monotonic() + TTL_S)
        return address
