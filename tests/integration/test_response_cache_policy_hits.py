"""Content-policy hits of answers served without their own computation, on a real worker
(cache on, real Redis): a coalesced waiter, or a request joining a computation that
ended, records the output rule that stopped the answer it received as its own hit.

The computing request records the hit when its output filter fires; every other
request that receives that filtered answer recorded nothing: its usage event (and
so its audit entry) said no policy acted on an answer a policy stopped.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.core import contract
from services.inference.pipeline.policy import PatternRule, Policy
from services.inference.service import InferenceService
from services.router.policies import TENANT, PolicyCatalog
from tests.answer_headers import call_headers
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_inference_v2 import _usage_event
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
PROMPT = "the quick brown fox"
MAX_TOKENS = 24
RULE = "output_block_pattern:0"


@pytest.fixture
async def cached_worker(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[InferenceService, Any]]:
    monkeypatch.setenv("TOKENMESH_CACHE", "on")
    monkeypatch.setenv("TOKENMESH_CACHE_REDIS_URL", redis_url)
    # 20 ms a step: the computation lasts long enough for a second request to join it.
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=20.0)
    async with await start_inference(settings) as (service, channel):
        yield service, rpc.InferenceServiceStub(channel)


@pytest.fixture
async def catalog(redis_url: str) -> AsyncIterator[PolicyCatalog]:
    client = aioredis.from_url(redis_url)
    yield PolicyCatalog(client)
    await client.aclose()


def _identity(tenant: str, key: str) -> tuple[tuple[str, str], ...]:
    return ((contract.TENANT_HEADER, tenant), (contract.KEY_ID_HEADER, key))


def _generate_request(request_id: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, max_output_tokens=MAX_TOKENS, request_id=request_id
    )
    request.sampling.seed = 3
    request.sampling.temperature = 0
    return request


def _complete_request(request_id: str) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model=MODEL, prompt=PROMPT, max_output_tokens=MAX_TOKENS, request_id=request_id
    )
    request.sampling.seed = 3
    request.sampling.temperature = 0
    return request


def _block_hits(policy: str) -> float:
    labels = {"policy": policy, "rule": RULE, "action": "block", "direction": "output"}
    return REGISTRY.get_sample_value("tokenmesh_policy_hits_total", labels) or 0.0


async def _attach_output_rule(
    service: InferenceService, stub: Any, catalog: PolicyCatalog, tenant: str
) -> Policy:
    """Attaches to `tenant` a policy stopping the answer at a word late in it."""
    free = await stub.Complete(
        _complete_request(f"free-{tenant}"), metadata=_identity(f"free-{tenant}", "k")
    )
    banned = free.choices[0].text.split()[12]  # late: a second request joins before it
    rule = PatternRule(rf"(?<!\S){banned}(?!\S)", "banned word")
    created = await catalog.create(
        Policy(f"out-{tenant}", 0, output_block_patterns=(rule,)), time.time()
    )
    await catalog.attach(TENANT, tenant, created.name)
    await service.policies.refresh()  # what the background task does every 0.5 s
    assert service.cache is not None
    async with asyncio.timeout(10):  # the free answer's flight ends once it is stored
        while len(service.cache.completions):
            await asyncio.sleep(0.005)
    return created


async def _read_stream(call: Any) -> tuple[str, list[pb.GenerateResponse]]:
    status = dict(await call.initial_metadata())[contract.CACHE_HEADER]
    finals = [m async for m in call if m.HasField("finish_reason")]
    return status, finals


async def _flight_open(service: InferenceService, completions: bool = False) -> None:
    assert service.cache is not None
    flights = service.cache.completions if completions else service.cache.streams
    async with asyncio.timeout(10):
        while not len(flights):
            await asyncio.sleep(0.005)


async def test_a_coalesced_stream_records_the_output_hit_of_the_answer_it_received(
    cached_worker: tuple[InferenceService, Any], catalog: PolicyCatalog
) -> None:
    service, stub = cached_worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    policy = await _attach_output_rule(service, stub, catalog, tenant)
    hit = f"{policy.label} {RULE} block output"
    before = _block_hits(policy.label)
    lead_id, follow_id, later_id = (f"{who}-{tenant}" for who in ("lead", "follow", "later"))
    leader = stub.Generate(_generate_request(lead_id), metadata=_identity(tenant, "key-a"))
    reading = asyncio.ensure_future(_read_stream(leader))
    await _flight_open(service)
    follower = stub.Generate(_generate_request(follow_id), metadata=_identity(tenant, "key-b"))
    (lead_status, lead_finals), (follow_status, follow_finals) = await asyncio.gather(
        reading, _read_stream(follower)
    )
    assert (lead_status, follow_status) == ("miss", "coalesced")
    for finals in (lead_finals, follow_finals):
        (final,) = finals
        assert final.finish_reason == resources.FINISH_REASON_CONTENT_FILTER
    lead_event = await _usage_event(service, lead_id)
    follow_event = await _usage_event(service, follow_id)
    assert list(lead_event.policy_hits) == [hit]  # the leader's, once
    assert (follow_event.cached, follow_event.key_id) == (True, "key-b")
    assert follow_event.finish_reason == "content_filter"
    assert list(follow_event.policy_hits) == [hit]  # the follower's own
    # A stopped answer is never stored: a later request computes (or joins the ended
    # computation) and records the hit too.
    later = stub.Generate(_generate_request(later_id), metadata=_identity(tenant, "key-c"))
    later_status, _ = await _read_stream(later)
    assert later_status in ("miss", "hit")
    assert list((await _usage_event(service, later_id)).policy_hits) == [hit]
    assert _block_hits(policy.label) == before + 3  # one per request answered with it


async def test_a_coalesced_completion_records_the_output_hit_of_the_answer_it_received(
    cached_worker: tuple[InferenceService, Any], catalog: PolicyCatalog
) -> None:
    service, stub = cached_worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    policy = await _attach_output_rule(service, stub, catalog, tenant)
    hit = f"{policy.label} {RULE} block output"
    lead_id, follow_id = f"lead-{tenant}", f"follow-{tenant}"
    leader = stub.Complete(_complete_request(lead_id), metadata=_identity(tenant, "key-a"))
    await _flight_open(service, completions=True)
    follower = stub.Complete(_complete_request(follow_id), metadata=_identity(tenant, "key-b"))
    answers = await asyncio.gather(leader, follower)
    statuses = [(await call_headers(c))[contract.CACHE_HEADER] for c in (leader, follower)]
    assert statuses == ["miss", "coalesced"]
    for answer in answers:
        assert answer.choices[0].finish_reason == resources.FINISH_REASON_CONTENT_FILTER
    assert list((await _usage_event(service, lead_id)).policy_hits) == [hit]
    follow_event = await _usage_event(service, follow_id)
    assert (follow_event.cached, follow_event.finish_reason) == (True, "content_filter")
    assert list(follow_event.policy_hits) == [hit]


async def test_an_unfiltered_coalesced_answer_records_no_output_hit(
    cached_worker: tuple[InferenceService, Any],
) -> None:
    """Without a policy nothing is adopted (the answer's own stops only)."""
    service, stub = cached_worker
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    lead_id, follow_id = f"lead-{tenant}", f"follow-{tenant}"
    leader = stub.Generate(_generate_request(lead_id), metadata=_identity(tenant, "key-a"))
    reading = asyncio.ensure_future(_read_stream(leader))
    await _flight_open(service)
    follower = stub.Generate(_generate_request(follow_id), metadata=_identity(tenant, "key-b"))
    results = await asyncio.gather(reading, _read_stream(follower))
    assert [status for status, _ in results] == ["miss", "coalesced"]
    for request_id in (lead_id, follow_id):
        event = await _usage_event(service, request_id)
        assert (event.finish_reason, list(event.policy_hits)) == ("length", [])
