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
import logging
import socket
import time
from collections.abc import Sequence

from gateway.envoy_config import is_ip
from services.router.registry import WorkerEntry

logger = logging.getLogger(__name__)

TTL_S = 30.0  # how long a resolved name is reused
# How long a failed lookup's outcome (the stale answer, or none) is reused: builds
# run every poll under one lock, and must not each wait for a dead resolver.
FAILURE_TTL_S = 5.0
LOOKUP_TIMEOUT_S = 2.0  # a build does not wait longer for its names (looked up at once)


class HostResolver:
    """HostResolver gives workers IP hosts, resolving and caching names (see the module)."""

    def __init__(self) -> None:
        # name -> (IP or None: did not resolve, monotonic expiry)
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def with_ip_hosts(self, workers: Sequence[WorkerEntry]) -> list[WorkerEntry]:
        """Returns `workers` with IP hosts; a worker whose name does not resolve is left out."""
        names = sorted({w.host for w in workers if not is_ip(w.host)})
        answers = dict(zip(names, await asyncio.gather(*map(self._resolve, names)), strict=True))
        resolved = []
        for worker in workers:
            if is_ip(worker.host):
                resolved.append(worker)
                continue
            address = answers[worker.host]
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
            stale = cached[0] if cached is not None else None  # a stale answer beats none
            self._cache[name] = (stale, time.monotonic() + FAILURE_TTL_S)
            return stale
        addresses = [str(info[4][0]) for info in found]
        if not addresses:
            return None
        # IPv4 first: what a dual-stack name's workers listen on most often.
        address = next((a for a in addresses if ":" not in a), addresses[0])
        self._cache[name] = (address, time.monotonic() + TTL_S)
        return address
