"""Metering survives crashes: kill -9 of the usage service and a Redis restart
during traffic leave the totals exactly equal to what clients received."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.launcher.mesh import Mesh
from tests.conftest import one_worker_mesh_config


@pytest.fixture
def crash_mesh(tmp_path: Path) -> Iterator[Mesh]:
    config = one_worker_mesh_config(tmp_path / "mesh", TOKENMESH_USAGE_CLAIM_IDLE_SECONDS="2")
    with Mesh(config) as mesh:
        yield mesh


def _traffic(http: httpx.Client, count: int, totals: dict[str, int]) -> None:
    for i in range(count):
        reply = http.post(
            "/v1/models/deterministic-test:complete",
            json={"prompt": f"req {i}", "max_tokens": 2 + i % 3},
        )
        if reply.status_code == 200:
            usage = reply.json()["usage"]
            totals["requests"] += 1
            totals["prompt"] += usage["prompt_tokens"]
            totals["completion"] += usage["completion_tokens"]


def test_kill_9_of_usage_and_a_redis_restart_lose_nothing(crash_mesh):
    totals = {"requests": 0, "prompt": 0, "completion": 0}
    headers = {"x-api-key": crash_mesh.dev_api_key()}
    with httpx.Client(base_url=crash_mesh.edge_url, headers=headers, timeout=30) as http:
        _traffic(http, 10, totals)
        crash_mesh.kill("usage")  # mid-stream of events: some read, maybe not acked
        _traffic(http, 10, totals)  # usage down: rate limits fail open, workers keep spooling
        crash_mesh.restart_service("usage", "usage")
        _traffic(http, 10, totals)
        crash_mesh.restart_redis()  # AOF: acknowledged writes survive
        _traffic(http, 10, totals)
        deadline = time.monotonic() + 20
        report: dict[str, str] = {}
        while time.monotonic() < deadline:
            reply = http.get("/v1/usage")
            if reply.status_code == 200:
                report = reply.json()
                if int(report["requests"]) >= totals["requests"]:
                    break
            time.sleep(0.3)
    assert totals["requests"] >= 30  # most traffic went through the outages
    assert int(report["requests"]) == totals["requests"]
    assert int(report["prompt_tokens"]) == totals["prompt"]
    assert int(report["completion_tokens"]) == totals["completion"]
