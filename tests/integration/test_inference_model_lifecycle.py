"""A real worker over mTLS: empty prompts, health of each version, loading and unloading.

Real servers, real models from models/, real health checks; the failing
health condition comes from a task under the worker's own supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.core.server import serving
from services.core.tasks import RestartPolicy
from services.inference.service import InferenceService
from tests import mtls
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2 as v2_resources
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
V1 = "tokenmesh.inference.v1.InferenceService"
V2 = "tokenmesh.inference.v2.InferenceService"
# A failing task turns the gate NOT_SERVING after 3 failures (~0.15 s), SERVING
# again once a run lasts 0.3 s; production uses the defaults.
FAST = RestartPolicy(
    first_backoff_s=0.05, max_backoff_s=0.2, unhealthy_after=3, healthy_after_s=0.3
)


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Waits until `condition()` holds, polling (bounded in time)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.02)


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def _fields(error: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update(v.field for v in bad.field_violations)
    return found


def _engine_threads(name: str, version: str) -> int:
    """Returns the engine threads alive for one version (one per loaded engine)."""
    return sum(t.name == f"engine-{name}-{version}" for t in threading.enumerate())


# ------------------------------------------------------------------ empty prompts


async def test_a_prompt_of_no_tokens_is_invalid_and_spoils_no_other_request(
    tmp_path: Path, redis_url: str
) -> None:
    # "   " is no token for the word tokenizer: the engine had no last token to
    # compute from, and the IndexError ended every prompt of that prefill step.
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=20.0)
    async with await start_inference(settings) as (_, channel):
        stub = v2_rpc.InferenceServiceStub(channel)
        valid = asyncio.ensure_future(
            stub.Complete(
                v2.CompleteRequest(model="deterministic-test", prompt="hello", max_output_tokens=4)
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.Complete(v2.CompleteRequest(model="deterministic-test", prompt="   "))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _fields(empty.value) == {"prompt"} and _reason(empty.value) == "EMPTY_PROMPT"
        assert (await valid).usage.completion_tokens == 4
        with pytest.raises(grpc.aio.AioRpcError) as streamed:  # v1, streaming
            async for _ in v1_rpc.InferenceServiceStub(channel).Generate(
                v1.GenerateRequest(model="deterministic-test", prompt=" \n ")
            ):
                pytest.fail("no message expected")
        assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ health per version


def _health_of(health: Any, *names: str) -> Callable[[int], Callable[[], Awaitable[bool]]]:
    def status_is(status: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            for name in names:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                if reply.status != status:
                    return False
            return True

        return check

    return status_is


async def test_a_failing_health_condition_takes_every_version_out_and_back(
    tmp_path: Path, redis_url: str
) -> None:
    # The edge health-checks each version's own name; the gate changed only ""
    # and the service names, so a NOT_SERVING worker kept its traffic. And a
    # version loaded while the gate failed turned SERVING.
    settings = inference_settings(tmp_path, redis_url)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        service.tasks.policy = FAST
        health = health_pb2_grpc.HealthStub(channel)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        test_versions = [
            f"{api}/deterministic-test/{version}" for api in (V1, V2) for version in ("1", "2")
        ]
        worker = _health_of(health, "", V1, V2, *test_versions)
        loaded_later = _health_of(health, f"{V1}/demo-lm/2", f"{V2}/demo-lm/2")
        assert await worker(SERVING)()
        repaired = asyncio.Event()

        async def broken_dependency() -> None:  # fails until repaired, then runs
            if not repaired.is_set():
                raise ConnectionError("dependency down")
            await asyncio.Event().wait()

        task = service.tasks.spawn("test-dependency", broken_dependency)
        try:
            await _until(worker(NOT_SERVING))
            assert service.health.failing() == {"task test-dependency"}
            await admin.LoadModel(
                v1.LoadModelRequest(model="demo-lm", version="2"), metadata=mtls.EDGE_FOR_ADMIN
            )
            assert await loaded_later(NOT_SERVING)()  # loaded, but the worker is failing
            repaired.set()
            await _until(worker(SERVING))
            await _until(loaded_later(SERVING))
        finally:
            await task.stop()


async def test_versions_turn_serving_only_once_the_worker_has_started(
    tmp_path: Path, own_redis: str
) -> None:
    # A worker refuses every request until it has read the content policies once,
    # and says SERVING only then; its versions' own names (what the edge checks)
    # turned SERVING as each loaded, before that. An edge that still had the
    # address (a worker restarted within its lease) sent it requests it refused.
    settings = inference_settings(tmp_path, own_redis)
    service = InferenceService(settings)
    stalled = aioredis.from_url(own_redis)
    await stalled.execute_command("CLIENT", "PAUSE", "2500", "ALL")  # policies wait
    try:
        async with contextlib.AsyncExitStack() as stack:
            starting = asyncio.ensure_future(stack.enter_async_context(serving(service, settings)))
            await _until(lambda: _loaded(service, "deterministic-test", "1"))
            assert service._running is not None and not starting.done()
            channel = await stack.enter_async_context(
                mtls.aio_channel(service._running.port, peer="worker")
            )
            health = health_pb2_grpc.HealthStub(channel)
            versions = _health_of(
                health, f"{V1}/deterministic-test/1", f"{V2}/deterministic-test/1"
            )
            assert await versions(NOT_SERVING)()  # loaded, but the worker has not started
            await starting
            await _until(versions(SERVING))
    finally:
        await stalled.aclose()


async def _loaded(service: InferenceService, name: str, version: str) -> bool:
    return service.registry.has(name, version) and service.registry.resolve(name, version).ready


# ------------------------------------------------------------------ load and unload


async def test_loading_a_loaded_version_again_keeps_its_one_engine(
    tmp_path: Path, redis_url: str
) -> None:
    settings = inference_settings(tmp_path, redis_url)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        load = v1.LoadModelRequest(model="demo-lm", version="2")
        unload = v1.UnloadModelRequest(model="demo-lm", version="2")
        await asyncio.gather(*(admin.LoadModel(load, metadata=mtls.EDGE_FOR_ADMIN) for _ in (1, 2)))
        again = await admin.LoadModel(load, metadata=mtls.EDGE_FOR_ADMIN)  # succeeds, as Triton's
        assert [v.version for v in again.model.versions] == ["2"]
        assert _engine_threads("demo-lm", "2") == 1
        loaded = service.registry.resolve("demo-lm", "2")
        # An unload racing a load: whichever runs second sees the first's result,
        # and the registry holds exactly what an engine runs for.
        await asyncio.gather(
            admin.UnloadModel(unload, metadata=mtls.EDGE_FOR_ADMIN),
            admin.LoadModel(load, metadata=mtls.EDGE_FOR_ADMIN),
        )
        present = service.registry.has("demo-lm", "2")
        assert _engine_threads("demo-lm", "2") == (1 if present else 0)
        if present:
            assert service.registry.resolve("demo-lm", "2") is not loaded  # loaded anew
        stub = v1_rpc.InferenceServiceStub(channel)
        await admin.LoadModel(load, metadata=mtls.EDGE_FOR_ADMIN)
        reply = await stub.Complete(
            v1.CompleteRequest(model="demo-lm", version="2", prompt="x", max_tokens=2)
        )
        assert reply.model.version == "2" and _engine_threads("demo-lm", "2") == 1


async def test_unloading_an_embedding_version_drains_its_embeds(
    tmp_path: Path, redis_url: str
) -> None:
    # Unload closed the embedder at once: a multi-chunk embed in flight failed
    # INTERNAL, one queued behind it CANCELLED.
    settings = inference_settings(
        tmp_path,
        redis_url,
        models=("all-minilm-l6-v2:1",),
        test_models=(),
        grace_s=60.0,  # the drain timeout: the embeds below finish well within it
    )
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        stub = v1_rpc.InferenceServiceStub(channel)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        embedder = service.registry.resolve("all-minilm-l6-v2", "1").embedder
        assert embedder is not None and embedder.max_batch_size == 64

        def request(words: str) -> v1.EmbedRequest:  # three chunks of 64 inputs
            inputs = [f"{words} {i}" for i in range(3 * 64)]
            return v1.EmbedRequest(model="all-minilm-l6-v2", inputs=inputs)

        first = asyncio.ensure_future(stub.Embed(request("the first request")))
        queued = asyncio.ensure_future(stub.Embed(request("queued behind it")))

        async def both_in_flight() -> bool:
            return embedder.in_flight == 2

        await _until(both_in_flight)
        unloading = asyncio.ensure_future(
            admin.UnloadModel(
                v1.UnloadModelRequest(model="all-minilm-l6-v2", version="1"),
                metadata=mtls.EDGE_FOR_ADMIN,
            )
        )
        health = health_pb2_grpc.HealthStub(channel)
        await _until(_health_of(health, f"{V1}/all-minilm-l6-v2/1")(NOT_SERVING))
        # While it drains, a new embed is refused retryably (Envoy retries elsewhere).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Embed(v1.EmbedRequest(model="all-minilm-l6-v2", inputs=["late"]))
        assert not queued.done() and not unloading.done()  # it was refused mid-drain
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(refused.value) == "MODEL_UNLOADING"
        for call in (first, queued):
            reply = await asyncio.wait_for(call, 60)
            assert len(reply.embeddings) == 3 * 64
        await asyncio.wait_for(unloading, 60)
        assert not service.registry.has("all-minilm-l6-v2", "1")
        assert embedder.in_flight == 0


async def test_an_unload_whose_caller_left_still_finishes_and_the_version_loads_again(
    tmp_path: Path, redis_url: str
) -> None:
    # UnloadModel past its deadline while the version drained: cut short, the version
    # stayed registered but unready (refusing every request, out of health), and the
    # idempotent LoadModel then took it for loaded.
    settings = inference_settings(tmp_path, redis_url, grace_s=60.0)
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        admin = v1_rpc.InferenceAdminServiceStub(channel)
        stub = v1_rpc.InferenceServiceStub(channel)
        load = v1.LoadModelRequest(model="demo-lm", version="2")
        await admin.LoadModel(load, metadata=mtls.EDGE_FOR_ADMIN)
        stream = stub.Generate(
            v1.GenerateRequest(model="demo-lm", version="2", prompt="a", max_tokens=400)
        )
        await stream.read()  # running: the unload waits for it
        with pytest.raises(grpc.aio.AioRpcError) as left:
            await admin.UnloadModel(
                v1.UnloadModelRequest(model="demo-lm", version="2"),
                metadata=mtls.EDGE_FOR_ADMIN,
                timeout=0.05,
            )
        assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # While it drains, a lookup says so (it said LOADING).
        looked_up = await v2_rpc.InferenceServiceStub(channel).GetModel(
            v2.GetModelRequest(model="demo-lm")
        )
        states = {v.version: v.state for v in looked_up.model.versions}
        assert states["2"] == v2_resources.MODEL_VERSION_STATE_UNLOADING

        async def unloaded() -> bool:
            return not service.registry.has("demo-lm", "2")

        await _until(unloaded)  # the drain finished without its caller
        await admin.LoadModel(load, metadata=mtls.EDGE_FOR_ADMIN)
        reply = await stub.Complete(
            v1.CompleteRequest(model="demo-lm", version="2", prompt="x", max_tokens=2)
        )
        assert reply.model.version == "2" and _engine_threads("demo-lm", "2") == 1
