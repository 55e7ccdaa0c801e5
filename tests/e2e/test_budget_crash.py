"""A worker killed -9 after recording a request, before its reconcile landed.

The fault suite's kill -9 of a worker once left the key's month 7 tokens under
what the meter billed: the killed worker had spooled the request's usage event,
its reconcile had not reached Redis yet, and a reaper gave the whole reservation
back. Here the window is held open on purpose (the durable Redis paused for
writes while the request ends), the worker killed inside it and started again
on its spool: the month must end equal to the metered tokens.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bench.chaos.ledger import budget_gap, create_key
from services.launcher.mesh import Mesh
from tests.conftest import one_worker_mesh_config
from tokenmesh.inference.v1 import inference_pb2

WORKER = "inference-0"
PAUSE_MS = 15_000  # the most writes stay paused, should the test fail midway


@pytest.fixture
def crash_mesh(tmp_path: Path) -> Iterator[Mesh]:
    config = one_worker_mesh_config(
        tmp_path / "mesh",
        TOKENMESH_TEST_ENGINE_STEP_MS="50",  # a stream long enough to pause within
        TOKENMESH_RESERVATION_TTL_SECONDS="3",  # reapers act within the test
    )
    with Mesh(config) as mesh:
        yield mesh


def _spooled_keys(spool: Path) -> set[str]:
    """Returns the key ids of the usage events in a worker's spool segments."""
    keys: set[str] = set()
    for segment in spool.glob("events.*.log"):
        data = segment.read_bytes()
        position = 0
        while position + 4 <= len(data):
            (size,) = struct.unpack_from(">I", data, position)
            body = data[position + 4 : position + 4 + size]
            if len(body) < size:
                break
            keys.add(inference_pb2.UsageEvent.FromString(body).key_id)
            position += 4 + size
    return keys


def _open_reservations(client: redis.Redis) -> int:
    """Returns how many reservations every holder, dead or alive, lists open."""
    return sum(int(client.hlen(key)) for key in client.scan_iter("tm:budget:open:*"))


def _wait(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_worker_killed_between_recording_and_reconciling_leaves_the_month_equal_to_the_meter(
    crash_mesh: Mesh,
) -> None:
    mesh = crash_mesh
    started = time.time()
    key_id, secret = create_key(mesh.edge_url, mesh.dev_api_key(), "crash-budget")
    spool = mesh.state_dir / "usage-spool" / WORKER
    durable = redis.Redis.from_url(mesh.redis_url, socket_timeout=5)
    body = {"prompt": "a request the worker records", "max_tokens": 12}
    try:
        with (
            httpx.Client(base_url=mesh.edge_url, timeout=30) as http,
            http.stream(
                "POST",
                "/v1/models/deterministic-test:generate",
                json=body,
                headers={"x-api-key": secret},
            ) as reply,
        ):
            assert reply.status_code == 200
            lines = reply.iter_lines()  # held: a dropped iterator closes the stream
            next(lines)  # its first token: the reservation is made
            durable.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            # It ends and records its usage event; its reconcile waits on Redis.
            _wait(lambda: key_id in _spooled_keys(spool), 10, "the request's usage event")
            mesh.kill(WORKER)
    finally:
        durable.execute_command("CLIENT", "UNPAUSE")
        durable.close()
    mesh.restart_service(WORKER, "inference")
    # Settled: reconciled from the spool, or (before) given back whole by a reaper.
    # A reservation still open may equal the use by chance (max_tokens all used).
    with redis.Redis.from_url(mesh.redis_url, socket_timeout=5) as client:
        _wait(lambda: not _open_reservations(client), 20, "the killed worker's reservation")

    gap = budget_gap(mesh.redis_url, key_id, mesh.edge_url, secret, started, 20)
    usage = httpx.get(f"{mesh.edge_url}/v1/usage", headers={"x-api-key": secret}, timeout=10)
    metered = usage.json()
    assert int(metered["requests"]) == 1
    assert gap == 0, f"the key's month is {gap} tokens off what was metered ({metered})"
