"""Engines: the ONNX decoder's batched KV cache, and TensorRT (GPU only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from services.inference.engines.base import StepItem
from services.inference.engines.onnx import (
    OnnxGenerativeEngine,
    _agrees,
    _decode_session,
    session_options,
)
from services.inference.engines.onnx_decode import DecodeShape, UnsupportedGraph, build_decode_graph
from services.inference.engines.tensorrt import plan_cache_key, tensorrt_available
from services.inference.repository import EngineOptions, _generative_engine
from services.inference.sampling import SamplingParams
from services.inference.scheduler import PRIORITY_INTERACTIVE, Finished, Scheduler, SchedulerLimits

DEMO_LM = Path(__file__).resolve().parents[2] / "models" / "demo-lm" / "1"


CARD = json.loads((DEMO_LM / "config.json").read_text())
SHAPE = {k: CARD[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}


def _demo_lm(prefix_cache_tokens: int = 0, in_place_decode: bool = True) -> OnnxGenerativeEngine:
    engine = OnnxGenerativeEngine(
        DEMO_LM / "model.onnx",
        threads=1,
        prefix_cache_tokens=prefix_cache_tokens,
        in_place_decode=in_place_decode,
        **SHAPE,
    )
    engine.allocate(4)
    return engine


@pytest.fixture(scope="module", params=["in-place", "padded"])
def engine(request: pytest.FixtureRequest) -> OnnxGenerativeEngine:
    """demo-lm, once with each decode path: every equivalence below holds for both."""
    built = _demo_lm(in_place_decode=request.param == "in-place")
    assert built.decode_path == request.param
    return built


@pytest.fixture
def cached() -> OnnxGenerativeEngine:
    """An engine with a prefix cache (16-token blocks), fresh for each test."""
    return _demo_lm(prefix_cache_tokens=1024)


def test_batched_decode_of_unequal_lengths_matches_one_at_a_time(engine):
    prompts = {0: [5, 6, 7, 8, 9], 1: [10, 11], 2: [12, 13, 14]}
    # Reference: each sequence alone (prefill, then one decode).
    alone = {}
    for slot, ids in prompts.items():
        engine.forward([StepItem(slot, ids, 0)])
        alone[slot] = engine.forward([StepItem(slot, [42], len(ids))])[0]
    # Same again, but the decode steps of all three share one padded batch.
    for slot, ids in prompts.items():
        engine.forward([StepItem(slot, ids, 0)])
    batched = engine.forward([StepItem(slot, [42], len(ids)) for slot, ids in prompts.items()])
    for row, slot in enumerate(prompts):
        assert np.abs(batched[row] - alone[slot]).max() < 1e-4


def test_incremental_decoding_matches_a_full_prefill(engine):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    full = engine.forward([StepItem(0, ids, 0)])[0]
    engine.forward([StepItem(1, ids[:5], 0)])
    for position in range(5, len(ids)):
        last = engine.forward([StepItem(1, [ids[position]], position)])[0]
    assert np.abs(last - full).max() < 1e-4


def test_plan_cache_key_changes_with_model_gpu_and_version():
    base = plan_cache_key(b"model", "NVIDIA H200", "90", "10.9.0")
    assert base == plan_cache_key(b"model", "NVIDIA H200", "90", "10.9.0")
    assert (
        len(
            {
                base,
                plan_cache_key(b"other", "NVIDIA H200", "90", "10.9.0"),
                plan_cache_key(b"model", "NVIDIA L4", "89", "10.9.0"),
                plan_cache_key(b"model", "NVIDIA H200", "90", "10.10.0"),
            }
        )
        == 4
    )


AVAILABLE, WHY = tensorrt_available()


@pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT engine test needs TensorRT and a GPU: {WHY}")
def test_tensorrt_matches_onnx_runtime(engine, tmp_path):  # pragma: no cover - GPU machines only
    from services.inference.engines.tensorrt import TensorRTGenerativeEngine

    card = json.loads((DEMO_LM / "config.json").read_text())
    shape = {k: card[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")}
    trt_engine = TensorRTGenerativeEngine(DEMO_LM / "model.onnx", cache_dir=tmp_path, **shape)
    trt_engine.allocate(2)
    ids = [5, 6, 7, 8]
    expected = engine.forward([StepItem(0, ids, 0)])[0]
    got = trt_engine.forward([StepItem(0, ids, 0)])[0]
    assert np.argmax(got) == np.argmax(expected)
    assert np.abs(got - expected).max() < 0.05  # FP16 plan
    assert list(tmp_path.glob("*.plan")), "the plan was cached"


def test_batched_prefill_of_unequal_prompts_matches_one_at_a_time(engine):
    prompts = {0: [5, 6, 7, 8, 9, 10, 11], 1: [12], 2: [13, 14, 15]}
    alone = {slot: engine.forward([StepItem(slot, ids, 0)])[0] for slot, ids in prompts.items()}
    after_alone = {
        slot: engine.forward([StepItem(slot, [42], len(ids))])[0] for slot, ids in prompts.items()
    }
    batched = engine.forward([StepItem(slot, ids, 0) for slot, ids in prompts.items()])
    for row, slot in enumerate(prompts):
        assert np.abs(batched[row] - alone[slot]).max() < 1e-4
    # The KV written by the batched prefill serves the next decode just as well.
    decoded = engine.forward([StepItem(slot, [42], len(ids)) for slot, ids in prompts.items()])
    for row, slot in enumerate(prompts):
        assert np.abs(decoded[row] - after_alone[slot]).max() < 1e-4


def _alone(engine: OnnxGenerativeEngine, ids: list[int], fed: list[int]) -> list[np.ndarray]:
    """Logits of one sequence decoded by itself (in slot 3): the reference."""
    engine.forward([StepItem(3, ids, 0)])
    return [engine.forward([StepItem(3, [t], len(ids) + i)])[0] for i, t in enumerate(fed)]


def test_steady_batched_decoding_matches_one_at_a_time_across_joins_and_slot_reuse(engine):
    rng = np.random.default_rng(7)
    prompts = {slot: list(rng.integers(1, 4000, n)) for slot, n in ((0, 4), (1, 9), (2, 6))}
    steps = 5

    tokens = [int(t) for t in rng.integers(1, 4000, steps)]
    expected = {slot: _alone(engine, ids, tokens) for slot, ids in prompts.items()}
    # Slots 0 and 1 decode together for a few steps (the carried path), then
    # slot 2 joins, then slot 1 is taken over by a new prompt of the same length.
    engine.forward([StepItem(0, prompts[0], 0), StepItem(1, prompts[1], 0)])
    for i in range(2):
        got = engine.forward([StepItem(s, [tokens[i]], len(prompts[s]) + i) for s in (0, 1)])
        for row, slot in enumerate((0, 1)):
            assert np.abs(got[row] - expected[slot][i]).max() < 1e-4
    engine.forward([StepItem(2, prompts[2], 0)])
    engine.forward([StepItem(2, [tokens[0]], len(prompts[2]))])
    for i in range(2, steps):
        items = [StepItem(s, [tokens[i]], len(prompts[s]) + i) for s in (0, 1)]
        items.append(StepItem(2, [tokens[i - 1]], len(prompts[2]) + i - 1))
        got = engine.forward(items)
        assert np.abs(got[0] - expected[0][i]).max() < 1e-4
        assert np.abs(got[1] - expected[1][i]).max() < 1e-4
        assert np.abs(got[2] - expected[2][i - 1]).max() < 1e-4
    # A new sequence takes slot 1 right after a (0, 1) step, with a prompt that
    # ends where the old sequence would have gone on: the next (0, 1) step
    # matches the carried layout, yet must not reuse the old sequence's cache.
    fresh = [int(t) for t in rng.integers(1, 4000, len(prompts[1]) + steps + 1)]
    reference = _alone(engine, fresh, tokens[:1])[0]
    engine.forward([StepItem(s, [tokens[0]], len(prompts[s]) + steps) for s in (0, 1)])
    engine.forward([StepItem(1, fresh, 0)])
    next_of_0 = StepItem(0, [tokens[1]], len(prompts[0]) + steps + 1)
    got = engine.forward([next_of_0, StepItem(1, [tokens[0]], len(fresh))])
    assert np.abs(got[1] - reference).max() < 1e-4


def test_sequences_leaving_and_joining_keep_the_carried_rows_and_match_one_at_a_time(engine):
    rng = np.random.default_rng(11)
    prompts = {0: 9, 1: 7, 2: 8, 3: 4}  # slot 3's sequence joins later, in slot 1's old row
    prompts = {slot: [int(t) for t in rng.integers(1, 4000, n)] for slot, n in prompts.items()}
    tokens = [int(t) for t in rng.integers(1, 4000, 6)]

    expected = {slot: _alone(engine, ids, tokens) for slot, ids in prompts.items()}

    def decode(step: dict[int, int]) -> dict[int, np.ndarray]:
        """step: slot -> how many tokens it decoded before; returns slot -> logits."""
        items = [StepItem(s, [tokens[n]], len(prompts[s]) + n) for s, n in step.items()]
        return dict(zip(step, engine.forward(items), strict=True))

    engine.forward([StepItem(s, prompts[s], 0) for s in (0, 1, 2)])
    for n in range(2):
        for slot, logits in decode({0: n, 1: n, 2: n}).items():
            assert np.abs(logits - expected[slot][n]).max() < 1e-4
    # Slot 1 leaves; in the same step slot 3's prompt is prefilled (as the
    # scheduler does), then slot 3 decodes alongside 0 and 2.
    got = engine.forward(
        [StepItem(s, [tokens[2]], len(prompts[s]) + 2) for s in (0, 2)]
        + [StepItem(3, prompts[3], 0)]
    )
    assert np.abs(got[0] - expected[0][2]).max() < 1e-4
    rows_before = engine._carry.rows.tolist() if engine._carry is not None else []
    for n in range(3):
        got = decode({0: 3 + n, 2: 3 + n, 3: n})
        for slot, logits in got.items():
            assert np.abs(logits - expected[slot][3 + n if slot != 3 else n]).max() < 1e-4
    if engine.decode_path == "in-place":
        return  # no carried rows: the decoder works on the slots themselves
    # The carried path ran: slot 3 took slot 1's dead row, nothing was regathered.
    assert rows_before == [0, -1, 2]
    assert engine._carry.rows.tolist() == [0, 3, 2]


def test_a_prefill_only_step_keeps_the_decoding_rows_for_the_next_step(engine):
    rng = np.random.default_rng(13)
    prompts = {0: 6, 1: 9, 2: 5, 3: 3}
    prompts = {slot: [int(t) for t in rng.integers(1, 4000, n)] for slot, n in prompts.items()}
    tokens = [int(t) for t in rng.integers(1, 4000, 5)]

    expected = {slot: _alone(engine, ids, tokens) for slot, ids in prompts.items()}
    engine.forward([StepItem(s, prompts[s], 0) for s in (0, 1, 2)])
    engine.forward([StepItem(s, [tokens[0]], len(prompts[s])) for s in (0, 1, 2)])
    engine.forward([StepItem(s, [tokens[1]], len(prompts[s]) + 1) for s in (0, 2)])  # 1 left
    engine.forward([StepItem(3, prompts[3], 0)])  # the scheduler's prefill-only step
    padded = engine.decode_path == "padded"
    assert not padded or (engine._carry is not None and engine._carry.rows.tolist() == [0, -1, 2])
    for n in range(2):
        got = engine.forward(
            [StepItem(s, [tokens[2 + n]], len(prompts[s]) + 2 + n) for s in (0, 2)]
            + [StepItem(3, [tokens[n]], len(prompts[3]) + n)]
        )
        assert np.abs(got[0] - expected[0][2 + n]).max() < 1e-4
        assert np.abs(got[1] - expected[2][2 + n]).max() < 1e-4
        assert np.abs(got[2] - expected[3][n]).max() < 1e-4
    assert not padded or engine._carry.rows.tolist() == [0, 3, 2]  # no regather: 3 took 1's row


def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_decodes_the_same(engine, cached):
    ids = [int(t) for t in np.random.default_rng(17).integers(1, 4000, 12)]
    reference = _alone(engine, ids, [42, 43])
    first = cached.forward([StepItem(0, ids, 0)])[0]
    again = cached.forward([StepItem(1, ids, 0)])[0]  # another slot: copied, not computed
    assert cached.prefix_cache.stats.exact_hits == 1
    assert np.array_equal(again, first)
    got = [cached.forward([StepItem(1, [t], len(ids) + i)])[0] for i, t in enumerate([42, 43])]
    for logits, expected in zip(got, reference, strict=True):
        assert np.abs(logits - expected).max() < 1e-4


def test_a_prompt_sharing_whole_blocks_computes_only_its_tail(engine, cached):
    rng = np.random.default_rng(19)
    system = [int(t) for t in rng.integers(1, 4000, 20)]  # one whole 16-token block
    first, second = system + [7, 8, 9], system[:16] + [int(t) for t in rng.integers(1, 4000, 6)]
    expected_prefill = engine.forward([StepItem(3, second, 0)])[0]
    expected_decode = engine.forward([StepItem(3, [42], len(second))])[0]
    cached.forward([StepItem(0, first, 0)])
    got = cached.forward([StepItem(2, second, 0)])[0]
    assert cached.prefix_cache.stats.partial_hits == 1
    assert cached.prefix_cache.stats.reused_tokens == 16
    assert np.abs(got - expected_prefill).max() < 1e-4
    decoded = cached.forward([StepItem(2, [42], len(second))])[0]
    assert np.abs(decoded - expected_decode).max() < 1e-4


def test_the_same_prompt_twice_in_one_step_gives_both_slots_its_history(engine):
    ids = [int(t) for t in np.random.default_rng(23).integers(1, 4000, 9)]
    reference = _alone(engine, ids, [42])[0]
    twice = engine.forward([StepItem(0, ids, 0), StepItem(1, ids, 0)])
    assert np.array_equal(twice[0], twice[1])
    decoded = engine.forward([StepItem(s, [42], len(ids)) for s in (0, 1)])
    for row in decoded:
        assert np.abs(row - reference).max() < 1e-4


def test_the_same_prompt_twice_in_one_step_counts_the_copy_as_reused(cached):
    ids = [int(t) for t in np.random.default_rng(29).integers(1, 4000, 9)]
    cached.forward([StepItem(0, ids, 0), StepItem(1, ids, 0)])
    stats = cached.prefix_cache.stats
    assert (stats.prompt_tokens, stats.reused_tokens) == (18, 9)  # one computed, one copied


def test_warm_up_leaves_an_empty_prefix_cache(cached):
    cached.warm_up(4)
    assert cached.prefix_cache.held_tokens == 0 and cached.prefix_cache.stats.lookups == 0


def test_demo_lm_decodes_in_place_and_another_graph_keeps_the_padded_path():
    shape = DecodeShape(CARD["n_layer"], CARD["n_head"], CARD["head_dim"], CARD["vocab_size"])
    assert _demo_lm().decode_path == "in-place"
    wrong = DecodeShape(shape.n_layer + 1, shape.n_head, shape.head_dim, shape.vocab_size)
    with pytest.raises(UnsupportedGraph, match="weight matrices"):
        build_decode_graph(DEMO_LM / "model.onnx", wrong)
    exported = _demo_lm(in_place_decode=False).session
    assert _decode_session(DEMO_LM / "model.onnx", wrong, session_options(1), exported) is None


@pytest.mark.parametrize("in_place", [True, False])
def test_the_engine_options_choose_a_loaded_models_decode_path(in_place):
    engine = _generative_engine(CARD, DEMO_LM, EngineOptions(in_place_decode=in_place))
    assert isinstance(engine, OnnxGenerativeEngine)
    assert engine.decode_path == ("in-place" if in_place else "padded")


def test_a_rebuilt_graph_that_computes_something_else_is_refused():
    shape = DecodeShape(CARD["n_layer"], CARD["n_head"], CARD["head_dim"], CARD["vocab_size"])
    exported = _demo_lm(in_place_decode=False).session
    graph = build_decode_graph(DEMO_LM / "model.onnx", shape)
    options = session_options(1)
    session = ort.InferenceSession(graph.SerializeToString(), options)
    assert _agrees(exported, session, shape)
    unembed = next(t for t in graph.graph.initializer if t.name == "unembed")
    unembed.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(unembed), "unembed"))
    assert not _agrees(exported, ort.InferenceSession(graph.SerializeToString(), options), shape)


def test_a_slot_prefilled_inside_the_decoded_slab_keeps_its_history():
    """In-place: slot 1 lies between decoding slots 0 and 2 but is prefilled in the
    same step; its row of the slab writes only the scratch position."""
    engine = _demo_lm()
    rng = np.random.default_rng(31)
    prompts = {
        slot: [int(t) for t in rng.integers(1, 4000, n)] for slot, n in ((0, 5), (1, 7), (2, 6))
    }
    expected = {slot: _alone(engine, ids, [42, 43]) for slot, ids in prompts.items()}
    engine.forward([StepItem(s, prompts[s], 0) for s in (0, 2)])
    got = engine.forward(
        [StepItem(s, [42], len(prompts[s])) for s in (0, 2)] + [StepItem(1, prompts[1], 0)]
    )
    assert np.abs(got[0] - expected[0][0]).max() < 1e-4
    got = engine.forward(
        [StepItem(1, [42], len(prompts[1]))]
        + [StepItem(s, [43], len(prompts[s]) + 1) for s in (0, 2)]
    )
    assert np.abs(got[0] - expected[1][0]).max() < 1e-4
    assert np.abs(got[1] - expected[0][1]).max() < 1e-4
    assert np.abs(got[2] - expected[2][1]).max() < 1e-4


def test_in_place_and_padded_decoding_agree_on_random_continuous_batching():
    """Sequences join (some sharing a head through the prefix cache), decode and
    leave at random, on both paths side by side: same logits, same tokens."""
    paths = [_demo_lm(prefix_cache_tokens=256, in_place_decode=flag) for flag in (True, False)]
    rng = np.random.default_rng(37)
    running: dict[int, tuple[list[int], list[int], int]] = {}  # slot -> prompt, generated, length
    for _ in range(120):
        free = [slot for slot in range(4) if slot not in running]
        if free and rng.random() < 0.5:
            head = next(iter(running.values()))[0][:18] if running and rng.random() < 0.3 else []
            prompt = head + [int(t) for t in rng.integers(1, 4000, int(rng.integers(2, 20)))]
            running[int(rng.choice(free))] = (prompt, [], int(rng.integers(3, 30)))
        if not running:
            continue
        starting = [slot for slot, (_, generated, _) in running.items() if not generated]
        items = [
            StepItem(s, running[s][0], 0)
            if not running[s][1]
            else StepItem(s, running[s][1][-1:], len(running[s][0]) + len(running[s][1]) - 1)
            for s in starting or list(running)
        ]
        in_place, padded = (engine.forward(items) for engine in paths)
        assert np.abs(in_place - padded).max() < 1e-4
        for item, token in zip(items, padded.argmax(axis=1).tolist(), strict=True):
            running[item.slot][1].append(token)
        for slot in [s for s, (_, generated, n) in running.items() if len(generated) >= n]:
            del running[slot]


class RecordingOnnxEngine(OnnxGenerativeEngine):
    """demo-lm, recording the slots of each decode step the scheduler runs."""

    def __init__(self, in_place_decode: bool) -> None:
        super().__init__(
            DEMO_LM / "model.onnx", threads=1, in_place_decode=in_place_decode, **SHAPE
        )
        self.decoded_slots: list[list[int]] = []

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        if all(item.start > 0 for item in items):
            self.decoded_slots.append(sorted(item.slot for item in items))
        return super().forward(items)


async def _greedy_tokens(scheduler: Scheduler, prompt: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens, 0.0, 1.0, 0, None, ())
    seq = scheduler.submit(prompt, params, PRIORITY_INTERACTIVE, None)
    tokens: list[int] = []
    while not isinstance(item := await seq.outbox.get(), Finished):
        tokens.append(item)
    return tokens


async def test_running_sequences_move_to_the_lowest_slots_and_decode_as_on_the_padded_path():
    """Short sequences leave 4 slots while long ones go on and others join: the
    scheduler moves the highest running sequence into each freed lower slot, so
    every decode step covers slots 0..n-1, and each text equals the padded
    path's (which moves nothing)."""
    rng = np.random.default_rng(41)
    requests = [
        ([int(t) for t in rng.integers(1, 4000, n)], tokens)
        for n, tokens in ((5, 3), (9, 40), (4, 6), (7, 50), (6, 2), (8, 30), (3, 12))
    ]
    texts, steps = {}, {}
    for in_place in (True, False):
        engine = RecordingOnnxEngine(in_place)
        # EOS never ends a request early: each runs to its max_tokens.
        scheduler = Scheduler(engine, -1, SchedulerLimits(max_sequences=4), ("t", "1"))
        await scheduler.start()
        try:
            runs = [_greedy_tokens(scheduler, prompt, n) for prompt, n in requests]
            texts[in_place] = await asyncio.gather(*runs)
        finally:
            await scheduler.stop(drain_timeout_s=0)
        steps[in_place] = engine.decoded_slots
    assert texts[True] == texts[False]
    assert [len(tokens) for tokens in texts[True]] == [n for _, n in requests]
    assert all(slots == list(range(len(slots))) for slots in steps[True])
    assert any(slots != list(range(len(slots))) for slots in steps[False])  # holes, unmoved


def test_decoding_up_to_the_last_position_of_the_context_agrees_on_both_paths():
    """A sequence fills the whole context, then sits in the slab without decoding:
    its dummy key/value goes to the scratch position, in bounds, read by no one."""
    context = CARD["context_length"]
    long = [int(t) for t in np.random.default_rng(43).integers(1, 4000, context - 4)]
    logits = []
    for in_place in (True, False):
        engine = _demo_lm(in_place_decode=in_place)
        engine.forward([StepItem(0, [5, 6], 0), StepItem(3, [8, 9, 10], 0)])
        engine.forward([StepItem(2, long, 0)])
        steps = [
            engine.forward([StepItem(0, [7], 2), StepItem(2, [9], position)])
            for position in range(len(long), context)  # slot 2 ends holding the whole context
        ]
        steps.append(engine.forward([StepItem(0, [7], 2), StepItem(3, [11], 3)]))
        logits.append(np.stack(steps))
    assert np.abs(logits[0] - logits[1]).max() < 1e-4
