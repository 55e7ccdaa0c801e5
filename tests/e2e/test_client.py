"""The Python client (`tokenmesh.Client`) against the real edge: it speaks v2."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tokenmesh import Client, TokenmeshRpcError, V1Client
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb


def _texts(messages: list[pb.GenerateResponse]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for message in messages:
        texts[message.choice_index] = texts.get(message.choice_index, "") + message.text
    return texts


async def test_chat_with_n_choices_and_logprobs_streams_through_the_edge(mesh, admin_key):
    async with Client(mesh.edge_address, token=admin_key) as client:
        messages = [
            message
            async for message in client.generate(
                "demo-lm",
                messages=[("system", "Answer briefly."), ("user", "Who made the heavens?")],
                n=2,
                sampling={"seed": 11},
                max_output_tokens=6,
                logprobs=True,
                top_logprobs=3,
            )
        ]
    finals = [m for m in messages if m.HasField("finish_reason")]
    assert sorted(f.choice_index for f in finals) == [0, 1]
    assert all(0 <= f.confidence <= 1 for f in finals)
    tokens = [lp for m in messages for lp in m.logprobs]
    assert tokens and all(lp.logprob <= 0 and len(lp.top_logprobs) == 3 for lp in tokens)
    texts = _texts(messages)
    assert len(texts) == 2 and all(texts.values())


async def test_complete_is_reproducible_and_embed_returns_vectors(mesh, admin_key):
    async with Client(mesh.edge_address, token=admin_key) as client:
        first = await client.complete(
            "demo-lm", "In the beginning", sampling={"seed": 5}, max_output_tokens=8
        )
        again = await client.complete(
            "demo-lm", "In the beginning", sampling={"seed": 5}, max_output_tokens=8
        )
        embedded = await client.embed(
            "all-minilm-l6-v2", ["light", "darkness"], encoding=resources.EMBEDDING_ENCODING_FLOAT
        )
        models = await client.list_models()
    assert first.choices[0].text == again.choices[0].text != ""
    assert first.usage.completion_tokens == len(first.choices[0].token_ids)
    assert len(embedded.embeddings) == 2
    assert np.linalg.norm(np.asarray(embedded.embeddings[0].values)) == pytest.approx(1, abs=1e-3)
    assert {"demo-lm", "all-minilm-l6-v2"} <= {m.name for m in models.models}


async def test_errors_are_raised_with_their_details_decoded(mesh, admin_key):
    async with Client(mesh.edge_address, token=admin_key) as client:
        with pytest.raises(TokenmeshRpcError) as bad:
            await client.complete("demo-lm", "hi", n=99)
        with pytest.raises(TokenmeshRpcError) as missing:
            await client.complete("no-such-model", "hi")
        with pytest.raises(ValueError, match="exactly one"):
            await client.complete("demo-lm")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in bad.value.field_violations] == ["n"]
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    async with Client(mesh.edge_address, token="not-a-key") as stranger:
        with pytest.raises(TokenmeshRpcError) as unauthenticated:
            await stranger.list_models()
    assert unauthenticated.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_tls_edge_and_the_v1_client(mesh, admin_key):
    tls_target = mesh.edge_tls_url.removeprefix("https://")
    async with Client(
        tls_target, token=admin_key, root_certificates=mesh.ca_path.read_bytes()
    ) as client:
        response = await client.complete(
            "demo-lm", "abc", sampling={"temperature": 0}, max_output_tokens=3
        )
    assert response.choices[0].finish_reason == resources.FINISH_REASON_LENGTH
    async with V1Client(mesh.edge_address, token=admin_key) as v1:
        old = await v1.complete("demo-lm", "abc", temperature=0, max_tokens=3)
    assert old.text == response.choices[0].text


async def test_code_written_for_the_v1_client_runs_unchanged(mesh, admin_key):
    async with Client(mesh.edge_address, token=admin_key) as client:
        streamed = "".join(
            [
                m.text
                async for m in client.generate("demo-lm", "In the beginning", max_tokens=8, seed=1)
            ]
        )
        whole = await client.complete("demo-lm", "In the beginning", max_tokens=8, seed=1)
        with pytest.raises(TokenmeshRpcError) as bad:
            await client.complete("demo-lm", "hi", max_tokens=0)
    assert streamed == whole.choices[0].text != ""
    assert whole.usage.completion_tokens == 8
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.field_violations
