"""Content policies on a real worker (mTLS, real Redis): input redaction and blocks, output
filtering on the stream, hits in usage events and metrics, redacted samples."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.core import contract
from services.inference.pipeline import samples
from services.inference.pipeline.policy import PatternRule, Policy
from services.inference.service import InferenceService
from services.router.policies import TENANT, PolicyCatalog, SampleSettings
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_inference_v2 import _usage_event
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

MODEL = "deterministic-test"
GREEDY = resources.SamplingParams(temperature=0, seed=1)


@pytest.fixture
async def worker(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[InferenceService, rpc.InferenceServiceStub]]:
    async with await start_inference(inference_settings(tmp_path, redis_url)) as (service, ch):
        yield service, rpc.InferenceServiceStub(ch)


@pytest.fixture
async def catalog(redis_url: str) -> AsyncIterator[PolicyCatalog]:
    client = aioredis.from_url(redis_url)
    yield PolicyCatalog(client)
    await client.aclose()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((contract.TENANT_HEADER, tenant), (contract.KEY_ID_HEADER, f"key-{tenant}"))


async def _attach(
    service: InferenceService, catalog: PolicyCatalog, tenant: str, policy: Policy
) -> Policy:
    created = await catalog.create(policy, time.time())
    await catalog.attach(TENANT, tenant, created.name)
    await service.policies.refresh()  # what the background task does every 0.5 s
    return created


async def _generate(stub, tenant: str, **fields) -> tuple[str, list[pb.GenerateResponse]]:
    text, finals = "", []
    call = stub.Generate(
        pb.GenerateRequest(model=MODEL, sampling=GREEDY, **fields), metadata=_metadata(tenant)
    )
    async for message in call:
        text += message.text
        if message.HasField("finish_reason"):
            finals.append(message)
    return text, finals


def _hits(policy: str, rule: str, action: str, direction: str) -> float:
    labels = {"policy": policy, "rule": rule, "action": action, "direction": direction}
    return REGISTRY.get_sample_value("tokenmesh_policy_hits_total", labels) or 0.0


async def test_redact_replaces_the_email_before_the_model_and_audits_the_hit(
    worker, catalog, tenant
):
    service, stub = worker
    policy = await _attach(
        service, catalog, tenant, Policy(f"pii-{tenant}", 0, pii={"email": "redact"})
    )
    request_id = f"redact-{tenant}"
    _, (final,) = await _generate(
        stub, tenant, prompt="mail jane@example.com now", max_output_tokens=4, request_id=request_id
    )
    # Tokens are counted on what the model saw: the placeholder, not the address.
    _, (plain,) = await _generate(
        stub, f"other-{tenant}", prompt="mail [EMAIL] now", max_output_tokens=4
    )
    assert final.usage.prompt_tokens == plain.usage.prompt_tokens
    event = await _usage_event(service, request_id)
    assert list(event.policy_hits) == [f"{policy.label} pii:email redact input"]
    assert _hits(policy.label, "pii:email", "redact", "input") >= 1


async def test_block_answers_invalid_argument_naming_the_rule_without_the_text(
    worker, catalog, tenant
):
    service, stub = worker
    policy = await _attach(
        service, catalog, tenant, Policy(f"cards-{tenant}", 0, pii={"card": "block"})
    )
    request_id = f"block-{tenant}"
    call = stub.Generate(
        pb.GenerateRequest(model=MODEL, prompt="pay 4111 1111 1111 1111", request_id=request_id),
        metadata=_metadata(tenant),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4111" not in caught.value.details() and policy.label in caught.value.details()
    status = await rpc_status.aio.from_call(call)
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details)
    assert info.reason == "CONTENT_POLICY"
    assert dict(info.metadata) == {"policy": policy.label, "rule": "pii:card"}
    event = await _usage_event(service, request_id)
    assert (event.finish_reason, event.usage.total_tokens) == ("content_filter", 0)
    assert list(event.policy_hits) == [f"{policy.label} pii:card block input"]


async def test_output_rule_stops_the_choice_before_the_match_and_meters_its_tokens(
    worker, catalog, tenant
):
    service, stub = worker
    prompt = "the quick brown fox"
    free, _ = await _generate(stub, f"free-{tenant}", prompt=prompt, max_output_tokens=24)
    words = free.split()
    banned = words[12]  # late enough that some text is released before it
    before = free[: free.index(f" {banned}")] if f" {banned}" in free else ""
    rule = PatternRule(rf"(?<!\S){banned}(?!\S)", "banned word")
    policy = await _attach(
        service, catalog, tenant, Policy(f"out-{tenant}", 0, output_block_patterns=(rule,))
    )
    request_id = f"out-{tenant}"
    text, (final,) = await _generate(
        stub, tenant, prompt=prompt, max_output_tokens=24, request_id=request_id
    )
    assert final.finish_reason == resources.FINISH_REASON_CONTENT_FILTER
    assert banned not in text.split() and before.startswith(text)
    assert f"{policy.label} rule output_block_pattern:0" in final.finish_message
    assert banned not in final.finish_message
    # Every token generated up to the stop is billed, including the ones held back.
    event = await _usage_event(service, request_id)
    assert event.finish_reason == "content_filter"
    assert event.usage.completion_tokens == final.usage.completion_tokens
    assert final.usage.completion_tokens >= len(text.split()) + 1
    assert list(event.policy_hits) == [f"{policy.label} output_block_pattern:0 block output"]


async def test_a_stopped_choice_bills_what_its_final_message_shows_however_fast_the_engine(
    tmp_path, redis_url, catalog, tenant
):
    """Tokens the engine generated after the match, before the stop took effect, were
    billed after the final message had shown its usage: with an engine that runs ahead
    of the stream (no step time) 4 of 10 requests billed more than they showed (56
    shown, 73 billed; 83 and 200). Now each bills what it shows: the tokens through
    the delta that completed the match (how many the engine had batched into it
    varies with how far it ran ahead)."""
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=0.0)
    async with await start_inference(settings) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        rule = PatternRule("something")  # word 7 of the greedy answer
        await _attach(
            service, catalog, tenant, Policy(f"fast-{tenant}", 0, output_block_patterns=(rule,))
        )
        for i in range(30):  # the old code billed more than it showed in some
            request_id = f"fast-{tenant}-{i}"
            _, (final,) = await _generate(
                stub,
                tenant,
                prompt="the quick brown fox",
                max_output_tokens=200,
                request_id=request_id,
            )
            assert final.finish_reason == resources.FINISH_REASON_CONTENT_FILTER
            event = await _usage_event(service, request_id)
            assert event.usage.completion_tokens == final.usage.completion_tokens


async def test_a_stop_sequence_does_not_send_the_rest_of_a_banned_word_unjudged(
    worker, catalog, tenant
):
    """A stop sequence cuts the text where it starts, but the token that completed it
    went out whole in token_ids and logprobs, judged by no rule: stop=["some"] sent the
    token " something" that the rule `something` bans. Its text past the cut is
    judged now: the choice ends content_filter and the token is not sent."""
    service, stub = worker
    rule = PatternRule("something")  # word 7 of the greedy answer, one token
    await _attach(
        service, catalog, tenant, Policy(f"stop-{tenant}", 0, output_block_patterns=(rule,))
    )
    messages = []
    async for message in stub.Generate(
        pb.GenerateRequest(
            model=MODEL,
            prompt="the quick brown fox",
            max_output_tokens=12,
            sampling=GREEDY,
            logprobs=True,
            stop_sequences=["some"],
        ),
        metadata=_metadata(tenant),
    ):
        messages.append(message)
    tokens = [lp.token for m in messages for lp in m.logprobs]
    assert " something" not in tokens
    assert messages[-1].finish_reason == resources.FINISH_REASON_CONTENT_FILTER


async def test_top_logprobs_leave_out_an_alternative_an_output_rule_bans(worker, catalog, tenant):
    """An alternative token the answer did not take was sent unjudged: a banned word
    the model almost wrote reached the client in top_logprobs."""
    service, stub = worker
    request = pb.GenerateRequest(
        model=MODEL,
        prompt="the quick brown fox",
        max_output_tokens=12,
        sampling=GREEDY,
        logprobs=True,
        top_logprobs=3,
    )

    async def alternatives(who: str) -> list[str]:
        found = []
        async for message in stub.Generate(request, metadata=_metadata(who)):
            found += [t.token for lp in message.logprobs for t in lp.top_logprobs]
        return found

    assert " clients" in await alternatives(f"free-{tenant}")  # the word the rule bans
    rule = PatternRule("clients")
    await _attach(
        service, catalog, tenant, Policy(f"alt-{tenant}", 0, output_block_patterns=(rule,))
    )
    found = await alternatives(tenant)
    assert found and " clients" not in found


async def test_a_match_found_only_when_the_choice_ends_still_stops_it(worker, catalog, tenant):
    # A short answer (under the filter's hold-back, so only the last scan, at the
    # end, looks at it) ending in a banned word: the choice lost its final message
    # (an empty OK stream), its tokens went unbilled and the hit unaudited.
    service, stub = worker
    prompt = "the quick brown fox"
    free, _ = await _generate(stub, f"free-{tenant}", prompt=prompt, max_output_tokens=4)
    banned = free.split()[-1]
    rule = PatternRule(rf"(?<!\S){banned}(?!\S)", "banned word")
    policy = await _attach(
        service, catalog, tenant, Policy(f"end-{tenant}", 0, output_block_patterns=(rule,))
    )
    request_id = f"end-{tenant}"
    text, finals = await _generate(
        stub, tenant, prompt=prompt, max_output_tokens=4, request_id=request_id
    )
    (final,) = finals
    assert final.finish_reason == resources.FINISH_REASON_CONTENT_FILTER
    assert banned not in text.split()
    event = await _usage_event(service, request_id)
    assert (event.finish_reason, event.usage.completion_tokens) == ("content_filter", 4)
    assert final.usage.completion_tokens == 4  # generated, held back, billed
    assert list(event.policy_hits) == [f"{policy.label} output_block_pattern:0 block output"]


async def test_flag_lets_the_request_through_and_counts_it(worker, catalog, tenant):
    service, stub = worker
    policy = await _attach(
        service, catalog, tenant, Policy(f"flag-{tenant}", 0, pii={"ip": "flag"})
    )
    before = _hits(policy.label, "pii:ip", "flag", "input")
    _, (final,) = await _generate(stub, tenant, prompt="host 10.0.0.1 down", max_output_tokens=3)
    assert final.finish_reason == resources.FINISH_REASON_LENGTH
    assert _hits(policy.label, "pii:ip", "flag", "input") == before + 1


async def test_sampled_requests_are_written_redacted(worker, catalog, tenant):
    service, stub = worker
    await catalog.set_samples(SampleSettings(tenant, 1.0, "admin-key", time.time(), "ticket 1"))
    await service.policies.refresh()
    request_id = f"sample-{tenant}"
    text, (final,) = await _generate(
        stub, tenant, prompt="call +1 415 555 2671 now", max_output_tokens=5, request_id=request_id
    )
    assert final.usage.completion_tokens == 5
    async with asyncio.timeout(10):
        while not (found := (await samples.read(catalog.redis, tenant, 0, "", 10))[0]):
            await asyncio.sleep(0.05)
    (sample,) = found
    assert sample.request_id == request_id and sample.key_id == f"key-{tenant}"
    assert sample.input == "call [PHONE] now"
    assert list(sample.outputs) == [samples.redact_all(text)]
    assert sample.finish_reason == "length"


async def test_without_policies_the_stream_is_not_wrapped(worker, tenant):
    service, stub = worker
    await service.policies.ready()
    assert service.policies.policies(tenant, "") == []
    _, (final,) = await _generate(stub, tenant, prompt="a b c", max_output_tokens=2)
    assert final.finish_message == ""


async def test_concurrent_creates_get_distinct_versions_and_attach_checks_existence(
    catalog, tenant
):
    from services.core.errors import NotFound

    name = f"race-{tenant}"
    created = await asyncio.gather(
        *(catalog.create(Policy(name, 0, pii={"email": "flag"}), time.time()) for _ in range(8))
    )
    assert sorted(p.version for p in created) == list(range(1, 9))
    with pytest.raises(NotFound):
        await catalog.attach(TENANT, tenant, f"{name}@9")
    with pytest.raises(NotFound):
        await catalog.attach(TENANT, tenant, f"missing-{tenant}")
    assert (await catalog.attach(TENANT, tenant, f"{name}@8")).policy == f"{name}@8"
    assert (await catalog.detach(TENANT, tenant)).policy == f"{name}@8"
    with pytest.raises(NotFound):
        await catalog.detach(TENANT, tenant)


async def test_embedding_inputs_are_redacted_and_blocked_like_prompts(
    model_server, catalog, tenant
):
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    rules = (PatternRule("forbidden"),)
    policy = Policy(f"emb-{tenant}", 0, pii={"email": "redact"}, block_keywords=rules)
    await _attach(service, catalog, tenant, policy)
    request = pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["mail a@b.io", "mail [EMAIL]"])
    reply = await stub.Embed(request, metadata=_metadata(tenant))
    first, second = reply.embeddings
    assert list(first.values) == list(second.values)  # the model saw the placeholder
    # Spellings the model's tokenizer reads as "a forbidden word" (it drops invisible
    # characters and accents): each passed the rule, and the model embedded the text.
    for text in ("a forbidden word", "a for\u200bbidden word", "a forbíddén word"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(
                pb.EmbedRequest(model="all-minilm-l6-v2", inputs=[text]),
                metadata=_metadata(tenant),
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "block_keyword:0" in caught.value.details()
    hidden = pb.EmbedRequest(model="all-minilm-l6-v2", inputs=["mail a@b\u200b.io", "mail a@b.io"])
    reply = await stub.Embed(hidden, metadata=_metadata(tenant))
    assert list(reply.embeddings[0].values) == list(first.values)  # redacted as well


async def test_the_openai_surface_gets_the_same_policies(tmp_path, redis_url, catalog, tenant):
    from tests.integration.test_openai_worker import _body, _error_trailer, _events
    from tokenmesh.openai.v1 import openai_service_pb2_grpc as openai_rpc

    async with await start_inference(inference_settings(tmp_path, redis_url)) as (service, ch):
        openai = openai_rpc.OpenAIServiceStub(ch)
        rules = (PatternRule(r"\S"),)  # any output: the choice stops at the first scan
        policy = Policy(f"oai-{tenant}", 0, pii={"card": "block"}, output_block_patterns=rules)
        policy = await _attach(service, catalog, tenant, policy)
        chat = {"model": MODEL, "max_tokens": 30, "stream": True}
        refused = openai.CreateChatCompletion(
            _body(**chat, messages=[{"role": "user", "content": "card 4111 1111 1111 1111"}]),
            metadata=_metadata(tenant),
        )
        blocked = await _error_trailer(refused)
        # Its ErrorInfo names the policy and rule, as v2's does (it came with none).
        info = error_details_pb2.ErrorInfo()
        status = await rpc_status.aio.from_call(refused)
        assert any(d.Unpack(info) for d in status.details)
        assert dict(info.metadata) == {"policy": policy.label, "rule": "pii:card"}
        assert blocked["type"] == "invalid_request_error" and "4111" not in blocked["message"]
        assert blocked["code"] == "content_policy_violation"  # OpenAI's code for it
        assert policy.label in blocked["message"] and "pii:card" in blocked["message"]
        call = openai.CreateChatCompletion(
            _body(**chat, messages=[{"role": "user", "content": "the fox"}]),
            metadata=_metadata(tenant),
        )
        chunks = [json.loads(e) for e in _events([m async for m in call])[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "content_filter"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == ""
