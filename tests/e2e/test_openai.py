"""The OpenAI-compatible surface (/openai/v1) through the real edge, with the official SDK."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.conftest import seen_by_the_edge, spread_of, stable_round
from tests.e2e.test_auth import create_key

CHAT = [
    {"role": "system", "content": "You answer in the style of the King James Bible."},
    {"role": "user", "content": [{"type": "text", "text": "Who made the heavens?"}]},
]


@pytest.fixture(scope="module")
def client(mesh, admin_key) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=admin_key, base_url=f"{mesh.edge_url}/openai/v1", max_retries=0, timeout=60
    ) as client:
        yield client


def sdk(mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key, base_url=f"{mesh.edge_url}/openai/v1", max_retries=0, timeout=60
    )


def test_models_list_names_each_model_and_its_versions(client):
    ids = {m.id for m in client.models.list()}
    assert {"demo-lm", "demo-lm@1", "all-minilm-l6-v2", "all-minilm-l6-v2@1"} <= ids
    model = client.models.retrieve("demo-lm@1")
    assert (model.id, model.object, model.owned_by) == ("demo-lm@1", "model", "tokenmesh")
    assert isinstance(model.created, int)


def test_chat_streamed_deltas_concatenate_to_the_unary_text(client):
    params: dict[str, Any] = {"model": "demo-lm", "messages": CHAT, "max_tokens": 12, "seed": 5}
    whole = client.chat.completions.create(**params)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.model == "demo-lm@1" and whole.system_fingerprint == "1"
    assert isinstance(whole.created, int)
    [choice] = whole.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = whole.usage
    assert usage is not None and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None

    chunks = list(client.chat.completions.create(**params, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == "demo-lm@1" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[:-1] == [None] * (len(chunks) - 1) and finishes[-1] == choice.finish_reason


def test_chat_n_choices_and_logprobs(client):
    reply = client.chat.completions.create(
        model="demo-lm@1",
        messages=CHAT,
        max_completion_tokens=6,
        n=2,
        seed=11,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        for token in choice.logprobs.content:
            assert token.logprob <= 0 and token.bytes == list(token.token.encode())
            assert 1 <= len(token.top_logprobs) <= 3
            assert all(t.logprob <= 0 for t in token.top_logprobs)


def test_stream_with_usage_ends_with_a_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="demo-lm",
            messages=CHAT,
            max_tokens=5,
            n=2,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}
    tokens = sum(1 for c in chunks[:-1] if c.choices[0].delta.content)
    assert last.usage.completion_tokens >= tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_legacy_completions_with_prompt_lists_and_logprobs(client):
    reply = client.completions.create(
        model="demo-lm", prompt=["In the beginning", "And God said"], max_tokens=4, n=2, logprobs=2
    )
    assert reply.object == "text_completion" and reply.model == "demo-lm@1"
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        assert choice.logprobs is not None
        assert "".join(choice.logprobs.tokens or []) == choice.text
        tops = choice.logprobs.top_logprobs or []
        # The 2 most likely and, as OpenAI adds it, the sampled token (up to 3).
        assert all(len(top) <= 3 for top in tops)
        assert all(
            token in top for token, top in zip(choice.logprobs.tokens or [], tops, strict=True)
        )
    assert reply.usage is not None and reply.usage.completion_tokens >= 4
    streamed = list(
        client.completions.create(
            model="demo-lm", prompt="In the beginning", max_tokens=6, seed=3, stream=True
        )
    )
    whole = client.completions.create(
        model="demo-lm", prompt="In the beginning", max_tokens=6, seed=3
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_embeddings_float_and_base64_are_the_same_vectors(client):
    inputs = ["In the beginning was the Word", "and the Word was with God"]
    floats = client.embeddings.create(
        model="all-minilm-l6-v2", input=inputs, encoding_format="float"
    )
    decoded = client.embeddings.create(model="all-minilm-l6-v2", input=inputs)  # base64 on the wire
    assert [d.index for d in floats.data] == [0, 1]
    assert [d.embedding for d in floats.data] == [d.embedding for d in decoded.data]
    assert len(floats.data[0].embedding) == 384
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    raw = client.embeddings.create(
        model="all-minilm-l6-v2@1", input="one", encoding_format="base64", dimensions=384
    )
    vector = np.frombuffer(base64.b64decode(str(raw.data[0].embedding)), dtype="<f4")
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3


def test_usage_is_what_the_mesh_meters(mesh):
    key = create_key(mesh, scopes="inference:generate,inference:embed,usage:read")
    with sdk(mesh, key["secret"]) as client:
        totals = [
            client.chat.completions.create(model="demo-lm", messages=CHAT, max_tokens=3).usage,
            client.completions.create(model="demo-lm", prompt=["a", "b"], max_tokens=2).usage,
        ]
        streamed = list(
            client.chat.completions.create(
                model="demo-lm",
                messages=CHAT,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        totals.append(streamed[-1].usage)
    prompt = sum(u.prompt_tokens for u in totals if u)
    completion = sum(u.completion_tokens for u in totals if u)
    with httpx.Client(
        base_url=mesh.edge_url, headers={"x-api-key": key["secret"]}, timeout=10
    ) as http:
        deadline = time.monotonic() + 15
        report: dict[str, Any] = {}
        while time.monotonic() < deadline:
            report = http.get("/v1/usage").json()
            if int(report.get("requests", 0)) >= 4:  # the legacy call's two prompts are two
                break
            time.sleep(0.2)
    assert int(report["requests"]) == 4
    assert (int(report["prompt_tokens"]), int(report["completion_tokens"])) == (prompt, completion)


def test_sdk_exceptions(mesh, client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert not_found.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo-lm", messages=CHAT, temperature=7)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="demo-lm", messages=CHAT, extra_body={"frobnicate": True}
        )
    assert unknown.value.param == "frobnicate" and unknown.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="demo-lm", messages=CHAT, max_tokens=10**6)
    assert too_long.value.param == "max_tokens"
    with (
        pytest.raises(openai.AuthenticationError) as unauthenticated,
        sdk(mesh, "tm-bad") as bad_key,
    ):
        bad_key.models.list()
    assert unauthenticated.value.status_code == 401
    body = unauthenticated.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert (body["type"], body["code"]) == ("invalid_request_error", "invalid_api_key")  # OpenAI's
    other_model = create_key(mesh, "--models", "deterministic-test")
    with pytest.raises(openai.PermissionDeniedError), sdk(mesh, other_model["secret"]) as narrow:
        narrow.chat.completions.create(model="demo-lm", messages=CHAT, max_tokens=1)
    limited = create_key(mesh, "--rpm", "1")
    with sdk(mesh, limited["secret"]) as slow:
        slow.chat.completions.create(model="demo-lm", messages=CHAT, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limit:
            slow.chat.completions.create(model="demo-lm", messages=CHAT, max_tokens=1)
    assert 1 <= int(limit.value.response.headers["retry-after"]) <= 60


IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "user", "content": [IMAGE_PART]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_unsupported_features_answer_the_documented_code(client, extra, param):
    # docs/openai.md: 400 `unsupported_parameter` naming it (they read invalid_argument).
    body = dict(extra)
    messages = body.pop("messages", CHAT)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="demo-lm", messages=messages, max_tokens=1, extra_body=body
        )
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", param)


def test_a_user_over_256_characters_is_named_user(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="demo-lm", messages=CHAT, max_tokens=1, user="u" * 300)
    assert refused.value.param == "user"  # was metadata.user, a name the client never sent
    assert "256" in str(refused.value.message)


def test_raw_stream_is_server_sent_events_that_arrive_over_time(mesh, admin_key):
    body = {"model": "demo-lm", "messages": CHAT, "max_tokens": 32, "stream": True, "seed": 2}
    arrivals: list[tuple[float, str]] = []
    with httpx.stream(
        "POST",
        f"{mesh.edge_url}/openai/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {admin_key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "x-request-id" in response.headers
        for line in response.iter_lines():
            arrivals.append((time.monotonic(), line))
    lines = [line for _, line in arrivals if line]
    assert not [line for line in lines if not line.startswith("data: ")]  # no `event:` lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["finish_reason"] is None  # JSON null, not left out
    assert isinstance(chunks[0]["created"], int)
    times = [t for t, line in arrivals if line.startswith("data: {")]
    assert times[0] < times[-1]  # the first chunk came before the stream ended


def test_errors_have_openais_shape_on_every_path(mesh, admin_key):
    headers = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=f"{mesh.edge_url}/openai/v1", timeout=10) as http:
        cases = {
            "unknown path (transcoder)": (http.get("/nothing", headers=headers), 404),
            "no credential (edge)": (http.get("/models"), 401),
            "bad JSON (worker)": (
                http.post("/chat/completions", content=b"{nope", headers=headers),
                400,
            ),
            "unknown version (worker)": (http.get("/models/demo-lm@9", headers=headers), 404),
        }
    for name, (reply, status) in cases.items():
        assert reply.status_code == status, name
        assert reply.headers["content-type"] == "application/json", name
        error = reply.json()["error"]
        # Envoy's own replies print keys sorted; order within `error` is free in JSON.
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["message"], name
        assert "x-tokenmesh-openai-error" not in reply.headers


def test_odd_but_parseable_bodies_get_a_400_not_a_500(mesh, admin_key):
    # Each was an INTERNAL error (a 500 with a traceback in the worker's log), or a
    # 502: a lone surrogate protobuf cannot hold, an integer past Python's 4,300
    # digits, 20,000 bad messages (a 750 KB error status in the trailers), and one
    # legacy request asking for 200 sequences (each a worker request, at once).
    headers = {"authorization": f"Bearer {admin_key}", "content-type": "application/json"}
    chat = '{"model":"demo-lm","messages":[{"role":"user","content":%s}]%s}'
    bodies = {
        "lone surrogate": (chat % ('"\\ud800"', ""), "body"),
        "huge integer": (chat % ('"hi"', ',"max_tokens":' + "1" * 5000), "body"),
        "20,000 bad messages": (
            '{"model":"demo-lm","messages":[' + ",".join(["1"] * 20000) + "]}",
            None,
        ),
    }
    with httpx.Client(base_url=f"{mesh.edge_url}/openai/v1", timeout=30) as http:
        for name, (body, param) in bodies.items():
            reply = http.post("/chat/completions", content=body.encode(), headers=headers)
            assert reply.status_code == 400, (name, reply.text[:200])
            error = reply.json()["error"]
            assert error["type"] == "invalid_request_error", name
            if param is not None:
                assert error["param"] == param, name
            assert len(reply.content) < 16_384, name  # the first problems, then a count
        legacy = {"model": "demo-lm", "prompt": ["a"] * 25, "n": 8, "max_tokens": 1}
        reply = http.post("/completions", json=legacy, headers=headers)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "prompt"


def test_requests_are_routed_by_the_model_in_their_json(mesh, admin_key):
    # The model-routing Lua filter reads `model` (a name@version pins) and the
    # head of `messages` from the JSON: chats that start alike meet one worker.
    system = "the mesh routes tokens through envoy to workers and back again: answer"

    def worker(first: str, question: str, model: str = "deterministic-test") -> str:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": first},
                {"role": "user", "content": question},
            ],
            "max_tokens": 1,
        }
        reply = httpx.post(
            f"{mesh.edge_url}/openai/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {admin_key}"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "deterministic-test@1"
        return str(reply.headers["x-tokenmesh-worker"])

    cluster = "model:deterministic-test:1"
    seen_by_the_edge(lambda: worker(system, "seen?", "deterministic-test@1"))
    met = stable_round(
        mesh, cluster, lambda: {worker(system, f"q {n}", "deterministic-test@1") for n in range(8)}
    )
    assert len(met) == 1, met
    spread = spread_of(mesh, cluster, lambda head: worker(head + system, "question"))
    assert spread == {"inference-0", "inference-1"}
