"""A worker adopts the usage spool a gone worker left beside its own (the wiring).

A mesh starts with another worker's spool in its spool directory, as a
`docker compose up` after a `down` finds the old containers' spools in the
shared volume: the worker ships it, the meter applies it, the spool goes.
(tests/integration/test_usage_spool_adoption.py covers budgets and the rules.)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from services.inference.usage_log import UsageLog
from services.launcher.mesh import Mesh
from services.usage.meter import PREFIX
from tests.conftest import one_worker_mesh_config
from tests.integration.test_budget_successor import _event


def _leave_spool(directory: Path, request_id: str) -> None:
    """A worker's spool with one event it never shipped, unchanged for two minutes."""

    async def write() -> None:
        unreachable = aioredis.from_url("redis://127.0.0.1:1")
        log = UsageLog(directory, unreachable, "tokenmesh:usage", 1 << 20)
        log.append(_event("key_gone", request_id, 2, 3))
        await log.stop(timeout_s=0)
        await unreachable.aclose()

    asyncio.run(write())
    then = time.time() - 120
    for path in directory.iterdir():
        os.utime(path, (then, then))


def test_a_starting_mesh_ships_and_removes_a_gone_workers_spool(tmp_path: Path) -> None:
    state = tmp_path / "mesh"
    gone = state / "usage-spool" / "inference-from-the-last-deploy"
    _leave_spool(gone, "left-behind")
    config = one_worker_mesh_config(state, TOKENMESH_USAGE_SPOOL_ADOPT_AFTER_SECONDS="1")
    with Mesh(config) as mesh:
        deadline = time.monotonic() + 60
        while gone.exists():
            assert time.monotonic() < deadline, "the gone worker's spool is still there"
            time.sleep(0.1)
        client = redis.Redis.from_url(mesh.redis_url)
        try:
            assert client.exists(f"{PREFIX}seen:left-behind")  # metered
        finally:
            client.close()
        assert (state / "usage-spool" / "inference-0" / "events.id").is_file()
