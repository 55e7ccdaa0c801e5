"""Unloading a version refuses the requests still waiting for a slot, on a real worker.

One slot, 20 ms steps: a stream runs, a second request waits for the slot, and
the version is unloaded. The waiting request waited until the running one
freed the slot, then ran until the unload's grace deadline killed it: billed
what it computed, answered 503 `model_unloaded` after its headers, so neither
the edge nor the SDK tried it again. It never started: it is refused as a
request arriving during the unload is (UNAVAILABLE, MODEL_UNLOADING), at once,
trailers-only where its answer's headers were still held (the OpenAI routes),
billed nothing and its budget reservation given back. The running stream
finishes as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from google.api.httpbody_pb2 import HttpBody

from gateway import admin as envoy_admin
from gateway import envoy_config, openai_backend, protos
from gateway.envoy_config import Endpoint
from services.core import contract
from services.core.server import serving
from services.inference.budget import TokenBudgets
from services.inference.scheduler import Scheduler
from services.inference.service import InferenceService, InferenceSettings
from services.launcher.mesh import envoy_binary
from services.launcher.processes import Child, clean_env, reserve_port, wait_for
from services.router import snapshot
from tests import mtls
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_hung_engine import HeldCalls, _shipped_events
from tests.integration.test_inference_model_lifecycle import _reason, _until
from tests.integration.test_openai_usage_billing import _month_used
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

LM = "deterministic-test"
RUNNING_TOKENS = 60  # 1.2 s of 20 ms steps: the unload's refusal comes well before
QUEUED_TOKENS = 20
GRACE_S = 30.0  # the unload's drain: the running stream finishes well within it
LONG = [{"role": "user", "content": "long"}]
RPM_HEADER = "x-tokenmesh-rpm"


def _identity(key: str) -> tuple[tuple[str, str], ...]:
    """A caller with a monthly budget and a request-rate limit (RPM: both counted)."""
    return (
        (contract.KEY_ID_HEADER, key),
        (contract.MONTHLY_TOKENS_HEADER, "100000"),
        (RPM_HEADER, "3"),
    )


def _window(key: str) -> str:
    return f"tm:ratelimit:rpm:{key}"


def _key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


def _chat(stream: bool) -> HttpBody:
    body = {"model": f"{LM}@1", "messages": LONG, "max_tokens": QUEUED_TOKENS, "stream": stream}
    return HttpBody(content_type="application/json", data=json.dumps(body).encode())


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
    settings = inference_settings(
        tmp_path, redis_url, max_sequences=1, test_engine_step_ms=20.0, grace_s=GRACE_S
    )
    async with await start_inference(settings) as (service, channel):
        assert isinstance(service, InferenceService)
        yield service, channel


async def _waiting(service: InferenceService, count: int) -> None:
    """Waits until `count` requests wait for version 1's slot."""
    scheduler = service.registry.resolve(LM, "1").scheduler
    assert scheduler is not None

    async def queued() -> bool:
        return scheduler.stats()["waiting"] == count

    await _until(queued)


async def _started_stream(
    channel: grpc.aio.Channel, key: str, max_tokens: int = RUNNING_TOKENS
) -> Any:
    """Starts a long v1 stream on version 1 and returns it once its first token came."""
    stream = v1_rpc.InferenceServiceStub(channel).Generate(
        v1.GenerateRequest(model=LM, version="1", prompt="long", max_tokens=max_tokens),
        metadata=_identity(key),
    )
    first = await stream.read()
    assert isinstance(first, v1.GenerateResponse) and first.token_ids
    return stream


async def _rest(stream: Any) -> tuple[int, str]:
    """Reads a v1 stream to its end: the tokens read and its finish reason."""
    tokens, reason = 0, ""
    while (message := await stream.read()) is not grpc.aio.EOF:
        tokens += len(message.token_ids)
        reason = message.finish_reason or reason
    return tokens, reason


def _unload(channel: grpc.aio.Channel) -> asyncio.Future[Any]:
    admin = v1_rpc.InferenceAdminServiceStub(channel)
    return asyncio.ensure_future(
        admin.UnloadModel(
            v1.UnloadModelRequest(model=LM, version="1"), metadata=mtls.EDGE_FOR_ADMIN
        )
    )


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    return refused.value


async def _assert_billed(
    redis_url: str, service: InferenceService, channel: grpc.aio.Channel, ran: str, queued: str
) -> None:
    """The running request is billed its whole answer; the queued one nothing at all."""
    stream = service.settings.usage_stream
    events = await _shipped_events(redis_url, stream, ran, channel)
    assert [(e.finish_reason, e.usage.completion_tokens) for e in events] == [
        ("length", RUNNING_TOKENS)
    ]
    assert await _shipped_events(redis_url, stream, queued, channel) == []
    client = aioredis.from_url(redis_url)
    try:
        assert await _month_used(TokenBudgets(client), queued, 0) == 0  # reservation back
    finally:
        await client.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_openai_call_waiting_for_a_slot_is_refused_retryably_and_billed_nothing(
    worker: tuple[InferenceService, grpc.aio.Channel], redis_url: str, stream: bool
) -> None:
    service, channel = worker
    ran, queued = _key(), _key()
    running = await _started_stream(channel, ran)
    call = openai_rpc.OpenAIServiceStub(channel).CreateChatCompletion(
        _chat(stream), metadata=_identity(queued)
    )
    await _waiting(service, 1)
    unloading = _unload(channel)
    refused = await _refusal(call)
    # At once: the running stream still has most of its tokens to come.
    assert not unloading.done()
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert not list(refused.initial_metadata() or ())  # trailers-only: the edge retries it
    trailing = dict(refused.trailing_metadata() or ())
    error = json.loads(trailing[contract.OPENAI_ERROR_HEADER])["error"]
    assert error["code"] == "model_unloading"
    assert ("retry-after", "1") in tuple(refused.trailing_metadata() or ())
    assert await _rest(running) == (RUNNING_TOKENS - 1, "length")  # finished, not cut
    await unloading
    await _assert_billed(redis_url, service, channel, ran, queued)
    client = aioredis.from_url(redis_url)
    try:  # its request count given back, as for any try the edge tries again elsewhere
        assert await client.zcard(_window(queued)) == 0
        assert await client.zcard(_window(ran)) == 1
    finally:
        await client.delete(_window(queued), _window(ran))
        await client.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_v1_call_waiting_for_a_slot_is_refused_and_billed_nothing(
    worker: tuple[InferenceService, grpc.aio.Channel], redis_url: str, stream: bool
) -> None:
    # v1 and v2 calls send their headers when scheduled (a unary call's are held until
    # it ends, then sent before its error): the refusal follows them (UNAVAILABLE, which
    # a gRPC client may retry), and still bills nothing.
    service, channel = worker
    ran, queued = _key(), _key()
    running = await _started_stream(channel, ran)
    stub = v1_rpc.InferenceServiceStub(channel)
    call: Any
    if stream:
        call = stub.Generate(
            v1.GenerateRequest(model=LM, version="1", prompt="long", max_tokens=QUEUED_TOKENS),
            metadata=_identity(queued),
        )
    else:
        call = _as_stream(
            stub.Complete(
                v1.CompleteRequest(model=LM, version="1", prompt="long", max_tokens=QUEUED_TOKENS),
                metadata=_identity(queued),
            )
        )
    await _waiting(service, 1)
    unloading = _unload(channel)
    refused = await _refusal(call)
    assert not unloading.done()
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(refused) == "MODEL_UNLOADING"
    assert await _rest(running) == (RUNNING_TOKENS - 1, "length")
    await unloading
    await _assert_billed(redis_url, service, channel, ran, queued)
    client = aioredis.from_url(redis_url)
    await client.delete(_window(queued), _window(ran))
    await client.aclose()


async def _as_stream(call: Any) -> AsyncIterator[Any]:
    yield await call


def _two_slots(tmp_path: Path, redis_url: str) -> InferenceSettings:
    """A worker whose versions have two slots each (20 ms steps)."""
    return inference_settings(
        tmp_path, redis_url, max_sequences=2, test_engine_step_ms=20.0, grace_s=GRACE_S
    )


def _scheduler(service: InferenceService) -> Scheduler:
    scheduler = service.registry.resolve(LM, "1").scheduler
    assert scheduler is not None
    return scheduler


async def test_a_request_one_of_whose_choices_had_started_is_refused_whole_billed_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """n=2 with one slot free: one choice runs, the other waits, and the unload refuses
    it. The request fails with the refusal (trailers-only where its headers were held:
    the edge tries it all again elsewhere, its count given back), yet it was billed
    its prompt and the started choice's tokens here. Billed nothing now, as a legacy
    completion's prompt refused beside one that ran is; recorded apart (what ran)."""
    async with await start_inference(_two_slots(tmp_path, redis_url)) as (service, channel):
        ran, queued = _key(), _key()
        running = await _started_stream(channel, ran)  # one slot of two
        body = {"model": f"{LM}@1", "messages": LONG, "max_tokens": RUNNING_TOKENS, "n": 2}
        call = openai_rpc.OpenAIServiceStub(channel).CreateChatCompletion(
            HttpBody(content_type="application/json", data=json.dumps(body).encode()),
            metadata=_identity(queued),
        )
        scheduler = _scheduler(service)

        async def one_runs_one_waits() -> bool:
            stats = scheduler.stats()
            return stats["running"] == 2 and stats["waiting"] == 1

        await _until(one_runs_one_waits)
        unloading = _unload(channel)
        refused = await _refusal(call)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert not list(refused.initial_metadata() or ())  # the edge tries it again
        trailing = dict(refused.trailing_metadata() or ())
        error = json.loads(trailing[contract.OPENAI_ERROR_HEADER])["error"]
        assert error["code"] == "model_unloading"
        running.cancel()
        await unloading
        events = await _shipped_events(redis_url, service.settings.usage_stream, queued, channel)
        assert events and all(e.usage.total_tokens == 0 for e in events), events
        assert all(contract.UNFINISHED_ATTEMPT_MARK in e.event_id for e in events)
        assert sum(e.served_usage.prompt_tokens for e in events) > 0  # audited: it ran
        client = aioredis.from_url(redis_url)
        try:
            assert await _month_used(TokenBudgets(client), queued, 0) == 0
            assert await client.zcard(_window(queued)) == 0
        finally:
            await client.delete(_window(queued), _window(ran))
            await client.aclose()


async def test_no_waiting_request_starts_once_the_unload_began(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine thread read whether the version was unloading once per round, before
    it admitted the waiting requests: an unload beginning in between started them
    (to run until the drain's end, billed, not tried again). Held here in that gap
    (the slot compaction's engine call, between the read and the admission)."""
    async with await start_inference(_two_slots(tmp_path, redis_url)) as (service, channel):
        scheduler = _scheduler(service)
        stub = v1_rpc.InferenceServiceStub(channel)
        first = await _started_stream(channel, _key(), max_tokens=400)  # slot 0
        second = await _started_stream(channel, _key(), max_tokens=400)  # slot 1
        queued = _key()
        call = stub.Complete(
            v1.CompleteRequest(model=LM, version="1", prompt="long", max_tokens=QUEUED_TOKENS),
            metadata=_identity(queued),
        )
        await _waiting(service, 1)
        gate = HeldCalls()
        engine = scheduler.engine
        monkeypatch.setattr(engine, "move_slot", gate.wrap(engine.move_slot))
        try:
            first.cancel()  # slot 0 frees: the next round moves slot 1 there, held
            await _until(gate.held)
            unloading = _unload(channel)

            async def unload_began() -> bool:
                return not scheduler.accepting

            await _until(unload_began)
        finally:
            gate.release.set()
        refused = await _refusal(_as_stream(call))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(refused) == "MODEL_UNLOADING"
        second.cancel()
        await unloading
        events = await _shipped_events(redis_url, service.settings.usage_stream, queued, channel)
        assert events == []


# ------------------------------------------------------------------ through the edge


@contextlib.contextmanager
def _retrying_backend(state: Path, worker_ports: Sequence[int]) -> Iterator[tuple[str, Path]]:
    """The bare OpenAI backend in front of the workers, its route retrying as the
    per-model routes do (another worker, before any response header): its URL and its
    admin socket."""
    sds = state / "sds"
    sds.mkdir(parents=True)
    for name, content in envoy_config.sds_files(mtls.pki_dir(), contract.EDGE, None).items():
        (sds / name).write_text(yaml.safe_dump(content, sort_keys=False))
    descriptor = protos.build_descriptor_set(state / "tokenmesh.pb")
    port, admin = reserve_port(), state / "admin.sock"
    workers = [Endpoint("127.0.0.1", worker) for worker in worker_ports]
    bootstrap = openai_backend.bootstrap(
        Endpoint("127.0.0.1", port), admin, descriptor, workers, sds
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


@contextlib.asynccontextmanager
async def _two_workers(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[list[tuple[InferenceService, grpc.aio.Channel, int]]]:
    """Two workers sharing Redis and one usage stream, one slot each."""
    async with contextlib.AsyncExitStack() as stack:
        workers = []
        for name in ("w0", "w1"):
            settings = inference_settings(
                tmp_path,
                redis_url,
                max_sequences=1,
                test_engine_step_ms=20.0,
                grace_s=GRACE_S,
                worker_id=name,
                usage_spool_dir=tmp_path / name / "spool",
                lease_token_dir=tmp_path / name / "lease-tokens",
            )
            service = InferenceService(settings)
            server = await stack.enter_async_context(serving(service, settings))
            channel = await stack.enter_async_context(mtls.aio_channel(server.port, peer="worker"))
            workers.append((service, channel, server.port))
        yield workers


async def test_the_edge_tries_a_refused_waiting_request_again_on_another_worker(
    tmp_path: Path, redis_url: str
) -> None:
    # Both workers' slots are busy; the request waits on one of them, whose version is
    # unloaded: refused trailers-only, the edge's retry waits on the other one and is
    # answered there, billed once. It used to be answered by the unloading worker,
    # after it waited there for the slot (or, with a shorter grace, killed: a 503).
    async with _two_workers(tmp_path, redis_url) as workers:
        runners = [await _started_stream(channel, _key()) for _, channel, _ in workers]
        key = _key()
        with contextlib.ExitStack() as stack:
            base, admin = await asyncio.to_thread(
                stack.enter_context,
                _retrying_backend(tmp_path / "envoy", [port for _, _, port in workers]),
            )
            async with httpx.AsyncClient(timeout=60) as http:
                reply = asyncio.ensure_future(
                    http.post(
                        f"{base}/openai/v1/chat/completions",
                        json={"model": f"{LM}@1", "messages": LONG, "max_tokens": QUEUED_TOKENS},
                        headers=dict(_identity(key)),
                    )
                )

                async def queued_somewhere() -> bool:
                    return any(_queue(service) == 1 for service, _, _ in workers)

                await _until(queued_somewhere)
                first = next(n for n, (service, _, _) in enumerate(workers) if _queue(service))
                other = workers[1 - first][0]
                await _unload(workers[first][1])
                answer = await reply
                stats = envoy_admin.text(admin, "/stats?filter=upstream_rq_retry$") or ""
        for runner in runners:
            runner.cancel()
        events = await _shipped_events(
            redis_url, other.settings.usage_stream, key, workers[1 - first][1]
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == QUEUED_TOKENS
    assert answer.headers["x-tokenmesh-worker"] == other.settings.worker_id
    assert "cluster.inference.upstream_rq_retry: 1" in stats
    assert [(e.finish_reason, e.usage.completion_tokens) for e in events] == [
        ("length", QUEUED_TOKENS)
    ]


def _queue(service: InferenceService) -> int:
    """Returns how many requests wait for version 1's slot on `service` (0: unloaded)."""
    if not service.registry.has(LM, "1"):
        return 0
    scheduler = service.registry.resolve(LM, "1").scheduler
    assert scheduler is not None
    return scheduler.stats()["waiting"]


async def test_a_request_arriving_as_the_unload_updates_health_is_refused(
    worker: tuple[InferenceService, grpc.aio.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unload awaited the version's health update before it stopped admission: a
    request reaching the scheduler meanwhile (named version, stale endpoints) started,
    and could run to MODEL_UNLOADED after its headers, not tried again. Refused
    MODEL_UNLOADING now, from the unload's first step."""
    service, channel = worker
    held, release = asyncio.Event(), asyncio.Event()
    real_set = InferenceService._set_version_health

    async def slow_health(self: InferenceService, model: Any, serving: bool) -> None:
        if not serving:
            held.set()
            await release.wait()
        await real_set(self, model, serving)

    monkeypatch.setattr(InferenceService, "_set_version_health", slow_health)
    unloading = _unload(channel)
    try:
        async with asyncio.timeout(10):
            await held.wait()
        call = v1_rpc.InferenceServiceStub(channel).Complete(
            v1.CompleteRequest(model=LM, version="1", prompt="late", max_tokens=2),
            metadata=_identity(_key()),
        )
        refused = await _refusal(_as_stream(call))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(refused) == "MODEL_UNLOADING"
    finally:
        release.set()
        await unloading
