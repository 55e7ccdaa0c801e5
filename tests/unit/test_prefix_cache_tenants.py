"""The prefix cache is scoped by tenant: no tenant learns another's prompts from its usage.

A request's `cached_prompt_tokens` (usage; OpenAI `prompt_tokens_details.cached_tokens`)
counts the prompt tokens the engine reused. With one cache for every tenant, a tenant
could confirm a guess of another tenant's prompt (or of its 16-token heads) by reading
that count. These run demo-lm through the real scheduler.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from services.inference.engines import prefix_cache
from services.inference.engines.base import StepItem
from services.inference.engines.onnx import OnnxGenerativeEngine
from services.inference.engines.prefix_cache import PrefixCache
from services.inference.sampling import SamplingParams
from services.inference.scheduler import (
    PRIORITY_INTERACTIVE,
    Finished,
    Scheduler,
    SchedulerLimits,
    Sequence_,
)

DEMO_LM = Path(__file__).resolve().parents[2] / "models" / "demo-lm" / "1"
CARD = json.loads((DEMO_LM / "config.json").read_text())
SHAPE = {k: CARD[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}
_LABELS = itertools.count()
PROMPT = [int(t) for t in np.random.default_rng(31).integers(1, 4000, 27)]  # a block and a tail


def _demo_lm(shared: bool = False) -> OnnxGenerativeEngine:
    return OnnxGenerativeEngine(
        DEMO_LM / "model.onnx",
        threads=1,
        prefix_cache_tokens=1024,
        prefix_cache_shared=shared,
        **SHAPE,
    )


async def _cached_tokens(sched: Scheduler, prompt: list[int], tenant: str) -> int:
    """Runs `prompt` for `tenant` (2 greedy tokens); returns its cached_prompt_tokens."""
    params = SamplingParams(max_tokens=2, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=())
    seq: Sequence_ = sched.submit(prompt, params, PRIORITY_INTERACTIVE, None, tenant=tenant)
    async with asyncio.timeout(10):
        while True:
            if any(isinstance(item, Finished) for item in await seq.outbox.take()):
                break
    assert seq.finished == Finished("length")
    return seq.cached_prompt_tokens


async def _scheduler(engine: OnnxGenerativeEngine) -> Scheduler:
    limits = SchedulerLimits(max_sequences=2)
    sched = Scheduler(engine, -1, limits, (f"prefix-tenants-{next(_LABELS)}", "1"))
    await sched.start()
    return sched


async def test_a_tenant_never_hits_another_tenants_prompt():
    sched = await _scheduler(_demo_lm())
    try:
        assert await _cached_tokens(sched, PROMPT, "a") == 0
        # Before: b's usage said 27 cached tokens, i.e. "someone sent exactly this".
        assert await _cached_tokens(sched, PROMPT, "b") == 0
        # Nor a head: a prompt sharing a's first 16-token block computes it all.
        assert await _cached_tokens(sched, PROMPT[:16] + [5, 6, 7], "c") == 0
        assert await _cached_tokens(sched, PROMPT, "") == 0  # internal callers: their own
        # Each tenant still reuses its own prompts, whole or by their heads.
        assert await _cached_tokens(sched, PROMPT, "a") == len(PROMPT)
        assert await _cached_tokens(sched, PROMPT, "b") == len(PROMPT)
        assert await _cached_tokens(sched, PROMPT[:16] + [5, 6, 7], "a") == 16
        assert await _cached_tokens(sched, PROMPT, "") == len(PROMPT)
    finally:
        await sched.stop(drain_timeout_s=0)


async def test_a_shared_models_tenants_reuse_each_others_prompts():
    sched = await _scheduler(_demo_lm(shared=True))
    try:
        assert await _cached_tokens(sched, PROMPT, "a") == 0
        assert await _cached_tokens(sched, PROMPT, "b") == len(PROMPT)
        assert await _cached_tokens(sched, PROMPT[:16] + [5, 6, 7], "c") == 16
    finally:
        await sched.stop(drain_timeout_s=0)


@pytest.mark.parametrize("shared", [False, True])
def test_the_same_prompt_twice_in_one_step_is_copied_only_within_a_scope(shared):
    engine = _demo_lm(shared)
    engine.allocate(4)
    step = [StepItem(s, PROMPT, 0, tenant) for s, tenant in enumerate(("a", "b", "a", "b"))]
    logits = engine.forward(step)
    reused = [engine.take_reused_tokens(s) for s in range(4)]
    n = len(PROMPT)
    assert reused == ([0, n, n, n] if shared else [0, 0, n, n])
    assert all(np.abs(row - logits[0]).max() < 1e-4 for row in logits)


def test_scopes_whose_seeds_collide_still_share_nothing(monkeypatch):
    # Blocks are confirmed by their scope too, not by the chain key alone.
    monkeypatch.setattr(prefix_cache, "_seed", lambda scope: 0)
    cache = PrefixCache(100, block=2)
    kv = [np.ones((1, 8, 1), np.float32)]
    cache.store([1, 2, 3, 4, 5], kv, np.zeros(3, np.float32), "a")
    assert cache.lookup([1, 2, 3, 4, 5], "b") is None
    assert cache.lookup([1, 2, 3, 4, 9], "b") is None
    cache.store([1, 2, 3, 4, 5], kv, np.zeros(3, np.float32), "b")  # a's blocks are not b's
    hit = cache.lookup([1, 2, 3, 4, 9], "a")
    assert hit is not None and hit.matched == 4
