"""Logprobs carry each token's exact bytes, on a real worker, in v2 and OpenAI's chat.

A byte-level BPE token may be part of a multi-byte character: alone it decodes
to U+FFFD, and only its bytes (v2 `token_bytes`, OpenAI's `bytes`) let a client
rebuild the character. demo-lm never writes such a token (it learnt ASCII
scripture), so the test serves a copy of it whose tokenizer spells two tokens
it writes as the two bytes of "é": same weights and prompt, so the same ids.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from google.api.httpbody_pb2 import HttpBody

from services.inference.tokenizer import HuggingFaceTokenizer
from tests import mtls
from tests.integration.conftest import MODEL_REPOSITORY, inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

CHAT = [{"role": "user", "content": "Who made the heavens?"}]
# The prompt the default chat template renders from CHAT: a token whose text is
# not in it is not one of its tokens either.
RENDERED = "User: Who made the heavens?\nAssistant:"
E_ACUTE = "é".encode()  # b"\xc3\xa9": neither byte is UTF-8 on its own
# GPT-2's byte-level alphabet writes bytes 0xc3 and 0xa9 as these characters.
BYTE_CHARS = {0xC3: "\u00c3", 0xA9: "\u00a9"}


@pytest.fixture
async def worker(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[grpc.aio.Channel, Path]]:
    """A worker serving a copy of demo-lm version 1; yields (channel, its repository)."""
    repository = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY / "demo-lm" / "1", repository / "demo-lm" / "1")
    settings = inference_settings(
        tmp_path, redis_url, models=("demo-lm:1",), test_models=(), model_repository=repository
    )
    async with await start_inference(settings) as (_, channel):
        yield channel, repository


def _respell(source: Path, target: Path, first: int, second: int) -> None:
    """Copies a version, its tokenizer spelling `first` and `second` as 0xc3 and 0xa9.

    Each trades spellings with the single-byte token: a swap of vocabulary ids
    keeps the tokenizer whole (merges name strings), and the prompt encodes as
    before unless it holds one of the four tokens (the test checks the ids).
    """
    target.mkdir(parents=True)
    for name in ("model.onnx", "config.json"):
        shutil.copy(source / name, target / name)
    document = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = document["model"]["vocab"]
    spelling = {token_id: token for token, token_id in vocab.items()}
    for token_id, byte in ((first, 0xC3), (second, 0xA9)):
        other = vocab[BYTE_CHARS[byte]]
        vocab[spelling[token_id]], vocab[BYTE_CHARS[byte]] = other, token_id
        spelling[token_id], spelling[other] = BYTE_CHARS[byte], spelling[token_id]
    (target / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")


def _pair(ids: list[int], texts: list[str], at: int) -> bool:
    """Tells whether ids[at] is always followed by ids[at + 1], which is always preceded by
    it, and neither token's text is in the prompt."""
    first, second = ids[at], ids[at + 1]
    pairs = itertools.pairwise(ids)
    together = first != second and all((a == first) == (b == second) for a, b in pairs)
    alone = ids[-1] != first and ids[0] != second
    return together and alone and all(t and t not in RENDERED for t in texts[at : at + 2])


def _greedy(version: str, **fields: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="demo-lm",
        version=version,
        messages=[resources.ChatMessage(**m) for m in CHAT],
        max_output_tokens=12,
        sampling=resources.SamplingParams(temperature=0),
        **fields,
    )


async def _openai_chat(channel: grpc.aio.Channel) -> dict[str, Any]:
    body = {
        "model": "demo-lm@2",
        "messages": CHAT,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    call = openai_rpc.OpenAIServiceStub(channel).CreateChatCompletion(
        HttpBody(content_type="application/json", data=json.dumps(body).encode())
    )
    return dict(json.loads(b"".join([m.data async for m in call])))


async def test_a_token_inside_a_character_reports_its_exact_bytes(worker):
    channel, repository = worker
    stub = rpc.InferenceServiceStub(channel)
    [plain] = (await stub.Complete(_greedy("1"))).choices
    ids = list(plain.token_ids)
    # Two tokens of the answer, not of the prompt, that always come together
    # become the bytes of "é" (so the answer stays valid UTF-8).
    original = HuggingFaceTokenizer(repository / "demo-lm" / "1" / "tokenizer.json")
    texts = [original.decode([i]) for i in ids]
    at = next(i for i in range(len(ids) - 1) if _pair(ids, texts, i))
    version_2 = repository / "demo-lm" / "2"
    _respell(repository / "demo-lm" / "1", version_2, ids[at], ids[at + 1])
    admin = v1_rpc.InferenceAdminServiceStub(channel)
    await admin.LoadModel(
        v1.LoadModelRequest(model="demo-lm", version="2"), metadata=mtls.EDGE_FOR_ADMIN
    )
    pieces = HuggingFaceTokenizer(version_2 / "tokenizer.json").piece_bytes()
    assert pieces is not None, "the respelled tokenizer is still byte-level BPE"

    [choice] = (await stub.Complete(_greedy("2", logprobs=True, top_logprobs=5))).choices
    assert list(choice.token_ids) == ids, "the respelling changed the prompt's tokens"
    assert E_ACUTE.decode() in choice.text
    items = list(choice.logprobs)
    assert [i.token for i in items[at : at + 2]] == ["\ufffd", "\ufffd"]
    assert [i.token_bytes for i in items[at : at + 2]] == [b"\xc3", b"\xa9"]
    assert b"".join(i.token_bytes for i in items) == choice.text.encode()
    for item in items:
        assert item.token_bytes == pieces[item.token_id]
        for top in item.top_logprobs:
            assert top.token_bytes == pieces[top.token_id]

    answer = await _openai_chat(channel)
    [openai_choice] = answer["choices"]
    content = openai_choice["logprobs"]["content"]
    assert [t["bytes"] for t in content[at : at + 2]] == [[0xC3], [0xA9]]
    text = openai_choice["message"]["content"]
    assert text == choice.text
    assert bytes(b for t in content for b in t["bytes"]) == text.encode()
    for token, item in zip(content, items, strict=True):
        assert [t["bytes"] for t in token["top_logprobs"]] == [
            list(top.token_bytes) for top in item.top_logprobs
        ]
