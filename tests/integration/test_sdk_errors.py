"""The Python SDK's TokenmeshRpcError against a real worker's refusals.

It kept only ErrorInfo.reason, BadRequest and RetryInfo: the QuotaFailure of a
RESOURCE_EXHAUSTED (which quota: a key's budget or the worker's queue), the
ResourceInfo of a missing template, ErrorInfo's domain and metadata and the
status itself were dropped, and the exception could not be pickled. Also
here: a str where the API takes a list is one item, as in OpenAI's SDK.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

import tokenmesh.client as sdk
from services.core.errors import ERROR_DOMAIN
from services.core.server import serving
from services.inference.service import InferenceService
from services.inference.v2.prompting import TEMPLATE_RESOURCE_TYPE
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v2 import inference_pb2 as resources

SECRET = "tm-secret-key-do-not-show"


@contextlib.asynccontextmanager
async def _worker(tmp_path: Path, redis_url: str, **overrides: Any) -> AsyncIterator[str]:
    """A plaintext worker (every caller taken for the edge, as the SDK reaches one in
    development); yields its target."""
    settings = inference_settings(
        tmp_path, redis_url, pki_dir=None, insecure_peer_identity="edge", **overrides
    )
    async with serving(InferenceService(settings), settings) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture
async def worker(tmp_path: Path, redis_url: str) -> AsyncIterator[str]:
    async with _worker(tmp_path, redis_url) as target:
        yield target


@pytest.fixture
async def one_slot_worker(tmp_path: Path, redis_url: str) -> AsyncIterator[str]:
    """One running sequence and no queue behind it: a second request is refused QUEUE_FULL."""
    async with _worker(
        tmp_path, redis_url, test_engine_step_ms=20.0, max_sequences=1, max_queue=0
    ) as target:
        yield target


@pytest.fixture
async def embedding_worker(tmp_path: Path, redis_url: str) -> AsyncIterator[str]:
    """Serving the real all-minilm-l6-v2."""
    async with _worker(
        tmp_path, redis_url, models=("all-minilm-l6-v2:1",), test_models=()
    ) as target:
        yield target


def _assert_pickles(error: sdk.TokenmeshRpcError) -> None:
    """It crosses a process pool or a task queue whole, and without the credentials."""
    pickled = pickle.dumps(error)
    assert SECRET.encode() not in pickled
    copy = pickle.loads(pickled)
    assert type(copy) is type(error) and str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


async def test_a_full_queue_names_its_quota_and_survives_pickling(one_slot_worker: str) -> None:
    async with sdk.Client(one_slot_worker, token=SECRET, timeout_s=60) as client:
        running = client.generate("deterministic-test", "long", max_output_tokens=400)
        try:
            await anext(running)  # it holds the only slot now
            with pytest.raises(sdk.TokenmeshRpcError) as refused:
                await client.complete("deterministic-test", "hi", max_output_tokens=2)
        finally:
            await running.aclose()
    error = refused.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.reason, error.domain) == ("QUEUE_FULL", ERROR_DOMAIN)
    assert error.quota_violations == [("worker:queue", "max_queue=0")]
    assert error.retry_after_s == 1.0
    assert (
        error.status is not None
        and error.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    )
    assert error.status.message == error.message
    assert {type(d) for d in error.details} == {
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.QuotaFailure,
    }
    assert str(error) == f"RESOURCE_EXHAUSTED: {error.message}"
    assert SECRET not in str(error) and SECRET not in repr(error)
    _assert_pickles(error)


async def test_a_missing_template_names_the_resource(worker: str) -> None:
    async with sdk.Client(worker, token=SECRET) as client:
        with pytest.raises(sdk.TokenmeshRpcError) as missing:
            await client.complete("deterministic-test", "hi", template="no-such-template")
    error = missing.value
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (error.resource_type, error.resource_name) == (
        TEMPLATE_RESOURCE_TYPE,
        "no-such-template",
    )
    assert error.reason == "PROMPT_TEMPLATE_NOT_FOUND"
    _assert_pickles(error)


async def test_an_unknown_version_keeps_the_error_metadata(worker: str) -> None:
    async with sdk.Client(worker) as client:
        with pytest.raises(sdk.TokenmeshRpcError) as missing:
            await client.complete("deterministic-test", "hi", version="9")
    error = missing.value
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_VERSION_NOT_FOUND"
    assert error.metadata == {"model": "deterministic-test", "version": "9"}
    assert error.resource_type == "" and error.quota_violations == []
    _assert_pickles(error)


async def test_a_str_stop_is_one_stop_sequence(worker: str) -> None:
    """Protobuf extends a repeated field from a str one character at a time:
    `stop="END"` stopped at the first E, N or D (OpenAI's SDK takes a str as one)."""
    async with sdk.Client(worker) as client:
        whole = await client.complete(
            "deterministic-test", "long", sampling={"seed": 3}, max_output_tokens=40
        )
        text = whole.choices[0].text
        # A stop whose first character appeared earlier: split, it ended there.
        start = next(
            i
            for i in range(1, len(text) - 3)
            if text[i] in text[:i] and text.find(text[i : i + 3]) == i
        )
        stop = text[start : start + 3]
        v2 = await client.complete(
            "deterministic-test",
            "long",
            sampling={"seed": 3},
            max_output_tokens=40,
            stop_sequences=stop,
        )
        v1_keyword = await client.complete(
            "deterministic-test", "long", seed=3, max_tokens=40, stop=stop
        )
    for response in (v2, v1_keyword):
        assert response.choices[0].finish_reason == resources.FINISH_REASON_STOP
        assert response.choices[0].text == text[:start]
    async with sdk.V1Client(worker) as v1:
        old = await v1.complete("deterministic-test", "long", seed=3, max_tokens=40, stop=stop)
    assert old.finish_reason == "stop" and old.text == text[:start]


async def test_embed_takes_a_str_as_one_input(embedding_worker: str) -> None:
    """`embed(model, "kitten")` billed six embeddings, one per character."""
    async with sdk.Client(embedding_worker) as client:
        one = await client.embed("all-minilm-l6-v2", "kitten")
        listed = await client.embed("all-minilm-l6-v2", ["kitten"])
    assert len(one.embeddings) == 1
    assert one.usage.prompt_tokens == listed.usage.prompt_tokens
    assert list(one.embeddings[0].values) == list(listed.embeddings[0].values)
