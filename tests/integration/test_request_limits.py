"""Request limits decided in two workers at once (services/inference/request_limits.py):
the same Redis windows, leases on, never more admitted than the limit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway import model_routing
from services.core.tasks import Supervisor
from services.launcher.mesh import spawn_redis
from services.usage.ratelimit import RequestLimiter
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc

LIMIT = 640  # leases of up to 10 slots (1/64 of the limit)
REQUESTS = 800
CLIENTS = 32  # concurrent callers, half on each worker


async def test_two_workers_never_admit_more_than_the_limit(redis_url):
    key = f"key_{uuid.uuid4().hex[:8]}"
    entries = (("key_id", key), ("rpm", str(LIMIT)))
    client = aioredis.from_url(redis_url)
    workers = [
        RequestLimiter(client, 1, redis_url=redis_url, lease_size=32, supervisor=Supervisor(n))
        for n in ("worker-a", "worker-b")
    ]
    leased_before = _leased()
    try:

        async def client_loop(worker: RequestLimiter) -> int:  # one caller, one at a time
            admitted = 0
            for _ in range(REQUESTS // CLIENTS):
                windows = await worker.decide(entries)
                assert windows is not None
                admitted += not any(w.over for w in windows)
            return admitted

        loops = (client_loop(workers[n % 2]) for n in range(CLIENTS))
        admitted = sum(await asyncio.gather(*loops))
        # Never more than the limit; fewer only by slots still leased to the other
        # worker (at most one lease each, granted while the window was half empty).
        assert LIMIT - 2 * (LIMIT // 64) <= admitted <= LIMIT
        assert _leased() > leased_before  # most decisions came from leases
    finally:
        for worker in workers:
            await worker.close()  # settles: unused leased slots leave the window
    window = f"tm:ratelimit:rpm:{key}"
    assert await client.zcard(window) == admitted
    await client.delete(window)
    await client.aclose()


def _leased() -> float:
    value = REGISTRY.get_sample_value("tokenmesh_ratelimit_decisions_total", {"path": "lease"})
    return value or 0.0


async def test_a_limiter_error_that_is_not_an_outage_fails_open_like_one(tmp_path, redis_url):
    """A window key of the wrong type makes the decision fail: logged and counted as an
    error (not an outage), and the failure mode applies; it failed every call INTERNAL."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    await client.set(f"tm:ratelimit:rpm:{key}", "not a window")
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-rpm", "1000")]
    request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1)
    errors = REGISTRY.get_sample_value("tokenmesh_ratelimit_errors_total", {"stage": "decide"})
    try:
        async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
            reply = await rpc.InferenceServiceStub(channel).Complete(request, metadata=identity)
        assert reply.usage.completion_tokens == 1
        after = REGISTRY.get_sample_value("tokenmesh_ratelimit_errors_total", {"stage": "decide"})
        assert (after or 0) > (errors or 0)
    finally:
        await client.delete(f"tm:ratelimit:rpm:{key}")
        await client.aclose()


async def test_an_error_answer_carries_the_limits_headers_too(tmp_path, redis_url):
    """Envoy's rate-limit filter puts the draft-03 headers on every answer; a worker's
    limited call that failed in its handler (an unknown model, a spent budget) lost
    them: the error boundary ended it on a context that never had them."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-rpm", "1000")]
    unknown = pb.CompleteRequest(model="no-such-model", prompt="a", max_tokens=1)
    streamed = pb.GenerateRequest(model="no-such-model", prompt="a", max_tokens=1)
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
        stub = rpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Complete(unknown, metadata=identity)
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in stub.Generate(streamed, metadata=identity):
                pass
    for failed in (unary.value, stream.value):
        assert failed.code() == grpc.StatusCode.NOT_FOUND
        headers = dict(failed.trailing_metadata() or ())
        assert headers["x-ratelimit-limit"].startswith("1000")
        assert int(headers["x-ratelimit-remaining"]) < 1000
        assert "grpc-status-details-bin" in headers  # the error's details are kept


async def test_a_hung_store_is_not_waited_for_on_every_request(tmp_path):
    """A Redis that stops answering (SIGSTOP: connections open, no replies) made every
    limited, budgeted request wait out both stores' timeouts (1 s + 2 s) before it
    failed open. After a few such waits the breakers open: requests pass at once."""
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [
        ("x-tokenmesh-key-id", key),
        ("x-tokenmesh-rpm", "100"),  # too few for window leases: every decision asks
        ("x-tokenmesh-monthly-tokens", "100000"),
    ]
    request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1)
    try:
        async with await start_inference(inference_settings(tmp_path, url)) as (_, channel):
            stub = rpc.InferenceServiceStub(channel)
            await stub.Complete(request, metadata=identity)  # connections made
            opened_before = {store: _opened(store) for store in ("ratelimit", "budgets")}
            os.kill(child.pid, signal.SIGSTOP)
            # Each waits for the stores' timeouts; failing for over a second, they open.
            for _ in range(4):
                if all(_opened(store) > n for store, n in opened_before.items()):
                    break
                calls = (stub.Complete(request, metadata=identity) for _ in range(3))
                await asyncio.gather(*calls)
            assert all(_opened(store) > n for store, n in opened_before.items())
            started = time.monotonic()
            for _ in range(5):
                reply = await stub.Complete(request, metadata=identity)
                assert reply.usage.completion_tokens == 1
            assert time.monotonic() - started < 1.0  # not one store timeout among five
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.terminate()
        child.wait(10)


async def test_a_retried_request_counts_once_and_every_try_counts(tmp_path, redis_url):
    """Envoy retries a request a worker refused UNAVAILABLE (draining, a version not on
    it) on another worker. Tries after the first only read the windows, so a retry
    whose first try never reached a worker (a connect failure, a refused stream) was
    admitted uncounted, over a full window. Every try counts now, and a try refused
    in a way Envoy retries gives its count back first."""
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = [("x-tokenmesh-key-id", key), ("x-tokenmesh-rpm", "3")]
    # The edge routed it to a version this worker does not have: it asks for a retry.
    stale = [
        *identity,
        (model_routing.ROUTE_MODEL_HEADER, "deterministic-test"),
        (model_routing.ROUTE_VERSION_HEADER, "9"),
    ]
    request = pb.CompleteRequest(model="deterministic-test", prompt="a", max_tokens=1)
    window = f"tm:ratelimit:rpm:{key}"
    client = aioredis.from_url(redis_url)
    try:
        async with await start_inference(inference_settings(tmp_path, redis_url)) as (_, channel):
            stub = rpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as retried:
                await stub.Complete(request, metadata=stale)
            assert retried.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await client.zcard(window) == 0  # given back: its retry counts
            retry = [*identity, ("x-envoy-attempt-count", "2")]
            for metadata in (retry, identity, identity):
                await stub.Complete(request, metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # a retry over the limit
                await stub.Complete(request, metadata=retry)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await client.zcard(window) == 3
    finally:
        await client.delete(window)
        await client.aclose()


def _opened(store: str) -> float:
    labels = {"store": store}
    return REGISTRY.get_sample_value("tokenmesh_store_breaker_opened_total", labels) or 0.0
