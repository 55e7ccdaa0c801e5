"""A usage-stream entry the meter cannot decode is set aside, and metering goes on.

The real usage service meters a real Redis Stream; the operator CLI lists what
was set aside.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.cli.__main__ import main as cli
from services.core.server import serving
from services.usage.meter import dead_letter_stream
from services.usage.service import UsageService, UsageSettings
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2


def _event(request_id: str, completion: int) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id=request_id,
        key_id="key_dead",
        tenant="t-dead",
        finish_reason="length",
        model=types_pb2.ModelRef(name="demo-lm", version="1"),
        usage=types_pb2.TokenUsage(
            prompt_tokens=1, completion_tokens=completion, total_tokens=1 + completion
        ),
        finish_unix_ms=int(time.time() * 1000),
    )


def _dead_letters(reason: str) -> float:
    labels = {"reason": reason}
    return REGISTRY.get_sample_value("tokenmesh_usage_dead_letters_total", labels) or 0.0


async def _until(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Waits until `condition()` (sync or async) is true, polling."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


@pytest.fixture
async def usage(redis_url: str) -> AsyncIterator[tuple[UsageService, aioredis.Redis]]:
    settings = UsageSettings(
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=f"usage-dead:{uuid.uuid4().hex}",
        consumer_group="meter",
    )
    service = UsageService(settings)
    client = aioredis.from_url(redis_url)
    async with serving(service, settings):
        yield service, client
    await client.aclose()


async def test_a_poisoned_entry_is_set_aside_and_metering_goes_on(usage, monkeypatch, capsys):
    service, client = usage
    stream = service.settings.usage_stream
    before = {r: _dead_letters(r) for r in ("undecodable", "missing_event", "no_request_id")}
    good = [_event(f"req-{uuid.uuid4().hex[:8]}", completion=n) for n in (2, 3)]
    await client.xadd(
        stream, {"request_id": good[0].request_id, "event": good[0].SerializeToString()}
    )
    poisoned = await client.xadd(
        stream, {"request_id": "req-poison", "event": b"\xff\xfe not proto"}
    )
    await client.xadd(stream, {"request_id": "req-bare"})
    await client.xadd(stream, {"event": inference_pb2.UsageEvent(rpc="x").SerializeToString()})
    await client.xadd(
        stream, {"request_id": good[1].request_id, "event": good[1].SerializeToString()}
    )

    # Both good events are metered, whatever came between them.
    await _until(lambda: service.meter.applied_total == 2)
    assert _dead_letters("undecodable") == before["undecodable"] + 1
    assert _dead_letters("missing_event") == before["missing_event"] + 1
    assert _dead_letters("no_request_id") == before["no_request_id"] + 1
    pending = await client.xpending(stream, "meter")
    assert pending["pending"] == 0  # set aside means acked: no restart trips over it again
    letters = await client.xrange(dead_letter_stream(stream))
    assert [f[b"reason"] for _, f in letters] == [
        b"undecodable",
        b"missing_event",
        b"no_request_id",
    ]
    assert letters[0][1][b"stream_id"] == poisoned
    assert letters[0][1][b"orig:event"] == b"\xff\xfe not proto"  # kept as it was, to inspect

    # Later entries are metered too: the meter did not stop.
    late = _event(f"req-{uuid.uuid4().hex[:8]}", completion=5)
    await client.xadd(stream, {"request_id": late.request_id, "event": late.SerializeToString()})
    await _until(lambda: service.meter.applied_total == 3)

    # The operator sees them.
    monkeypatch.setenv("REDIS_URL", service.settings.redis_url)
    monkeypatch.setenv("TOKENMESH_USAGE_STREAM", stream)
    assert await asyncio.to_thread(cli, ["usage", "dead-letters", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["reason"], d["request_id"]) for d in listed] == [
        ("undecodable", "req-poison"),
        ("missing_event", "req-bare"),
        ("no_request_id", ""),
    ]
    assert listed[0]["stream_id"] == poisoned.decode() and listed[0]["detail"]
    assert await asyncio.to_thread(cli, ["usage", "dead-letters"]) == 0
    assert "undecodable  entry " + poisoned.decode() in capsys.readouterr().out
