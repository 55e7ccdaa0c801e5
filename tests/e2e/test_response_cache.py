"""Response cache and request coalescing through the real edge (a mesh with TOKENMESH_CACHE on)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import authed_channel
from tests.e2e.test_auth import cli
from tests.prompts import unique_prompt
from tokenmesh.inference.v1 import inference_pb2 as v1_resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
ENV = {**TEST_SERVICE_ENV, "TOKENMESH_CACHE": "on", "TOKENMESH_CACHE_BILLING": "prompt_only"}


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own: one worker with the response cache on."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("cached")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=ENV,
    )
    with Mesh(config) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _dump_cached_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "cached" in request.fixturenames:
        print(request.getfixturevalue("cached").log_tails())


def _key(mesh: Mesh, tenant: str) -> str:
    created = cli(
        mesh, "keys", "create", "--tenant", tenant, "--scopes", "inference:generate,inference:embed"
    )
    return str(created["secret"])


@pytest.fixture(scope="module")
def acme(cached: Mesh) -> str:
    return _key(cached, "acme")


def _complete(mesh: Mesh, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    reply = httpx.post(
        f"{mesh.edge_url}/v2/models/{MODEL}:complete",
        json=body,
        headers={"x-api-key": key, **headers},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply


def _metric(mesh: Mesh, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.ports['inference-0-metrics']}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.index("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _usage_events(mesh: Mesh, request_ids: set[str]) -> dict[str, v1_resources.UsageEvent]:
    client: Any = redis.Redis.from_url(mesh.redis_url)
    found: dict[str, v1_resources.UsageEvent] = {}
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(found) < len(request_ids):
            for _, fields in client.xrange("tokenmesh:usage"):
                request_id = fields[b"request_id"].decode()
                if request_id in request_ids:
                    found[request_id] = v1_resources.UsageEvent.FromString(fields[b"event"])
            time.sleep(0.05)
    finally:
        client.close()
    assert set(found) == request_ids
    return found


def _body(**extra: Any) -> dict[str, Any]:
    return {"prompt": unique_prompt("cache me"), "max_output_tokens": 8, **extra}


def test_a_seeded_request_twice_is_a_hit_for_its_tenant_and_a_miss_for_another(cached, acme):
    body = _body(sampling={"seed": 11})
    first = _complete(cached, acme, body)
    second = _complete(cached, acme, body)
    assert first.headers["x-tokenmesh-cache"] == "miss"
    assert second.headers["x-tokenmesh-cache"] == "hit"
    miss, hit = first.json(), second.json()
    assert hit["choices"][0]["text"] == miss["choices"][0]["text"]
    assert hit["usage"] == miss["usage"]
    assert hit["request_id"] != miss["request_id"]
    # The worker's own timing: the miss waited for engine steps, the hit for none.
    miss_ttft = miss["choices"][0]["timing"]["time_to_first_token_ms"]
    hit_ttft = hit["choices"][0]["timing"]["time_to_first_token_ms"]
    assert hit_ttft < miss_ttft
    events = _usage_events(cached, {miss["request_id"], hit["request_id"]})
    assert not events[miss["request_id"]].cached
    served = events[hit["request_id"]]
    assert served.cached and served.usage.completion_tokens == 0  # prompt_only billing
    assert served.served_usage.completion_tokens == miss["usage"]["completion_tokens"]
    other = _complete(cached, _key(cached, "globex"), body)
    assert other.headers["x-tokenmesh-cache"] == "miss"


def test_unseeded_sampling_and_no_store_bypass_the_cache(cached, acme):
    random = _body(sampling={"temperature": 0.8})
    assert [_complete(cached, acme, random).headers["x-tokenmesh-cache"] for _ in range(2)] == [
        "bypass",
        "bypass",
    ]
    seeded = _body(sampling={"seed": 3})
    replies = [_complete(cached, acme, seeded, **{"cache-control": "no-store"}) for _ in range(2)]
    assert [r.headers["x-tokenmesh-cache"] for r in replies] == ["bypass", "bypass"]
    # no-cache recomputes and refreshes: the next plain request hits.
    refreshed = _complete(cached, acme, seeded, **{"cache-control": "no-cache"})
    assert refreshed.headers["x-tokenmesh-cache"] == "miss"
    assert _complete(cached, acme, seeded).headers["x-tokenmesh-cache"] == "hit"
    # The v2 field says the same as the header.
    assert (
        _complete(cached, acme, {**seeded, "cache": "NO_STORE"}).headers["x-tokenmesh-cache"]
        == "bypass"
    )


def _sse(mesh: Mesh, key: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    with httpx.stream(
        "POST",
        f"{mesh.edge_url}/v2/models/{MODEL}:generate",
        json=body,
        headers={"x-api-key": key},
        timeout=30,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
        return reply.headers["x-tokenmesh-cache"], events


def test_a_hit_on_a_stream_replays_the_same_messages_and_final_usage(cached, acme):
    body = _body(sampling={"temperature": 0}, n=2)
    first_status, first = _sse(cached, acme, body)
    second_status, second = _sse(cached, acme, body)
    assert (first_status, second_status) == ("miss", "hit")
    strip = ("request_id", "timing")
    assert [{k: v for k, v in e.items() if k not in strip} for e in second] == [
        {k: v for k, v in e.items() if k not in strip} for e in first
    ]


def test_identical_concurrent_requests_compute_once_and_each_is_metered(cached, acme):
    request = pb.GenerateRequest(model=MODEL, prompt=unique_prompt("together"))
    request.sampling.seed = 5
    request.max_output_tokens = 24
    before = _metric(cached, "tokenmesh_computed_sequences_total", model=MODEL)
    leaver_started = threading.Event()

    def call(index: int, channel: grpc.Channel) -> tuple[str, Any, str]:
        stub = rpc.InferenceServiceStub(channel)
        mine = pb.GenerateRequest()
        mine.CopyFrom(request)
        mine.request_id = f"together-{index}-{uuid.uuid4().hex[:6]}"
        stream = stub.Generate(mine, timeout=60)
        status = dict(stream.initial_metadata())["x-tokenmesh-cache"]
        text = ""
        for message in stream:
            text += message.text
            if index == 0:  # this client leaves after its first message
                leaver_started.set()
                stream.cancel()
                break
        return mine.request_id, status, text

    with (
        authed_channel(cached.edge_address, [("x-api-key", acme)]) as channel,
        concurrent.futures.ThreadPoolExecutor(16) as pool,
    ):
        results = list(pool.map(lambda i: call(i, channel), range(16)))
    assert leaver_started.is_set()
    stayed = results[1:]
    assert len({text for _, _, text in stayed}) == 1 and stayed[0][2]
    statuses = sorted(status for _, status, _ in results)
    assert statuses.count("miss") == 1
    assert set(statuses) <= {"miss", "coalesced", "hit"}
    after = _metric(cached, "tokenmesh_computed_sequences_total", model=MODEL)
    assert after - before == 1
    events = _usage_events(cached, {request_id for request_id, _, _ in results})
    finished = [events[request_id] for request_id, _, _ in stayed]
    assert all(e.finish_reason in ("stop", "length") for e in finished)


def test_concurrent_embeddings_compute_each_distinct_input_once(cached, acme):
    shared = [f"shared {i} {uuid.uuid4().hex[:6]}" for i in range(4)]
    bodies = [{"inputs": [*shared, f"own {i} {uuid.uuid4().hex[:6]}"]} for i in range(10)]
    before = _metric(
        cached, "tokenmesh_embedding_inputs_total", model="all-minilm-l6-v2", result="computed"
    )

    def embed(body: dict[str, Any]) -> list[list[float]]:
        reply = httpx.post(
            f"{cached.edge_url}/v2/models/all-minilm-l6-v2:embed",
            json=body,
            headers={"x-api-key": acme},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        return [e["values"] for e in reply.json()["embeddings"]]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(embed, bodies))
    after = _metric(
        cached, "tokenmesh_embedding_inputs_total", model="all-minilm-l6-v2", result="computed"
    )
    assert after - before == len(shared) + len(bodies)
    first = results[0][: len(shared)]
    assert all(r[: len(shared)] == first for r in results)


def test_the_openai_routes_carry_the_cache_status(cached, acme):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": unique_prompt("openai")}],
        "max_tokens": 8,
        "seed": 9,
    }

    def chat(**extra: Any) -> httpx.Response:
        reply = httpx.post(
            f"{cached.edge_url}/openai/v1/chat/completions",
            json={**body, **extra},
            headers={"authorization": f"Bearer {acme}"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        return reply

    first, second = chat(), chat()
    assert [first.headers["x-tokenmesh-cache"], second.headers["x-tokenmesh-cache"]] == [
        "miss",
        "hit",
    ]
    texts = [r.json()["choices"][0]["message"]["content"] for r in (first, second)]
    assert texts[0] == texts[1]
    assert chat(temperature=0.9, seed=None).headers["x-tokenmesh-cache"] == "bypass"
