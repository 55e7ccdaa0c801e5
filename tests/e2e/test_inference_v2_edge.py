"""Inference v2 through the real edge: REST/SSE and gRPC, routed, metered with v1."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tests.e2e.conftest import seen_by_the_edge, spread_of, stable_round
from tests.e2e.test_auth import create_key
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

CHAT = {
    "messages": [
        {"role": "system", "content": "You answer in the style of the King James Bible."},
        {"role": "user", "content": "Who made the heavens?"},
    ],
    "n": 3,
    "sampling": {"seed": 7},
    "max_output_tokens": 8,
}


@pytest.fixture(scope="module")
def http(mesh, admin_key):
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": admin_key}
    ) as client:
        yield client


def _events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def _texts(events: list[dict[str, Any]]) -> list[str]:
    texts: dict[int, str] = {}
    for event in events:
        texts[event["choice_index"]] = texts.get(event["choice_index"], "") + event["text"]
    return [texts[i] for i in sorted(texts)]


def test_rest_chat_generate_streams_sse_choices(http):
    events = _events(http, "/v2/models/demo-lm:generate", CHAT)
    assert {e["choice_index"] for e in events} == {0, 1, 2}
    finals = [e for e in events if "finish_reason" in e]
    assert sorted(f["choice_index"] for f in finals) == [0, 1, 2]
    for final in finals:
        assert final["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
        assert set(final["usage"]) == {
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cached_prompt_tokens",
        }
        assert {"queue_ms", "prefill_ms", "time_to_first_token_ms", "decode_ms"} <= set(
            final["timing"]
        )
        assert final["model"]["name"] == "demo-lm"
        # demo-lm's config.json has no chat_template: the built-in one rendered the chat.
        assert final["template"] == {"name": "tokenmesh.default-chat", "version": 1}
        assert 0 <= final["confidence"] <= 1 and final["mean_logprob"] <= 0
    deltas = [e for e in events if "finish_reason" not in e]
    assert all("usage" not in e and "confidence" not in e for e in deltas)
    sent = sum(len(e["token_ids"]) for e in events)
    assert finals[-1]["usage"]["completion_tokens"] == sent
    texts = _texts(events)
    assert len(set(texts)) == 3, texts
    assert _texts(_events(http, "/v2/models/demo-lm:generate", CHAT)) == texts


def test_rest_complete_with_logprobs_and_short_enum_names(http):
    body = {
        "prompt": "And God said",
        "max_output_tokens": 5,
        "sampling": {"temperature": 0},
        "logprobs": True,
        "top_logprobs": 3,
        "metadata": {"team": "search"},
    }
    reply = http.post("/v2/models/demo-lm:complete", json=body)
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    assert len(choice["logprobs"]) == len(choice["token_ids"]) == 5
    for item in choice["logprobs"]:
        tops = item["top_logprobs"]
        assert item["logprob"] <= 0 and tops[0]["token_id"] == item["token_id"]
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
    assert choice["finish_reason"] == "FINISH_REASON_LENGTH"


def test_rest_embed_base64(http):
    body = {"inputs": ["In the beginning"], "encoding": "BASE64", "truncate": "END"}
    reply = http.post("/v2/models/all-minilm-l6-v2:embed", json=body)
    assert reply.status_code == 200, reply.text
    (embedding,) = reply.json()["embeddings"]
    vector = np.frombuffer(base64.b64decode(embedding["base64"]), dtype="<f4")
    assert vector.shape == (384,) and abs(float(np.dot(vector, vector)) - 1) < 1e-4
    assert embedding["values"] == [] and embedding["prompt_tokens"] > 0


def test_rest_models_and_field_violations(http):
    models = http.get("/v2/models").json()["models"]
    assert "demo-lm" in {m["name"] for m in models}
    demo = http.get("/v2/models/demo-lm").json()["model"]
    assert demo["versions"][0]["max_output_tokens_default"] > 0
    reply = http.post("/v2/models/demo-lm:generate", json={"prompt": "x", "n": 9})
    assert reply.status_code == 400, reply.text
    (details,) = [d for d in reply.json()["details"] if "field_violations" in d]
    assert [v["field"] for v in details["field_violations"]] == ["n"]


def test_grpc_v2_generate_is_routed_by_version(channel):
    stub = rpc.InferenceServiceStub(channel)
    # "latest" is a catalogue alias: only the edge's model routes resolve it (to "1").
    call = stub.Generate(
        pb.GenerateRequest(
            model="deterministic-test",
            version="latest",
            prompt="a b c",
            n=2,
            max_output_tokens=3,
        ),
        timeout=10,
    )
    messages = list(call)
    finals = [m for m in messages if m.HasField("finish_reason")]
    assert sorted(m.choice_index for m in finals) == [0, 1]
    assert all(m.finish_reason == resources.FINISH_REASON_LENGTH for m in finals)
    assert all(m.model.version == "1" for m in finals)
    assert finals[-1].usage.total_tokens == 3 + 6
    assert dict(call.initial_metadata())["x-model-version"] == "1"


def test_grpc_v2_errors_carry_bad_request_details(channel):
    stub = rpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Complete(
            pb.CompleteRequest(model="deterministic-test", prompt="x", top_logprobs=2), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details if d.Is(bad_request.DESCRIPTOR))
    assert [v.field for v in bad_request.field_violations] == ["top_logprobs"]


def test_reflection_at_the_edge_lists_v1_and_v2(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "tokenmesh.inference.v1.InferenceService",
        "tokenmesh.inference.v2.InferenceService",
    } <= names


def test_v1_and_v2_are_metered_into_the_same_totals(mesh):
    key = create_key(mesh, scopes="inference:generate,usage:read")
    headers = {"x-api-key": key["secret"]}
    prompt = completion = 0
    with httpx.Client(base_url=mesh.edge_url, headers=headers, timeout=30) as http:
        body = {"prompt": "count me", "max_tokens": 4, "seed": 1}
        usage = http.post("/v1/models/deterministic-test:complete", json=body).json()["usage"]
        prompt, completion = (
            prompt + usage["prompt_tokens"],
            completion + usage["completion_tokens"],
        )
        body = {"prompt": "count me too", "n": 2, "max_output_tokens": 3}
        usage = http.post("/v2/models/deterministic-test:complete", json=body).json()["usage"]
        prompt, completion = (
            prompt + usage["prompt_tokens"],
            completion + usage["completion_tokens"],
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            report = http.get("/v1/usage").json()
            if int(report["requests"]) >= 2:
                break
            time.sleep(0.2)
    assert int(report["requests"]) == 2
    assert int(report["prompt_tokens"]) == prompt == 2 + 3
    assert int(report["completion_tokens"]) == completion == 4 + 6


def test_v1_still_works_beside_v2(channel):
    reply = v1_rpc.InferenceServiceStub(channel).Complete(
        v1.CompleteRequest(model="deterministic-test", prompt="a b", max_tokens=2), timeout=10
    )
    assert reply.finish_reason == "length" and reply.usage.completion_tokens == 2


def test_chats_that_start_alike_reach_the_same_worker(mesh, http):
    # Without a prompt, the routes hash the head of a chat's first message.
    system = "the mesh routes tokens through envoy to workers and back again: answer"

    def worker(first: str, question: str) -> str:
        body = {
            "messages": [
                {"role": "system", "content": first},
                {"role": "user", "content": question},
            ],
            "max_output_tokens": 1,
        }
        reply = http.post("/v2/models/deterministic-test:complete", json=body)
        assert reply.status_code == 200, reply.text
        return str(reply.headers["x-tokenmesh-worker"])

    cluster = "model:deterministic-test:1"
    seen_by_the_edge(lambda: worker(system, "seen?"))
    met = stable_round(mesh, cluster, lambda: {worker(system, f"question {n}") for n in range(8)})
    assert len(met) == 1, met
    spread = spread_of(mesh, cluster, lambda head: worker(head + system, "question"))
    assert spread == {"inference-0", "inference-1"}
