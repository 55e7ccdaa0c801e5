"""REST clients through the real Envoy edge: JSON, SSE and JSON errors."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

MODEL = "deterministic-test"


@pytest.fixture(scope="module")
def http(mesh, admin_key):
    with httpx.Client(
        base_url=mesh.edge_url, timeout=30, headers={"x-api-key": admin_key}
    ) as client:
        yield client


def _sse_events(response: httpx.Response) -> list[tuple[float, dict[str, Any]]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append((time.monotonic(), json.loads(line[len("data: ") :])))
    return events


def test_healthz_is_200_when_everything_serves(http):
    assert http.get("/healthz").status_code == 200


def test_list_and_get_models(http):
    models = http.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["all-minilm-l6-v2", "demo-lm", MODEL]
    kinds = {m["name"]: m["kind"] for m in models}
    assert kinds["all-minilm-l6-v2"] == "MODEL_KIND_EMBEDDING"
    model = http.get(f"/v1/models/{MODEL}").json()["model"]
    assert model["versions"][0]["state"] == "MODEL_VERSION_STATE_READY"
    assert model["versions"][0]["context_length"] == 512


def test_generate_streams_sse_events_incrementally(http):
    body = {"prompt": "hello mesh", "max_tokens": 5, "seed": 3}
    with http.stream("POST", f"/v1/models/{MODEL}:generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # Nothing between the edge and the client may cache or buffer the stream.
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-model-version"] == "1"
        events = _sse_events(response)
    assert len(events) >= 2
    arrivals = [t for t, _ in events]
    assert arrivals[-1] - arrivals[0] > 0.02, "events arrived all at once"
    messages = [m for _, m in events]
    assert [m["index"] for m in messages] == list(range(len(messages)))
    final = messages[-1]
    assert final["finish_reason"] == "length"
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert final["model"] == {"name": MODEL, "version": "1"}
    assert set(final["timing"]) == {"queue_ms", "time_to_first_token_ms", "total_ms"}
    assert all(m["finish_reason"] == "" for m in messages[:-1])


def test_same_seed_same_text_through_the_edge(http):
    def text(seed: int) -> str:
        body = {"prompt": "determinism", "max_tokens": 6, "seed": seed}
        return str(http.post(f"/v1/models/{MODEL}:complete", json=body).json()["text"])

    assert text(42) == text(42)
    assert text(42) != text(43)


def test_complete_prints_every_field(http):
    reply = http.post(
        f"/v1/models/{MODEL}:complete",
        json={"prompt": "hi", "max_tokens": 3, "request_id": "abc-1"},
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["request_id"] == "abc-1"
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert len(body["token_ids"]) == 3
    assert reply.headers["x-request-id"] == "abc-1"
    assert "x-accel-buffering" not in reply.headers  # an event stream's only


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ],
)
def test_out_of_range_fields_are_400_naming_the_field(http, body, field):
    for verb in ("complete", "generate"):
        reply = http.post(f"/v1/models/{MODEL}:{verb}", json=body)
        assert reply.status_code == 400, reply.text
        error = reply.json()
        assert error["code"] == 3
        violations = next(d for d in error["details"] if d["@type"].endswith("BadRequest"))
        assert [v["field"] for v in violations["field_violations"]] == [field]
        assert "Traceback" not in reply.text


def test_bad_json_is_400_with_a_json_body(http):
    reply = http.post(
        f"/v1/models/{MODEL}:complete",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["code"] == 3


def test_unknown_path_is_404_json(http):
    reply = http.get("/v1/nothing/here")
    assert reply.status_code == 404
    assert reply.json()["code"] == 5


def test_unknown_query_parameter_is_400(http):
    reply = http.get("/v1/models", params={"bogus": "1"})
    assert reply.status_code == 400
    assert "bogus" in reply.json()["message"]


def test_unknown_model_is_404_with_reason(http):
    reply = http.post("/v1/models/no-such-model:complete", json={"prompt": "hi"})
    assert reply.status_code == 404
    info = reply.json()["details"][0]
    assert info["reason"] == "MODEL_NOT_FOUND"


def test_context_overflow_is_400_with_numbers(http):
    reply = http.post(f"/v1/models/{MODEL}:complete", json={"prompt": "w " * 510, "max_tokens": 10})
    assert reply.status_code == 400
    assert "510" in reply.json()["message"] and "512" in reply.json()["message"]


def test_demo_lm_streams_over_sse(http):
    body = {"prompt": "And the LORD spake unto Moses", "max_tokens": 12, "seed": 7}
    with http.stream("POST", "/v1/models/demo-lm:generate", json=body) as response:
        assert response.status_code == 200
        messages = [m for _, m in _sse_events(response)]
    assert messages[-1]["finish_reason"] == "length"
    assert messages[-1]["usage"]["completion_tokens"] == 12
    assert "".join(m["text"] for m in messages).strip()


def test_embed_over_rest(http):
    reply = http.post(
        "/v1/models/all-minilm-l6-v2:embed", json={"inputs": ["kitten", "cat", "car"]}
    )
    assert reply.status_code == 200
    vectors = [e["values"] for e in reply.json()["embeddings"]]
    assert len(vectors) == 3 and len(vectors[0]) == 384

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert reply.json()["usage"]["prompt_tokens"] == 9


def test_embed_without_inputs_is_400(http):
    reply = http.post("/v1/models/all-minilm-l6-v2:embed", json={"inputs": []})
    assert reply.status_code == 400


def test_a_body_naming_another_model_than_the_path_is_400(http):
    # The body's `model` won over the path's: /v1/models/nope:complete with
    # {"model": MODEL} ran MODEL, while the URL (and the access log) said nope.
    # The transcoders now refuse a body field the path binds to another value.
    for version in ("v1", "v2"):
        body = {"model": MODEL, "prompt": "hi"}
        reply = http.post(f"/{version}/models/no-such-model:complete", json=body)
        assert reply.status_code == 400, (version, reply.text)
        assert reply.json()["code"] == 3
        assert "model" in reply.json()["message"]
        # The same value twice is no conflict.
        assert http.post(f"/{version}/models/{MODEL}:complete", json=body).status_code == 200
