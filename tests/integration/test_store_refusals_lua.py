"""The rate limiter calls a Redis that refuses inside its Lua scripts unavailable, on 6.2 too.

Redis before 7 (the bundled redis-server is 6.2) wraps a refusal that a command
meets inside a Lua script (READONLY: the old primary during a failover; OOM:
maxmemory under noeviction) in a generic "ERR Error running script ...". The
limiter read that as a bug where Redis 7's own READONLY/OOM reply read as "store
unavailable": a decision answered INTERNAL with a traceback and counted in
tokenmesh_ratelimit_errors_total instead of UNAVAILABLE counted as a fail-open
(a worker in deny mode refused with INTERNAL, not UNAVAILABLE + retry-after); a
refund raised the wrapped error in place of the worker's own answer; and at
maxmemory the lease settler crashed with a traceback, restarted by its supervisor
(the window script itself still runs there: Redis lets a script that has written
once go on writing). Real usage and inference services over mTLS, a Redis of the
test's own: the bundled 6.2, and the system's Redis 7 where there is one (the
same answers on both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.api.httpbody_pb2 import HttpBody
from prometheus_client import REGISTRY

from services.core import contract
from services.usage.ratelimit import RequestLimiter
from tests.integration import test_redis_refusals as redis_refusals
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_ratelimit_errors import _limiter
from tests.rpc_errors import openai_refusal
from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

OK = rls_pb2.RateLimitResponse.OK
SETTLER = "ratelimit-lease-settler"


# A volatile Redis of the test's own, bundled 6.2 and (where on PATH) 7, that the test
# makes refuse writes (the Redis refusal tests' fixture).
limits_url = redis_refusals.refusing_url


@contextlib.asynccontextmanager
async def _refusing(url: str, refusal: str) -> AsyncIterator[None]:
    """Makes the Redis at `url` refuse writes with `refusal` inside the block."""
    admin = aioredis.from_url(url)
    try:
        if refusal == "OOM":  # used memory is far above 1 byte: every write is refused
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")
            yield
            await admin.config_set("maxmemory", "0")
        else:  # READONLY: a replica of a primary that is gone, as a failover's old primary
            await admin.execute_command("REPLICAOF", "127.0.0.1", "1")
            yield
            await admin.execute_command("REPLICAOF", "NO", "ONE")
    finally:
        await admin.aclose()


def _request(key_id: str, rpm: int) -> rls_pb2.RateLimitRequest:
    entries = [
        ratelimit_pb2.RateLimitDescriptor.Entry(key="key_id", value=key_id),
        ratelimit_pb2.RateLimitDescriptor.Entry(key="rpm", value=str(rpm)),
    ]
    return rls_pb2.RateLimitRequest(
        domain="tokenmesh", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=entries)]
    )


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _counters() -> dict[str, float]:
    return {
        "fail_open": _sample("tokenmesh_ratelimit_fail_open_total"),
        "decide_errors": _sample("tokenmesh_ratelimit_errors_total", stage="decide"),
        "settle_errors": _sample("tokenmesh_ratelimit_errors_total", stage="settle"),
        "settler_restarts": _sample(
            "tokenmesh_background_task_restarts_total", service="usage", task=SETTLER
        ),
    }


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records that call the refusal a bug: ERROR level or a traceback."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info is not None
    ]


async def test_a_read_only_store_fails_open_as_unavailable(
    redis_url: str, limits_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    async with _limiter(redis_url, limits_url) as limiter:
        assert (await limiter.ShouldRateLimit(_request(key, 60), timeout=10)).overall_code == OK
        before = _counters()
        caplog.clear()
        async with _refusing(limits_url, "READONLY"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await limiter.ShouldRateLimit(_request(key, 60), timeout=10)
        after = _counters()
        # It passes by itself: decided again once Redis takes writes.
        assert (await limiter.ShouldRateLimit(_request(key, 60), timeout=10)).overall_code == OK
    # Envoy applies its failure mode to an outage (6.2 answered INTERNAL, a bug's code).
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert ("retry-after", "1") in tuple(info.value.trailing_metadata() or ())
    assert after["fail_open"] == before["fail_open"] + 1
    assert after["decide_errors"] == before["decide_errors"]
    assert _errors_logged(caplog) == []


async def test_settling_leases_at_maxmemory_is_an_outage_not_a_crash(
    redis_url: str, limits_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A limit this high gets leases (services/usage/leases.py): their settling writes.
    key, rpm = f"key_{uuid.uuid4().hex[:8]}", 100_000
    async with _limiter(redis_url, limits_url) as limiter:
        assert (await limiter.ShouldRateLimit(_request(key, rpm), timeout=10)).overall_code == OK
        before = _counters()
        caplog.clear()
        async with _refusing(limits_url, "OOM"):
            deadline = time.monotonic() + 10
            while True:  # decide until the settler has met the refusal, one way or the other
                reply = await limiter.ShouldRateLimit(_request(key, rpm), timeout=10)
                # Redis lets the window script write (its first write is not refused).
                assert reply.overall_code == OK
                settled = [r for r in caplog.records if "could not settle" in r.getMessage()]
                if settled or _counters() != before:
                    break
                assert time.monotonic() < deadline, "no lease was settled"
                await asyncio.sleep(0.02)
    after = _counters()
    assert after["settle_errors"] == before["settle_errors"]
    assert after["settler_restarts"] == before["settler_restarts"]
    assert settled and settled[0].levelno == logging.WARNING and settled[0].exc_info is None
    assert _errors_logged(caplog) == []


async def test_a_refund_the_store_refuses_leaves_the_request_counted(
    limits_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(limits_url)
    limiter = RequestLimiter(client, default_rpm=60, redis_url=limits_url)  # no leases
    try:
        counted = await limiter.count((("key_id", key),))
        assert counted is not None and counted[1] is not None
        caplog.clear()
        async with _refusing(limits_url, "READONLY"):
            await limiter.refund(counted[1])  # raised the wrapped error in the worker's place
            await limiter.close()  # the refund has ended
        assert await client.zcard(f"tm:ratelimit:rpm:{key}") == 1
    finally:
        await limiter.close()
        await client.aclose()
    refused = [r for r in caplog.records if "could not take back" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.WARNING]
    assert _errors_logged(caplog) == []


async def test_a_worker_in_deny_mode_refuses_as_unavailable(
    tmp_path: Path, redis_url: str, limits_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = inference_settings(
        tmp_path, redis_url, ratelimit_redis_url=limits_url, ratelimit_failure_mode_deny=True
    )
    identity = (
        (contract.KEY_ID_HEADER, f"key_{uuid.uuid4().hex[:8]}"),
        (contract.RPM_HEADER, "60"),
    )
    body = HttpBody(
        content_type="application/json", data=b'{"model": "deterministic-test", "input": "a"}'
    )
    async with await start_inference(settings) as (_, channel):
        stub = openai_rpc.OpenAIServiceStub(channel)
        caplog.clear()
        async with _refusing(limits_url, "READONLY"):
            code, error = await openai_refusal(
                stub.CreateEmbedding(body, metadata=identity, timeout=20)
            )
    # 6.2: INTERNAL, "internal error" (a 500 the client must not retry), with a traceback.
    assert code == grpc.StatusCode.UNAVAILABLE, error
    assert error["type"] == "server_error"
    assert _errors_logged(caplog) == []


@pytest.mark.parametrize("refusal", ["READONLY", "OOM"])
async def test_a_scripts_refusal_inside_a_transaction_is_a_store_refusal(limits_url, refusal):
    # redis-py puts "Command # N (...) of pipeline caused error: " before a reply met
    # in a transaction (the jobs service creates an OpenAI file that way): read from
    # the start only, a script's wrapped refusal there became INTERNAL on Redis 6.2.
    from services.core.store_errors import is_store_refusal

    client = aioredis.from_url(limits_url)
    try:
        script = client.register_script("redis.call('SET', KEYS[1], 'x') return 1")
        await script(keys=["k"], args=[])  # loaded before Redis refuses writes
        async with _refusing(limits_url, refusal):
            with pytest.raises(Exception) as caught:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.evalsha(script.sha, 1, "k")
                    pipe.get("k")
                    await pipe.execute()
        assert is_store_refusal(caught.value), repr(caught.value)
    finally:
        await client.aclose()
