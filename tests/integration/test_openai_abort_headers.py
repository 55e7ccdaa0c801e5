"""An OpenAI call that fails after its work started sends its headers before the error.

Without them the error was trailers-only: Envoy retries a trailers-only
UNAVAILABLE or CANCELLED (the per-model routes' retry_on), so a non-streamed
chat whose version was unloaded mid-generation ran, and was billed, again (on
one worker, the retry found no version and the client read a 404). A real
worker here, and a real Envoy (the bare OpenAI backend) with the per-model
routes' retry policy in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import httpx
import pytest
import yaml
from google.api.httpbody_pb2 import HttpBody

from gateway import admin as envoy_admin
from gateway import envoy_config, openai_backend, protos
from gateway.envoy_config import Endpoint
from services.core import contract
from services.core.errors import ResourceExhausted, Unavailable
from services.core.server import serving
from services.inference.openai.params import Renames
from services.inference.openai.servicer import _ResponseContext
from services.inference.pipeline.cache import COMPUTED_SEQUENCES
from services.inference.service import InferenceService
from services.launcher.mesh import envoy_binary
from services.launcher.processes import Child, clean_env, reserve_port, wait_for
from services.router import snapshot
from tests import mtls
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as rpc

LONG = [{"role": "user", "content": "long"}]


def _body(**fields: Any) -> HttpBody:
    return HttpBody(content_type="application/json", data=json.dumps(fields).encode())


async def _unload_once_started(worker: Worker, version: str, sequences: int) -> None:
    """Unloads deterministic-test@version once `sequences` of its sequences compute.

    Started, not only queued (COMPUTED_SEQUENCES counts them at submit): the unload
    refuses a queued one (MODEL_UNLOADING, trailers-only: retried, billed nothing),
    and the request had not started yet.
    """
    _, channel, service = worker
    scheduler = service.registry.resolve("deterministic-test", version).scheduler
    assert scheduler is not None
    async with asyncio.timeout(10):
        while scheduler.stats()["running"] < sequences:
            await asyncio.sleep(0.005)
    admin = v1_rpc.InferenceAdminServiceStub(channel)
    request = v1.UnloadModelRequest(model="deterministic-test", version=version)
    await admin.UnloadModel(request, metadata=mtls.EDGE_FOR_ADMIN)


def _computed() -> float:
    return float(COMPUTED_SEQUENCES.labels("deterministic-test")._value.get())


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


def _assert_headers_then_openai_error(error: grpc.aio.AioRpcError, code: str) -> None:
    initial = dict(error.initial_metadata() or ())
    assert initial["x-request-id"] and initial["x-model-version"]
    assert initial["x-should-retry"] == "false"  # the SDK would run, and bill, it again
    trailing = dict(error.trailing_metadata() or ())
    assert "x-request-id" not in trailing  # sent once, first
    assert json.loads(trailing[contract.OPENAI_ERROR_HEADER])["error"]["code"] == code


#: A worker's port, a channel to it and the worker.
Worker = tuple[int, grpc.aio.Channel, InferenceService]


@pytest.fixture
async def worker(tmp_path: Path, redis_url: str) -> AsyncIterator[Worker]:
    # Slow enough steps that an unload lands mid-generation.
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=20.0)
    service = InferenceService(settings)
    async with serving(service, settings) as server:
        async with mtls.aio_channel(server.port, peer="worker") as channel:
            yield server.port, channel, service


@pytest.mark.parametrize(
    ("method", "fields", "sequences"),
    [
        ("CreateChatCompletion", {"messages": LONG}, 1),
        ("CreateCompletion", {"prompt": "long"}, 1),
        ("CreateCompletion", {"prompt": ["long", "longer"]}, 2),  # several v2 calls
    ],
)
async def test_a_non_streamed_call_unloaded_mid_generation_sends_headers_first(
    worker, method, fields, sequences
):
    _, channel, _ = worker
    stub = rpc.OpenAIServiceStub(channel)
    call = getattr(stub, method)(_body(model="deterministic-test@1", max_tokens=400, **fields))
    unloading = asyncio.ensure_future(_unload_once_started(worker, "1", sequences))
    error = await _failure(call)
    await unloading
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    _assert_headers_then_openai_error(error, "model_unloaded")


async def test_a_stream_failing_before_its_first_token_sends_headers_first(
    tmp_path: Path, redis_url: str
):
    # Every prefill fails: the request was scheduled (v2 sent its headers), no token came.
    settings = inference_settings(tmp_path, redis_url, test_engine_error_rate=1.0)
    async with serving(InferenceService(settings), settings) as server:
        async with mtls.aio_channel(server.port, peer="worker") as channel:
            stub = rpc.OpenAIServiceStub(channel)
            for stream in (True, False):
                call = stub.CreateChatCompletion(
                    _body(model="deterministic-test", messages=LONG, max_tokens=4, stream=stream)
                )
                error = await _failure(call)
                assert error.code() is grpc.StatusCode.INTERNAL
                _assert_headers_then_openai_error(error, "internal")


async def test_an_error_before_any_work_stays_trailers_only(worker):
    # Nothing ran: Envoy may retry it elsewhere (the version is not here, say).
    _, channel, _ = worker
    call = rpc.OpenAIServiceStub(channel).CreateChatCompletion(
        _body(model="deterministic-test@9", messages=LONG)
    )
    error = await _failure(call)
    assert not list(error.initial_metadata() or ())
    assert contract.OPENAI_ERROR_HEADER in dict(error.trailing_metadata() or ())


@contextlib.contextmanager
def _retrying_backend(state: Path, worker_port: int) -> Any:
    """The bare OpenAI backend, its route retrying as the per-model routes do."""
    sds = state / "sds"
    sds.mkdir(parents=True)
    for name, content in envoy_config.sds_files(mtls.pki_dir(), contract.EDGE, None).items():
        (sds / name).write_text(yaml.safe_dump(content, sort_keys=False))
    descriptor = protos.build_descriptor_set(state / "tokenmesh.pb")
    port, admin = reserve_port(), state / "admin.sock"
    bootstrap = openai_backend.bootstrap(
        Endpoint("127.0.0.1", port), admin, descriptor, [Endpoint("127.0.0.1", worker_port)], sds
    )
    [route] = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    route["route"]["retry_policy"] = snapshot._streaming_action(cluster="x")["retry_policy"]
    config = state / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    argv = [str(envoy_binary()), "-c", str(config), "--concurrency", "1"]
    child = Child("envoy", [*argv, "--disable-hot-restart"], clean_env({}), state / "envoy.log")
    try:
        wait_for(lambda: envoy_admin.text(admin, "/ready") is not None, 60, "envoy", child)
        yield f"http://127.0.0.1:{port}", admin
    finally:
        child.terminate()
        child.wait(10)


async def test_the_edge_does_not_retry_it_and_the_client_reads_the_real_error(
    worker, tmp_path: Path
):
    port, _, _ = worker
    with contextlib.ExitStack() as stack:
        base, admin = await asyncio.to_thread(
            stack.enter_context, _retrying_backend(tmp_path / "envoy", port)
        )
        computed = _computed()
        unloading = asyncio.ensure_future(_unload_once_started(worker, "1", 2))
        async with httpx.AsyncClient(timeout=60) as http:
            reply = await http.post(
                f"{base}/openai/v1/chat/completions",
                json={"model": "deterministic-test@1", "messages": LONG, "max_tokens": 400, "n": 2},
            )
            await unloading
            stats = envoy_admin.text(admin, "/stats?filter=upstream_rq_retry$") or ""
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "model_unloaded"  # not the retry's 404
    assert reply.headers["x-request-id"]
    assert reply.headers["x-should-retry"] == "false"
    assert "cluster.inference.upstream_rq_retry: 0" in stats
    assert _computed() - computed == 2  # n, once


class _RecordingContext:
    """What _ResponseContext forwards to: the RPC's headers and its abort, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.sent.append(("headers", tuple(metadata)))

    async def abort(self, code: grpc.StatusCode, details: str, metadata: Any) -> None:
        self.sent.append(("abort", code))


@pytest.mark.parametrize("reason", ["QUEUE_FULL", "MODEL_UNLOADING"])
async def test_a_refusal_after_a_sibling_prompt_started_stays_retryable(reason: str):
    """A multi-prompt completion whose later prompt was refused after an earlier one
    had sent v2's headers bills nothing (pipeline.generate.complete_all), yet it was
    answered headers first with x-should-retry: false: neither Envoy nor the SDK
    tried it again elsewhere."""
    recorded = _RecordingContext()
    ctx = _ResponseContext(cast(Any, recorded))
    await ctx.send_initial_metadata([("x-request-id", "r"), ("x-model-version", "1")])
    refusal = (
        ResourceExhausted("worker queue is full", reason=reason)
        if reason == "QUEUE_FULL"
        else Unavailable("model version is unloading", reason=reason)
    )
    error, _ = ctx.fail(refusal, "CreateCompletion", Renames())
    await ctx.abort(error.code, error.message)
    assert recorded.sent == [("abort", error.code)]  # trailers-only, no no-retry header
