"""Operating model versions through the real edge: load-aware routing, SLO-gated
rollouts, shadow traffic.

This module runs its own mesh of three workers serving the deterministic test
engine (the model "versions"):

- inference-0: versions 1 and 3, fast (5 ms per step);
- inference-1: version 1, slowed down (100 ms per step): load-aware routing
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
import httpx
import openai
import pytest
from google.protobuf import duration_pb2

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel, edge_hosts
from tests.e2e.test_jobs import all_results, finished
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.inference.v2 import inference_pb2 as v2_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2_pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc
from tokenmesh.usage.v1 import usage_pb2
from tokenmesh.usage.v1 import usage_service_pb2 as usage_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as usage_rpc

MODEL = "versioned"
FAST, SLOW, FAULTY = "inference-0", "inference-1", "inference-2"
CLUSTER_1 = f"model:{MODEL}:1"  # the edge's cluster of version 1 (FAST and SLOW)
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
    SLOW: {"TOKENMESH_TEST_MODELS": f"{MODEL}:1", "TOKENMESH_TEST_ENGINE_STEP_MS": "100"},
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
        # Whichever worker registered first made its version the model's first:
        # version 1 is the stable one here.
        wait_for(
            lambda: set(weights_of(channel)) == {"1", "2", "3"},
            timeout_s=30,
            what="every version in the catalogue",
        )
        split_all_to_1(channel)
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


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, show: Callable[[], Any] = str
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {show()}")


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
            timeout_s=45,
            what="the slowed worker's weight to drop",
            show=lambda: {(w.id, w.weight, w.weight_reason) for w in workers(registry).values()},
        )
        # The edge gets the weight at the router's next poll: wait for it there too.
        slow_host = f"127.0.0.1:{versions_mesh.ports[SLOW]}"
        wait_for(
            lambda: int(edge_hosts(versions_mesh, CLUSTER_1)[slow_host]["weight"]) <= 50,
            timeout_s=10,
            what="the edge to weigh the slowed worker down",
            show=lambda: edge_hosts(versions_mesh, CLUSTER_1),
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


def catalogue(edge: grpc.Channel) -> router_rpc.RouterServiceStub:
    return router_rpc.RouterServiceStub(edge)


def rollout_of(edge: grpc.Channel) -> router_pb2.Rollout:
    reply = catalogue(edge).GetRollout(router_pb.GetRolloutRequest(model=MODEL), timeout=10)
    return reply.rollout


def weights_of(edge: grpc.Channel) -> dict[str, int]:
    reply = catalogue(edge).GetCatalogModel(router_pb.GetCatalogModelRequest(model=MODEL))
    return {v.version: v.weight for v in reply.model.versions}


def audit_of(edge: grpc.Channel) -> list[usage_pb2.AuditEntry]:
    stub = usage_rpc.UsageServiceStub(edge)
    reply = stub.ListAuditEntries(
        usage_pb.ListAuditEntriesRequest(tenant="tokenmesh.system", page_size=100), timeout=10
    )
    return [e for e in reply.entries if e.model == MODEL]


def split_all_to_1(edge: grpc.Channel) -> None:
    catalogue(edge).SetTrafficSplit(
        router_pb.SetTrafficSplitRequest(
            model=MODEL, weights=[router_pb2.TrafficWeight(version="1", weight=100)]
        ),
        timeout=10,
    )


@pytest.fixture
def split_restored(edge: grpc.Channel) -> Iterator[None]:
    yield
    split_all_to_1(edge)


def test_a_rollout_to_a_failing_version_rolls_back_by_itself_within_one_step(
    versions_mesh, edge, split_restored
):
    started = cli(
        versions_mesh, "models", "rollout", MODEL, "2", "--steps", "20,50,100",
        "--step-seconds", "60", "--max-error-rate", "0.05", "--min-requests", "10",
    )  # fmt: skip
    assert "running at 20%" in started
    assert weights_of(edge)["2"] == 20
    with Traffic(edge) as traffic:
        rolled_back = wait_for(
            lambda: (r := rollout_of(edge)).state == router_pb2.ROLLOUT_STATE_ROLLED_BACK and r,
            timeout_s=60,  # one step
            what="the rollout to roll back",
        )
    assert traffic.failed > 0  # the faulty version's errors reached callers while at 20%
    assert rolled_back.weight == 0 and weights_of(edge)["2"] == 0
    assert "error rate" in rolled_back.reason
    assert rolled_back.decisions[-1].action == "rollback"
    entries = audit_of(edge)
    rollback = next(e for e in entries if e.action == "rollout.rollback")
    assert rollback.version == "2" and "error rate" in rollback.detail
    assert {"rollout.start", "rollout.rollback"} <= {e.action for e in entries}
    status = cli(versions_mesh, "models", "rollout", "status", MODEL)
    assert "rolled_back at 0%" in status and "rollback" in status
    # --json: proto field names and zero values, as every other command's.
    as_json = json.loads(cli(versions_mesh, "models", "rollout", "status", MODEL, "--json"))
    assert as_json["state"] == "ROLLOUT_STATE_ROLLED_BACK" and as_json["weight"] == 0
    assert as_json["max_error_rate"] == 0.05 and as_json["stable_version"], as_json


def test_a_healthy_rollout_reaches_100_percent_across_a_router_restart(
    versions_mesh, edge, split_restored
):
    stub = catalogue(edge)
    duration = duration_pb2.Duration(seconds=3)
    started = stub.StartRollout(
        router_pb.StartRolloutRequest(
            model=MODEL, version="3", steps=[30, 60, 100], step_duration=duration, min_requests=5,
            max_ttft_p99_ratio=5,
        ),
        timeout=10,
    ).rollout  # fmt: skip
    assert started.stable_version == "1" and started.weight == 30
    with pytest.raises(grpc.RpcError) as second:
        stub.StartRollout(router_pb.StartRolloutRequest(model=MODEL, version="2"), timeout=10)
    assert second.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Paused before any traffic: a step cannot advance without min_requests,
    # so the pause always lands at 30% (with traffic, a fast machine could
    # finish the 3 s steps before the CLI runs).
    paused = cli(versions_mesh, "models", "rollout", "pause", MODEL)
    assert "paused at 30%" in paused
    # The state lives in Redis: a restarted router carries on with it.
    versions_mesh.kill("router")
    versions_mesh.restart_service("router", "router")
    assert rollout_of(edge).state == router_pb2.ROLLOUT_STATE_PAUSED
    with Traffic(edge):
        cli(versions_mesh, "models", "rollout", "resume", MODEL)
        done = wait_for(
            lambda: (r := rollout_of(edge)).state == router_pb2.ROLLOUT_STATE_SUCCEEDED and r,
            timeout_s=60,
            what="the rollout to succeed",
        )
    assert done.weight == 100 and weights_of(edge)["3"] == 100
    actions = [d.action for d in done.decisions]
    assert actions == ["start", "pause", "resume", "advance", "succeed"]


def mirror_configured(mesh: Mesh, version: str) -> bool:
    """Tells whether the edge's routes mirror the model to `version`'s cluster."""
    dump = mesh.admin("/config_dump?resource=dynamic_route_configs")
    return f'"cluster": "model:{MODEL}:{version}"' in dump and "request_mirror_policies" in dump


def usage_requests(channel: grpc.Channel, **scope: Any) -> int:
    stub = usage_rpc.UsageServiceStub(channel)
    return int(stub.GetUsage(usage_pb.GetUsageRequest(**scope), timeout=10).requests)


def shadowed_call(channel: grpc.Channel, n: int) -> tuple[str, float]:
    """One seeded v2 request (Complete, or a Generate stream): (serving version, seconds)."""
    stub = v2_rpc.InferenceServiceStub(channel)
    sampling = v2_pb2.SamplingParams(seed=n, temperature=0.8)
    started = time.monotonic()
    if n % 2:
        reply = stub.Complete(
            v2_pb.CompleteRequest(
                model=MODEL, prompt=f"shadow {n}", max_output_tokens=4, sampling=sampling
            ),
            timeout=30,
        )
        return reply.model.version, time.monotonic() - started
    request = v2_pb.GenerateRequest(
        model=MODEL, prompt=f"shadow {n}", max_output_tokens=4, sampling=sampling
    )
    finals = [m for m in stub.Generate(request, timeout=30) if m.HasField("model")]
    return finals[-1].model.version, time.monotonic() - started


def reaches(channel: grpc.Channel, version: str) -> bool:
    """Tells whether the edge reaches a worker of `version` (its own errors count as reached)."""
    try:
        complete(channel, "are you there", version)
    except grpc.RpcError as error:
        return error.code() != grpc.StatusCode.UNAVAILABLE
    return True


def test_shadowing_every_request_to_another_version_leaves_callers_untouched(
    versions_mesh, edge, split_restored
):
    wait_for(lambda: reaches(edge, "1") and reaches(edge, "2"), 30, "both versions' workers")
    caller = json.loads(
        cli(versions_mesh, "keys", "create", "--tenant", "shadow-caller",
            "--scopes", "inference:generate,usage:read", "--json")
    )  # fmt: skip
    # The caller's tenant consented to samples of every request: its stream must
    # hold its own 50 requests, not the copies too (outputs it was never sent).
    cli(versions_mesh, "samples", "enable", "--tenant", "shadow-caller", "--rate", "1.0")
    with authed_channel(versions_mesh.edge_address, [("x-api-key", caller["secret"])]) as own:
        baseline = sorted(shadowed_call(edge, 1000 + n)[1] for n in range(10))
        started = cli(versions_mesh, "models", "shadow", MODEL, "2", "--percent", "100")
        assert "mirroring 100% of live requests to version 2" in started
        wait_for(lambda: mirror_configured(versions_mesh, "2"), 15, "the edge's mirror policy")
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda n: shadowed_call(own, n), range(50)))
        # Callers got version 1's answers (the faulty version 2 fails half of its
        # copies, which nobody sees) in the latency class they had without a shadow.
        assert {version for version, _ in answers} == {"1"}
        shadowed = sorted(seconds for _, seconds in answers)
        assert shadowed[len(shadowed) // 2] < 3 * baseline[len(baseline) // 2] + 0.25
        # The caller is metered for its 50 requests; the copies go to the shadow account.
        wait_for(
            lambda: usage_requests(edge, tenant="tokenmesh.shadow") >= 50,
            30,
            "the copies' usage in the shadow account",
            show=lambda: usage_requests(edge, tenant="tokenmesh.shadow"),
        )
        wait_for(lambda: usage_requests(own) >= 50, 30, "the caller's usage")
        assert usage_requests(own) == 50
        assert usage_requests(edge, tenant="tokenmesh.shadow") == 50

    def samples() -> list[dict[str, Any]]:
        exported = cli(
            versions_mesh, "samples", "export", "--tenant", "shadow-caller", "--since", "1h"
        )
        return [json.loads(line) for line in exported.splitlines()]

    # Sample writes are fire-and-forget after each answer: wait for the caller's 50.
    wait_for(lambda: len(samples()) >= 50, 15, "the caller's 50 samples")
    cli(versions_mesh, "samples", "disable", "--tenant", "shadow-caller")
    assert collections.Counter(s["model"]["version"] for s in samples()) == {"1": 50}
    compared = cli(versions_mesh, "models", "compare", MODEL, "1", "2", "--since", "1h")
    report = json.loads(
        cli(versions_mesh, "models", "compare", MODEL, "1", "2", "--since", "1h", "--json")
    )
    assert report["pairs"] == 50, compared
    assert "v1" in compared and "v2" in compared and "seeded pairs agreeing" in compared
    served, copied = report["baseline"], report["candidate"]
    assert served["requests"] == copied["requests"] == 50
    # Proto field names, as every other command's --json (it printed camelCase).
    assert served["error_rate"] == 0 and 0 < copied["error_rate"] < 1  # injected faults
    for figures in (served, copied):
        assert figures["time_to_first_token"]["p50_ms"] > 0, figures
    # Latencies from the start of prefill; the wait for a slot is shown apart.
    assert "queue_time" in served and "queue_time" in copied
    assert report["reversed_pairs"] == 0  # every pair: 1 served, 2 copied
    assert served["mean_confidence"] > 0 and served["output_tokens"]["max"] == 4
    # The deterministic engine gives both versions the same text for a seed.
    ok_pairs = copied["finish_reasons"].get("length", 0)
    assert report["seeded_pairs"] == ok_pairs and report["agreement_rate"] == 1.0
    stopped = cli(versions_mesh, "models", "shadow", MODEL, "--off")
    assert "no shadow traffic" in stopped
    wait_for(lambda: not mirror_configured(versions_mesh, "2"), 15, "the mirror to go")


def copies_dropped(mesh: Mesh, version: str) -> float:
    """Returns the copies of MODEL `version` that FAST (its only worker) did not run."""
    url = f"http://127.0.0.1:{mesh.ports[f'{FAST}-metrics']}/metrics"
    labels = (f'model="{MODEL}"', f'version="{version}"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(url, timeout=5).text.splitlines()
        if line.startswith("tokenmesh_shadow_copies_dropped_total{")
        and all(label in line for label in labels)
    )


def test_copies_of_requests_refused_by_the_callers_rate_limit_are_not_computed(versions_mesh, edge):
    """Envoy copies a request before any worker decides its caller's limits: a key of 2
    requests a minute sending 12 made version 3 compute all 12 copies (at the operator's
    cost, beside version 1 on the same worker). Only its admitted requests' copies run."""
    wait_for(lambda: reaches(edge, "3"), 30, "version 3's worker")
    caller = json.loads(
        cli(versions_mesh, "keys", "create", "--tenant", "limited-shadow-caller", "--rpm", "2",
            "--scopes", "inference:generate,usage:read", "--json")
    )  # fmt: skip
    computed_before = usage_requests(edge, tenant="tokenmesh.shadow")
    dropped_before = copies_dropped(versions_mesh, "3")

    def computed() -> int:  # copies run: metered to the shadow account
        return int(usage_requests(edge, tenant="tokenmesh.shadow") - computed_before)

    def dropped() -> float:
        return float(copies_dropped(versions_mesh, "3") - dropped_before)

    cli(versions_mesh, "models", "shadow", MODEL, "3", "--percent", "100")
    try:
        wait_for(lambda: mirror_configured(versions_mesh, "3"), 15, "the edge's mirror policy")
        answered, refused = 0, 0
        with authed_channel(versions_mesh.edge_address, [("x-api-key", caller["secret"])]) as own:
            stub = v2_rpc.InferenceServiceStub(own)
            for n in range(12):
                request = v2_pb.CompleteRequest(
                    model=MODEL, prompt=f"limited {n}", max_output_tokens=8
                )
                try:
                    stub.Complete(request, timeout=30)
                    answered += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
        # Every copy is accounted for: computed, or dropped by FAST.
        wait_for(
            lambda: computed() + dropped() >= 12,
            30,
            "every copy computed or dropped",
            show=lambda: (computed(), dropped()),
        )
    finally:
        cli(versions_mesh, "models", "shadow", MODEL, "--off")
        wait_for(lambda: not mirror_configured(versions_mesh, "3"), 15, "the mirror to go")
    assert (answered, refused) == (2, 10)
    # The first admitted request's copy runs; the second's runs unless it was read
    # after its live request took the key's last slot. No refused request's copy runs.
    assert 1 <= computed() <= answered
    assert computed() + dropped() == 12
    wait_for(lambda: usage_requests(edge, tenant="limited-shadow-caller") >= answered, 30, "usage")
    assert usage_requests(edge, tenant="limited-shadow-caller") == answered


def test_job_items_follow_the_traffic_split(versions_mesh, edge):
    """A job's items run where the catalogue sends the model's traffic. The split
    sends everything to version 1: no item may run on version 3 (the newest, beside
    1 on inference-0) or on the failing version 2 (inference-2's only one)."""
    items = [
        {"complete": {"model": MODEL, "prompt": f"job item {i}", "max_output_tokens": 2}}
        for i in range(24)
    ]
    headers = {"x-api-key": versions_mesh.dev_api_key()}
    with httpx.Client(base_url=versions_mesh.edge_url, headers=headers, timeout=30) as api:
        submitted = api.post("/v1/jobs", json={"items": items})
        assert submitted.status_code == 200, submitted.text
        job_id = submitted.json()["id"]
        done = finished(api, job_id)
        results = all_results(api, job_id)
    versions = collections.Counter(
        r["complete"]["model"]["version"] if "complete" in r else r.get("error", {}).get("code")
        for r in results
    )
    assert done["status"] == "SUCCEEDED", (done, versions)
    assert versions == {"1": 24}


def model_versions_answered(edge: grpc.Channel) -> list[set[str]]:
    """The versions of MODEL in each of 9 GetModel, ListModels and OpenAI answers
    through the edge (each call goes to any worker)."""
    stub = v2_rpc.InferenceServiceStub(edge)
    answers = []
    for _ in range(3):
        got = stub.GetModel(v2_pb.GetModelRequest(model=MODEL), timeout=10).model
        answers.append({v.version for v in got.versions})
        (listed,) = [
            m
            for m in stub.ListModels(v2_pb.ListModelsRequest(), timeout=10).models
            if m.name == MODEL
        ]
        answers.append({v.version for v in listed.versions})
    return answers


def test_any_worker_answers_model_lookups_for_the_whole_mesh(versions_mesh, edge):
    # Each worker serves other versions of MODEL (1 and 3, 1, 2): the edge sends
    # lookups to any worker, and each answered with its own versions only.
    every = {"1", "2", "3"}
    wait_for(
        lambda: all(found == every for found in model_versions_answered(edge)),
        timeout_s=20,
        what="every lookup answered with every worker's versions",
        show=lambda: model_versions_answered(edge),
    )
    assert all(found == every for found in model_versions_answered(edge))
    key = versions_mesh.dev_api_key()
    with openai.OpenAI(
        api_key=key, base_url=f"{versions_mesh.edge_url}/openai/v1", max_retries=0
    ) as client:
        for _ in range(4):
            ids = {m.id for m in client.models.list()}
            assert {MODEL, *(f"{MODEL}@{v}" for v in every)} <= ids
