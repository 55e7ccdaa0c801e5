"""Content policies at their limits, on a real worker (mTLS, real Redis): crafted inputs
checked off the event loop in bounded time, a budget per request, short inputs never
queued behind other tenants' big checks or sample builds, cards written next to their
expiry, output matches longer than the scan window or cut by its edges, samples bounded
in bytes."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
import regex
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.inference.pipeline import content, pii, samples
from services.inference.pipeline.policy import CHECK_TIME_RULE, PatternRule, Policy
from services.router.policies import SampleSettings
from tests.integration import test_content_policy as base
from tests.integration.test_content_policy import _attach, _generate, _metadata
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import policy_pb2

EMBEDDER = "all-minilm-l6-v2"
# The fixtures of the content-policy tests: a worker, the policy catalogue, a tenant.
worker, catalog, tenant = base.worker, base.catalog, base.tenant


async def _error_info(
    call: grpc.aio.UnaryUnaryCall[pb.EmbedRequest, pb.EmbedResponse],
) -> error_details_pb2.ErrorInfo:
    status = await rpc_status.aio.from_call(call)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and any(d.Unpack(info) for d in status.details)
    return info


class _Ticker:
    """_Ticker measures the longest gap between ticks of the event loop the worker
    shares with the test (a check run on the loop freezes both)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> _Ticker:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_crafted_embed_is_checked_off_the_event_loop_in_bounded_time(
    model_server, catalog, tenant
):
    # 255 inputs of "+1" and 18 digits then a letter, 20 K characters each (the
    # phone detector re-split each run thousands of ways), and a card in the last:
    # the check held the worker's event loop ~45 s before it blocked.
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    policy = Policy(f"redos-{tenant}", 0, pii={"phone": "redact", "card": "block"})
    await _attach(service, catalog, tenant, policy)
    unit = "+1" + "1" * 18 + "x "
    crafted = (unit * (20_000 // len(unit) + 1))[:20_000]
    inputs = [crafted] * 255 + ["card 4111 1111 1111 1111"]
    started = time.perf_counter()
    async with _Ticker() as ticker:
        call = stub.Embed(
            pb.EmbedRequest(model=EMBEDDER, inputs=inputs), metadata=_metadata(tenant)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    elapsed = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _error_info(call)).metadata["rule"] == "pii:card"
    # Loose bounds (the check takes ~1 s of CPU; this machine may be shared).
    assert elapsed < 20, f"the check took {elapsed:.1f} s"
    assert ticker.longest < 2, f"the event loop stalled {ticker.longest:.1f} s"


async def test_many_cheap_searches_run_out_of_the_request_s_budget(model_server, catalog, tenant):
    # Each search of 1,700 letters for [a-z]+\d{4} stays under the 50 ms limit of one
    # search; 256 of them took ~3 s and the request went through unchecked-in-time.
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    rules = (PatternRule(r"[a-z]+\d{4}", "order codes"),)
    policy = await _attach(
        service, catalog, tenant, Policy(f"budget-{tenant}", 0, block_patterns=rules)
    )
    call = stub.Embed(
        pb.EmbedRequest(model=EMBEDDER, inputs=["a" * 1700] * 256), metadata=_metadata(tenant)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = await _error_info(call)
    assert dict(info.metadata) == {"policy": policy.label, "rule": CHECK_TIME_RULE}


async def test_a_card_with_its_expiry_is_blocked_redacted_and_never_sampled(
    worker, catalog, tenant
):
    service, stub = worker
    prompt = "pay 4111 1111 1111 1111 12/26 now"
    await _attach(service, catalog, tenant, Policy(f"cb-{tenant}", 0, pii={"card": "block"}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _generate(stub, tenant, prompt=prompt, max_output_tokens=2)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pii:card" in caught.value.details() and "4111" not in caught.value.details()
    # Redacted: the model sees the placeholder (as many prompt tokens as the plain text).
    redacting = f"r-{tenant}"
    await _attach(service, catalog, redacting, Policy(f"cr-{tenant}", 0, pii={"card": "redact"}))
    _, (final,) = await _generate(stub, redacting, prompt=prompt, max_output_tokens=2)
    _, (plain,) = await _generate(
        stub, f"p-{tenant}", prompt="pay [CARD] 12/26 now", max_output_tokens=2
    )
    assert final.usage.prompt_tokens == plain.usage.prompt_tokens
    # Sampled (every detector, whatever the policy): the sample keeps no digit of it.
    sampled = f"s-{tenant}"
    await catalog.set_samples(SampleSettings(sampled, 1.0, "admin", time.time(), "ticket"))
    await service.policies.refresh()
    await _generate(stub, sampled, prompt=prompt, max_output_tokens=2)
    (sample,) = await _samples(catalog.redis, sampled, 1)
    assert sample.input == "pay [CARD] 12/26 now"


async def _samples(redis: aioredis.Redis, tenant: str, count: int) -> list[policy_pb2.Sample]:
    async with asyncio.timeout(10):
        while len(found := (await samples.read(redis, tenant, 0, "", 100))[0]) < count:
            await asyncio.sleep(0.05)
    return found


async def test_an_output_match_longer_than_the_scan_window_stops_the_choice(
    worker, catalog, tenant
):
    # The filter searched the last 64 released characters and the held ones: a match
    # of more than ~128 characters was never seen, and all of it was sent.
    service, stub = worker
    prompt = "the quick brown fox"
    free, _ = await _generate(stub, f"free-{tenant}", prompt=prompt, max_output_tokens=120)
    head, tail = free[10:30], free[330:350]
    pattern = f"{regex.escape(head)}(?s:.{{280,320}}){regex.escape(tail)}"
    assert regex.search(pattern, free) is not None
    rule = PatternRule(pattern, "long")
    policy = await _attach(
        service, catalog, tenant, Policy(f"long-{tenant}", 0, output_block_patterns=(rule,))
    )
    text, (final,) = await _generate(stub, tenant, prompt=prompt, max_output_tokens=120)
    assert final.finish_reason == resources.FINISH_REASON_CONTENT_FILTER
    assert f"{policy.label} rule output_block_pattern:0" in final.finish_message
    assert free.startswith(text) and len(text) < len(free)


async def test_the_scan_window_s_edges_stop_no_answer(worker, catalog, tenant):
    # The window began at a cut through a word ("kers" of "workers" was a word of its
    # own to \b) and, mid-stream, ended where the text generated so far did ($).
    service, stub = worker
    prompt = "the quick brown fox"
    free, (plain,) = await _generate(stub, f"free-{tenant}", prompt=prompt, max_output_tokens=120)
    words = sorted(set(free.split()))
    suffixes = sorted({w[i:] for w in words for i in range(1, len(w) - 1)} - set(words))
    rules = [
        PatternRule(rf"\b(?:{'|'.join(suffixes[i : i + 30])})\b")
        for i in range(0, len(suffixes), 30)
    ][:31]
    last = free.split()[-1]
    rules.append(PatternRule(f"(?:{'|'.join(w for w in words if w != last)})$"))
    assert all(regex.search(r.pattern, free) is None for r in rules)
    policy = Policy(f"edges-{tenant}", 0, output_block_patterns=tuple(rules))
    await _attach(service, catalog, tenant, policy)
    text, (final,) = await _generate(stub, tenant, prompt=prompt, max_output_tokens=120)
    assert final.finish_message == ""
    assert (final.finish_reason, text) == (plain.finish_reason, free)


async def test_sample_streams_are_bounded_in_bytes_under_concurrent_writes(redis_url):
    # 100 k entries of up to ~590 KB each were the only bound: ~59 GB per tenant.
    client = aioredis.from_url(redis_url)
    tenant = f"bytes-{uuid.uuid4().hex[:8]}"
    try:
        built = [
            samples.build(
                request_id=f"r{i}",
                tenant=tenant,
                key_id="k",
                model=("m", "1"),
                rpc="/x",
                input_text=f"{i:04d} " + "lorem ipsum " * 900,
                outputs=["dolor sit amet " * 700] * 8,
                finish_reason="stop",
                policy_hits=[],
            )
            for i in range(40)
        ]
        sizes = [len(s.SerializeToString()) for s in built]
        assert max(sizes) <= samples.MAX_SAMPLE_BYTES
        budget = 4 * samples.MAX_SAMPLE_BYTES
        await asyncio.gather(*(samples.write(client, s, max_bytes=budget) for s in built))
        entries = await client.xrange(samples.stream_key(tenant))
        kept = [len(fields[b"sample"]) for _, fields in entries]
        assert 0 < sum(kept) <= budget and len(kept) < len(built)
        # The running totals were read and written atomically: each entry's total is
        # the one before it plus its own size.
        totals = [int(fields[b"total"]) for _, fields in entries]
        assert all(b - a == k for a, b, k in zip(totals, totals[1:], kept[1:], strict=False))
        assert totals[-1] == sum(sizes)
    finally:
        await client.delete(samples.stream_key(tenant))
        await client.aclose()


async def test_a_sampled_request_s_sample_is_bounded_in_bytes(model_server, catalog, tenant):
    # Each text was kept up to 64 K characters: an Embed's inputs alone made a sample
    # of ~64 KB, and a Generate's 8 outputs more.
    service, channel = model_server
    await catalog.set_samples(SampleSettings(tenant, 1.0, "admin", time.time(), "ticket"))
    await service.policies.refresh()
    request = pb.EmbedRequest(
        model=EMBEDDER,
        inputs=["lorem ipsum dolor " * 1100] * 4,
        truncate=resources.TRUNCATION_END,
        request_id=f"big-{tenant}",
    )
    await rpc.InferenceServiceStub(channel).Embed(request, metadata=_metadata(tenant))
    (sample,) = await _samples(catalog.redis, tenant, 1)
    assert sample.request_id == f"big-{tenant}"
    assert len(sample.SerializeToString()) <= 32 * 1024  # MAX_SAMPLE_BYTES, documented
    assert sample.input.startswith("lorem ipsum dolor")


async def test_older_samples_without_sizes_and_long_backlogs_are_trimmed_too(redis_url):
    # Entries written before sizes were kept go once the newer ones fill the budget;
    # a budget lowered under a long stream is reached over a few writes (64 a write).
    client = aioredis.from_url(redis_url)
    tenant = f"legacy-{uuid.uuid4().hex[:8]}"
    key = samples.stream_key(tenant)

    def sample(i: int) -> policy_pb2.Sample:
        return policy_pb2.Sample(request_id=f"r{i:03d}", tenant=tenant, input="x" * 1000)

    try:
        for i in range(3):
            await client.xadd(key, {"sample": sample(i).SerializeToString()})
        size = len(sample(10).SerializeToString())
        await samples.write(client, sample(10), max_bytes=3 * size)
        assert await client.xlen(key) == 4  # the budget is not full yet: all kept
        for i in range(11, 14):
            await samples.write(client, sample(i), max_bytes=3 * size)
        ids = [s.request_id for s in (await samples.read(client, tenant, 0, "", 100))[0]]
        assert ids == ["r011", "r012", "r013"]
        for i in range(200):
            await samples.write(client, sample(100 + i), max_bytes=1000 * size)
        for i in range(4):
            await samples.write(client, sample(400 + i), max_bytes=2 * size)
        ids = [s.request_id for s in (await samples.read(client, tenant, 0, "", 300))[0]]
        assert ids == ["r402", "r403"]
    finally:
        await client.delete(key)
        await client.aclose()


def _prose(chars: int, seed: int) -> str:
    """Returns harmless prose with PII in it (every detector has work)."""
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over the lazy dog call 555-123-4567 mail "
        "john.doe@example.com ip 10.0.0.1 and then some more text"
    ).split()
    return " ".join(rng.choice(words) for _ in range(chars // 4))[:chars]


async def _queued_checks(count: int) -> None:
    """Waits until `count` input checks wait for a check thread (all of them busy)."""
    async with asyncio.timeout(30):
        while content._CHECKS.waiting() < count:
            await asyncio.sleep(0.01)


async def test_a_short_prompt_is_not_queued_behind_another_tenant_s_big_checks(
    model_server, catalog, tenant
):
    # Tenant A's Embeds of 256 x 8 K characters take ~1 s each to check on the two
    # check threads; tenant B's policy has one keyword, so its 11-character input
    # went to the same threads, first come first served, and waited 1.2-3.4 s.
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    big = [_prose(8000, seed) for seed in range(255)] + ["card 4111 1111 1111 1111"]
    detectors = {d: "redact" for d in pii.DETECTORS} | {"card": "block"}
    await _attach(service, catalog, tenant, Policy(f"pii-{tenant}", 0, pii=detectors))
    other = f"b-{tenant}"
    keyword = Policy(f"kw-{tenant}", 0, block_keywords=(PatternRule("forbidden"),))
    await _attach(service, catalog, other, keyword)
    heavy = [
        asyncio.ensure_future(
            stub.Embed(pb.EmbedRequest(model=EMBEDDER, inputs=big), metadata=_metadata(tenant))
        )
        for _ in range(4)
    ]
    try:
        await _queued_checks(2)  # two checking, two waiting
        started = time.perf_counter()
        await stub.Embed(
            pb.EmbedRequest(model=EMBEDDER, inputs=["hello there"]), metadata=_metadata(other)
        )
        waited = time.perf_counter() - started
        assert waited < 1.0, f"the short input waited {waited:.2f} s"  # ~10 ms alone
        assert not any(call.done() for call in heavy)  # answered before any big check ended
    finally:
        for call in await asyncio.gather(*heavy, return_exceptions=True):
            assert isinstance(call, grpc.aio.AioRpcError), call
            assert call.code() == grpc.StatusCode.INVALID_ARGUMENT  # checked to the end


def _heavy_embeds(stub, tenant: str, count: int) -> list[asyncio.Future[Any]]:
    """Starts `count` Embeds whose input check takes ~1 s each (256 x 8 K characters
    under every PII detector; a card in the last input blocks them at the end)."""
    big = [_prose(8000, seed) for seed in range(255)] + ["card 4111 1111 1111 1111"]
    return [
        asyncio.ensure_future(
            stub.Embed(pb.EmbedRequest(model=EMBEDDER, inputs=big), metadata=_metadata(tenant))
        )
        for _ in range(count)
    ]


def _on_a_thread(seed: int) -> list[str]:
    """Returns harmless inputs too long to be checked on the event loop."""
    return [_prose(500, seed * 100 + i) for i in range(40)]  # 20 K characters, 40 inputs


async def _pii_and_keyword_tenants(service, catalog, tenant: str) -> str:
    """Attaches every PII detector to `tenant`, a keyword to another; returns the other."""
    detectors = {d: "redact" for d in pii.DETECTORS} | {"card": "block"}
    await _attach(service, catalog, tenant, Policy(f"pii-{tenant}", 0, pii=detectors))
    other = f"b-{tenant}"
    keyword = Policy(f"kw-{tenant}", 0, block_keywords=(PatternRule("forbidden"),))
    await _attach(service, catalog, other, keyword)
    return other


async def _cancelled(calls: list[asyncio.Future[Any]]) -> None:
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_a_big_check_waits_for_one_of_another_tenant_s_checks_not_its_backlog(
    model_server, catalog, tenant
):
    # The check threads served their queue first come first served: a tenant's big
    # input (checked on a thread) waited for every check another tenant had queued.
    # The tenants take turns now: it waits for the running checks and one more.
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    other = await _pii_and_keyword_tenants(service, catalog, tenant)
    heavy = _heavy_embeds(stub, tenant, 6)
    try:
        async with asyncio.timeout(30):
            while content._CHECKS.waiting(tenant) < 4:  # two checking, four waiting
                await asyncio.sleep(0.01)
        # Blocked by its keyword at the end: answered as soon as its check ends.
        inputs = [*_on_a_thread(7), "this one is forbidden"]
        with pytest.raises(grpc.aio.AioRpcError) as blocked:
            await stub.Embed(
                pb.EmbedRequest(model=EMBEDDER, inputs=inputs), metadata=_metadata(other)
            )
        left = sum(not call.done() for call in heavy)
        assert blocked.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert left >= 3, f"{6 - left} of the other tenant's 6 big checks went first"
    finally:
        await _cancelled(heavy)


async def test_a_tenant_past_its_waiting_checks_is_refused_queue_full(
    model_server, catalog, tenant, monkeypatch
):
    service, channel = model_server
    stub = rpc.InferenceServiceStub(channel)
    other = await _pii_and_keyword_tenants(service, catalog, tenant)
    monkeypatch.setattr(content._CHECKS, "max_waiting", 2)
    # Both check threads held (as by two long checks) until the gate opens: what
    # waits and what is refused does not depend on how fast a check runs.
    gate, running = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        running.release()
        gate.wait(30)

    holders = [
        asyncio.ensure_future(content._CHECKS.run("holder", hold))
        for _ in range(content.CHECK_THREADS)
    ]

    def embed(who: str, seed: int) -> asyncio.Future[Any]:
        request = pb.EmbedRequest(model=EMBEDDER, inputs=_on_a_thread(seed))
        future: asyncio.Future[Any] = asyncio.ensure_future(
            stub.Embed(request, metadata=_metadata(who))
        )
        return future

    waiting: list[asyncio.Future[Any]] = []
    try:
        async with asyncio.timeout(30):
            for _ in range(content.CHECK_THREADS):
                await asyncio.to_thread(running.acquire)
            waiting = [embed(tenant, 10), embed(tenant, 12)]
            while content._CHECKS.waiting(tenant) < 2:
                await asyncio.sleep(0.01)
            refused = stub.Embed(
                pb.EmbedRequest(model=EMBEDDER, inputs=_on_a_thread(9)),
                metadata=_metadata(tenant),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await _error_info(refused)).reason == "QUEUE_FULL"
            # Another tenant's check waits its turn: not refused for this one's.
            waiting.append(embed(other, 14))
            while content._CHECKS.waiting(other) < 1:
                await asyncio.sleep(0.01)
            gate.set()
            answers = await asyncio.gather(*waiting)
        assert [len(a.embeddings) for a in answers] == [40, 40, 40]
    finally:
        gate.set()
        await asyncio.gather(*holders, *waiting, return_exceptions=True)


async def test_sample_builds_never_queue_ahead_of_an_input_check(redis_url):
    # Samples were built on the check threads: a burst of sampled requests (every
    # detector on up to nine texts each) delayed every tenant's next input check.
    client = aioredis.from_url(redis_url)
    tenant = f"sb-{uuid.uuid4().hex[:8]}"
    text = _prose(samples.MAX_TEXT_CHARS, 1)
    try:
        for i in range(8):
            sampled = content.RequestContent(sampled=True, redis=client, input_text=text)
            event = inference_pb2.UsageEvent(request_id=f"r{i}", tenant=tenant, key_id="k")
            sampled.record(event, [text] * 8)
        await asyncio.sleep(0)  # each write task starts: its build is submitted
        policy = Policy("kw", 1, block_keywords=(PatternRule("forbidden"),))
        checked = await content._check([policy], [_prose(4000, 2)], "prompt", tenant)
        assert checked.hits == []
        # Each build takes ~0.1 s: none of the eight was ahead of the check.
        assert await client.xlen(samples.stream_key(tenant)) <= 1
        async with asyncio.timeout(60):
            while await client.xlen(samples.stream_key(tenant)) < 8:
                await asyncio.sleep(0.05)
    finally:
        await client.delete(samples.stream_key(tenant))
        await client.aclose()
