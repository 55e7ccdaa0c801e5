"""v1's recorded contract, replayed against the worker (v1 is a translation onto v2).

tests/contract/data/v1_golden.json was recorded from the v1 servicer as it
was before the translation layer (see tests/contract/v1_cases.py): every
request in it must still get the same responses, errors, headers and usage
events, with the deterministic engine and the real demo-lm, seeded and greedy.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import redis.asyncio as aioredis

from services.inference.service import InferenceService
from tests.contract import v1_cases
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_pb2

RECORD = os.environ.get("TOKENMESH_RECORD_V1_GOLDEN") == "1"


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[InferenceService, grpc.aio.Channel]]:
    """A worker with the deterministic test engine (versions 1 and 2) and the real models."""
    settings = inference_settings(tmp_path, redis_url, models=("demo-lm:1", "all-minilm-l6-v2:1"))
    async with await start_inference(settings) as pair:
        yield pair


async def _usage_events(
    service: InferenceService, last_request_id: str
) -> dict[str, list[inference_pb2.UsageEvent]]:
    """Returns the usage events by request id, once the last case's event was shipped.

    The spool ships events in the order they were recorded, so every earlier
    case's event (if it had one) is there by then.
    """
    client = aioredis.from_url(service.settings.redis_url)
    try:
        async with asyncio.timeout(30):
            while True:
                entries: Any = await client.xrange(service.settings.usage_stream)
                events: dict[str, list[inference_pb2.UsageEvent]] = {}
                for _, fields in entries:
                    event = inference_pb2.UsageEvent.FromString(fields[b"event"])
                    events.setdefault(event.request_id, []).append(event)
                if last_request_id in events:
                    return events
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _replay(
    service: InferenceService, channel: grpc.aio.Channel, cases: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    outcomes = [await v1_cases.run_case(channel, case) for case in cases]
    events = await _usage_events(service, cases[-1]["request"]["request_id"])
    for case, outcome in zip(cases, outcomes, strict=True):
        request_id = case["request"].get("request_id", "")
        if case["rpc"] in v1_cases.METERED and request_id:
            outcome["usage_events"] = [
                v1_cases.usage_event_summary(e, case) for e in events.get(request_id, [])
            ]
    return outcomes


def _differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    return "\n".join(
        f"  {key}:\n    recorded: {json.dumps(expected.get(key))[:2000]}\n"
        f"    now:      {json.dumps(actual.get(key))[:2000]}"
        for key in sorted(set(expected) | set(actual))
        if expected.get(key) != actual.get(key)
    )


async def test_v1_requests_get_their_recorded_outcomes(
    worker: tuple[InferenceService, grpc.aio.Channel],
) -> None:
    service, channel = worker
    if RECORD:
        cases = v1_cases.all_cases()
        outcomes = await _replay(service, channel, cases)
        v1_cases.save_golden(
            {"cases": [{**c, "outcome": o} for c, o in zip(cases, outcomes, strict=True)]}
        )
        return
    recorded = v1_cases.load_golden()["cases"]
    cases = [{k: v for k, v in c.items() if k != "outcome"} for c in recorded]
    outcomes = await _replay(service, channel, cases)
    mismatches = [
        f"{case['name']}:\n{_differences(case['outcome'], outcome)}"
        for case, outcome in zip(recorded, outcomes, strict=True)
        if case["outcome"] != outcome
    ]
    assert not mismatches, f"{len(mismatches)} v1 cases changed:\n" + "\n".join(mismatches)
