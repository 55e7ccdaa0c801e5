"""The worker registry: where inference workers are, what they serve, and their leases.

A worker registers its address and model versions, then renews a lease
(the heartbeat). A worker whose lease ran out is not routed to and is
forgotten; a draining worker is not routed to but keeps its entry until it
exits, so operators can watch it finish.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

from services.core.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from services.core.redis_service import text
from services.router.catalog import check_name, check_version

WORKERS_KEY = "tokenmesh:router:workers"
_WORKER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")
# A lease this long past its end is deleted (kept briefly so ListWorkers shows it went).
_FORGET_AFTER_S = 60.0

SERVING = "serving"
DRAINING = "draining"


@dataclass(frozen=True)
class WorkerEntry:
    """WorkerEntry is one registered worker."""

    worker_id: str
    host: str
    port: int
    models: tuple[tuple[str, str], ...]
    state: str = SERVING
    lease_expires_at: float = 0.0

    @property
    def address(self) -> str:
        """Returns host:port."""
        return f"{self.host}:{self.port}"

    def routable(self, now: float, lease_grace: bool = False) -> bool:
        """Tells whether the edge may send new requests to the worker.

        With `lease_grace` (just after the control plane or its Redis came
        back) an expired lease still counts: workers could not renew while
        the router was away, and dropping them all would empty the mesh.
        """
        return self.state == SERVING and (lease_grace or self.lease_expires_at > now)

    def to_json(self) -> str:
        """Serialises the worker for Redis."""
        return json.dumps(
            {
                "host": self.host,
                "port": self.port,
                "models": [list(m) for m in self.models],
                "state": self.state,
                "lease_expires_at": self.lease_expires_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, worker_id: str, raw: str | bytes) -> WorkerEntry:
        """Parses a worker stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            worker_id=worker_id,
            host=str(data["host"]),
            port=int(data["port"]),
            models=tuple((str(n), str(v)) for n, v in data["models"]),
            state=str(data["state"]),
            lease_expires_at=float(data["lease_expires_at"]),
        )


def check_worker_id(worker_id: str) -> None:
    """Raises InvalidArgument unless `worker_id` is well-formed."""
    if not _WORKER_ID.match(worker_id):
        raise InvalidArgument(
            [FieldViolation("worker_id", "must be 1-128 characters of [A-Za-z0-9._:-]")]
        )


def parse_address(address: str) -> tuple[str, int]:
    """Returns (host, port) of a worker address; raises InvalidArgument."""
    if not _ADDRESS.match(address) or not 1 <= int(address.rsplit(":", 1)[1]) <= 65535:
        raise InvalidArgument([FieldViolation("address", "must be host:port (port 1-65535)")])
    host, port = address.rsplit(":", 1)
    return host, int(port)


def check_models(models: Sequence[tuple[str, str]]) -> None:
    """Raises InvalidArgument unless every (name, version) is well-formed."""
    if not models:
        raise InvalidArgument([FieldViolation("models", "a worker must serve at least one model")])
    for name, version in models:
        check_name(name)
        check_version(version, "models.version")


class WorkerRegistry:
    """WorkerRegistry keeps workers and their leases in Redis."""

    def __init__(self, redis: aioredis.Redis, lease_s: float) -> None:
        self.redis = redis
        self.lease_s = lease_s

    async def register(
        self, worker_id: str, address: str, models: Sequence[tuple[str, str]], now: float
    ) -> WorkerEntry:
        """Registers (or re-registers) a serving worker with a fresh lease."""
        check_worker_id(worker_id)
        host, port = parse_address(address)
        check_models(models)
        raw = await self.redis.hget(WORKERS_KEY, worker_id)
        if raw is not None:
            current = WorkerEntry.from_json(worker_id, raw)
            if current.address != address and current.routable(now):
                # Two live workers with one id would steal each other's endpoint.
                raise AlreadyExists(
                    f"worker id {worker_id!r} is held by a live worker at {current.address}; "
                    "use a unique TOKENMESH_WORKER_ID (this one can register once that "
                    "lease ends)",
                    reason="WORKER_ID_IN_USE",
                )
        entry = WorkerEntry(worker_id, host, port, tuple(models), SERVING, now + self.lease_s)
        await self.redis.hset(WORKERS_KEY, worker_id, entry.to_json())
        return entry

    async def get(self, worker_id: str) -> WorkerEntry:
        """Returns one worker; raises NotFound."""
        check_worker_id(worker_id)
        raw = await self.redis.hget(WORKERS_KEY, worker_id)
        if raw is None:
            raise NotFound(f"worker {worker_id!r} is not registered", reason="WORKER_NOT_FOUND")
        return WorkerEntry.from_json(worker_id, raw)

    async def renew(
        self, worker_id: str, models: Sequence[tuple[str, str]], now: float
    ) -> tuple[WorkerEntry, bool]:
        """Extends a worker's lease (a draining worker stays draining).

        Returns the worker and whether its set of model versions changed.
        """
        entry = await self.get(worker_id)
        if models:
            check_models(models)
        renewed = replace(
            entry, models=tuple(models) or entry.models, lease_expires_at=now + self.lease_s
        )
        await self.redis.hset(WORKERS_KEY, worker_id, renewed.to_json())
        return renewed, set(renewed.models) != set(entry.models)

    async def drain(self, worker_id: str) -> WorkerEntry:
        """Marks a worker draining: the edge stops sending it new requests."""
        entry = replace(await self.get(worker_id), state=DRAINING)
        await self.redis.hset(WORKERS_KEY, worker_id, entry.to_json())
        return entry

    async def all(self, now: float) -> list[WorkerEntry]:
        """Returns every known worker, forgetting those whose lease ended long ago."""
        raw = await self.redis.hgetall(WORKERS_KEY)
        workers = [WorkerEntry.from_json(text(k), v) for k, v in raw.items()]
        gone = [w.worker_id for w in workers if w.lease_expires_at + _FORGET_AFTER_S < now]
        if gone:
            await self.redis.hdel(WORKERS_KEY, *gone)
        return sorted((w for w in workers if w.worker_id not in gone), key=lambda w: w.worker_id)
