"""What takes a worker out of the edge's rotation, and what must not.

This module runs its own mesh (two workers serving deterministic-test, with
inference v1 already past its sunset) so that a live worker answers a
well-formed request with a 5xx-class gRPC status on demand: UNIMPLEMENTED,
which Envoy's outlier detection reads as HTTP 501.

A worker that answers is alive. Only evidence a caller cannot produce with
its own requests (connect failures, resets, timeouts seen by Envoy, failed
health checks) may eject it; otherwise any caller could empty a model's
rotation for everybody with a few refused calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import edge_hosts, wait_for_healthy_hosts

MODEL = "deterministic-test"
ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_TEST_MODELS": f"{MODEL}:1",
    "TOKENMESH_MODELS": "",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "1",
    "TOKENMESH_API_DEPRECATIONS": "v1=2020-01-01",
}
V1_COMPLETE = f"/v1/models/{MODEL}:complete"
V2_COMPLETE = f"/v2/models/{MODEL}:complete"


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("ejection")),
        redis_url=None,
        workers=2,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        edge_tls_port=None,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


def health(mesh: Mesh) -> list[str]:
    return sorted(host["health_flags"] for host in edge_hosts(mesh, f"model:{MODEL}:1").values())


def test_refusals_by_a_live_worker_do_not_eject_it(two_workers):
    wait_for_healthy_hosts(two_workers, [f"model:{MODEL}:1"], 2)
    headers = {"x-api-key": two_workers.dev_api_key()}
    with httpx.Client(base_url=two_workers.edge_url, headers=headers, timeout=30) as http:

        def served_by() -> set[str]:
            body = {"prompt": "a b", "max_output_tokens": 2}
            replies = [http.post(V2_COMPLETE, json=body) for _ in range(4)]
            return {reply.headers["x-tokenmesh-worker"] for reply in replies}

        served_by()  # the edge's first request of a head takes a turn; the next follow the hash
        before = served_by()
        # The same prompt each time: prefix affinity sends them all to one worker.
        v1_body = {"prompt": "a b", "max_tokens": 2}
        refused = [http.post(V1_COMPLETE, json=v1_body) for _ in range(12)]
        assert [r.status_code for r in refused] == [410] * 12, refused[-1].text
        # Before the fix the 5th refusal ejected that worker for 10 s.
        assert health(two_workers) == ["healthy", "healthy"]
        assert len(before) == 1 and served_by() == before  # the prompt's worker still
