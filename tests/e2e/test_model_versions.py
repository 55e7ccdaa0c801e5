"""Operating model versions through the real edge: load-aware routing, SLO-gated
rollouts, shadow traffic.

This module runs its own mesh of three workers serving the deterministic test
engine (the model "versions"):

- inference-0: versions 1 and 3, fast (5 ms per step);
- inference-1: version 1, slowed down (60 ms per step): load-aware routing
  must give it a smaller share of version 1's new requests;
- inference-2: version 2, failing half of its requests (injected faults): a
  rollout to it must roll back by itself.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MODEL = "versioned"
FAST, SLOW, FAULTY = "inference-0", "inference-1", "inference-2"
ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_MODELS": "",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "5",
    "TOKENMESH_ROUTER_LEASE_SECONDS": "1.5",  # a heartbeat every 0.5 s
    "TOKENMESH_ROUTER_HEALTH_CHECK_SECONDS": "0.5",
    "TOKENMESH_DRAIN_DELAY_SECONDS": "0.5",
    "TOKENMESH_ROUTER_PREFIX_AFFINITY": "true",
}
CHILD_ENV = {
    FAST: {"TOKENMESH_TEST_MODELS": f"{MODEL}:1,{MODEL}:3"},
    SLOW: {"TOKENMESH_TEST_MODELS": f"{MODEL}:1", "TOKENMESH_TEST_ENGINE_STEP_MS": "60"},
    FAULTY: {"TOKENMESH_TEST_MODELS": f"{MODEL}:2", "TOKENMESH_TEST_ENGINE_ERROR_RATE": "0.5"},
}


@pytest.fixture(scope="module")
def versions_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("versions")),
        redis_url=None,
        workers=3,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=ENV,
        child_env=CHILD_ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(request.getfixturevalue("versions_mesh").log_tails(40))


@pytest.fixture(scope="module")
def edge(versions_mesh: Mesh) -> Iterator[grpc.Channel]:
    key = versions_mesh.dev_api_key()
    with authed_channel(versions_mesh.edge_address, [("x-api-key", key)]) as channel:
        yield channel


@pytest.fixture(scope="module")
def registry(versions_mesh: Mesh) -> Iterator[router_rpc.WorkerRegistryServiceStub]:
    with versions_mesh.channel("router") as channel:
        yield router_rpc.WorkerRegistryServiceStub(channel)


def complete(channel: grpc.Channel, prompt: str, version: str = "") -> tuple[str, str]:
    """Returns (worker, version) that served one short Complete."""
    stub = rpc.InferenceServiceStub(channel)
    reply, call = stub.Complete.with_call(
        pb.CompleteRequest(model=MODEL, version=version, prompt=prompt, max_tokens=2), timeout=30
    )
    headers = {k: str(v) for k, v in call.initial_metadata()}
    return headers["x-tokenmesh-worker"], reply.model.version


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def workers(stub: router_rpc.WorkerRegistryServiceStub) -> dict[str, router_pb2.Worker]:
    reply = stub.ListWorkers(router_pb.ListWorkersRequest(), timeout=10)
    return {w.id: w for w in reply.workers}


def cli(mesh: Mesh, *args: str) -> str:
    env = {**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Traffic:
    """Background requests with distinct prompts (bounded in time), counting who served."""

    def __init__(self, channel: grpc.Channel, threads: int = 3, limit_s: float = 90.0) -> None:
        self.channel = channel
        self.stop = threading.Event()
        self.served: collections.Counter[tuple[str, str]] = collections.Counter()
        self.failed = 0
        self._count = 0
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + limit_s
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                self._count += 1
                n = self._count
            try:
                served = complete(self.channel, f"traffic {n} {threading.get_ident()}")
            except grpc.RpcError:
                with self._lock:
                    self.failed += 1
                continue
            with self._lock:
                self.served[served] += 1


def test_a_slowed_worker_gets_a_lower_weight_and_a_smaller_share(versions_mesh, edge, registry):
    with Traffic(edge):
        slowed = wait_for(
            lambda: (w := workers(registry))[SLOW].weight <= 50 and w[FAST].weight == 100 and w,
            timeout_s=30,
            what="the slowed worker's weight to drop",
        )
    slow, fast = slowed[SLOW], slowed[FAST]
    assert slow.load.ttft_samples > 0 and fast.load.ttft_samples > 0
    assert slow.load.ttft_p50_ms > fast.load.ttft_p50_ms
    assert "vs best" in slow.weight_reason
    # New requests (distinct prompts, so the prompt hash spreads them): the slowed
    # worker's share follows its weight instead of half of them.
    with ThreadPoolExecutor(2) as pool:
        served = collections.Counter(
            worker for worker, _ in pool.map(lambda n: complete(edge, f"share {n}"), range(60))
        )
    assert served[SLOW] < 0.35 * 60, served
    listed = cli(versions_mesh, "workers", "list")
    assert SLOW in listed and "weight:" in listed and "ttft p50/p99" in listed
    by_id = {
        w["id"]: w for w in json.loads(cli(versions_mesh, "workers", "list", "--json"))["workers"]
    }
    assert by_id[SLOW]["weight"] < by_id[FAST]["weight"]
