"""Long prompts are tokenized off the event loop, judged by what is tokenized (a render's
output), not by the request's size; a render longer than the model's context can hold
is refused as it renders, before anything is tokenized."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.inference.models import LoadedModel
from services.inference.repository import deterministic_test_model
from services.inference.scheduler import SchedulerLimits
from services.inference.templates import declare
from services.inference.tokenizer import HuggingFaceTokenizer, Tokenizer, WordTokenizer
from services.inference.v2 import prompting
from services.inference.v2.validation import GenerationSpec
from services.router.prompts import PromptTemplate
from tokenmesh.inference.v2 import inference_service_pb2 as pb

DEMO_LM = Path(__file__).parents[2] / "models" / "demo-lm" / "1" / "tokenizer.json"
# ~100 characters of request that render to 256 000 (templates.MAX_OUTPUT_CHARS allows it).
AMPLIFIER = "{{ (text ~ ' ') * (times | int) }}"
AMPLIFIED = {"text": "And God said let there be light", "times": "8000"}


class _Threads:
    """Records the thread each encode ran on."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def record(self) -> None:
        self.seen.append(threading.get_ident())


class _RecordingWords(WordTokenizer):
    def __init__(self, threads: _Threads) -> None:
        super().__init__()
        self.threads = threads

    def encode(self, text: str) -> list[int]:
        self.threads.record()
        return super().encode(text)

    def encode_marked(self, text: str) -> list[int]:
        self.threads.record()
        return super().encode_marked(text)


class _RecordingDemoLm(HuggingFaceTokenizer):
    def __init__(self, threads: _Threads) -> None:
        super().__init__(DEMO_LM)
        self.threads = threads

    def encode(self, text: str) -> list[int]:
        self.threads.record()
        return super().encode(text)

    def encode_marked(self, text: str) -> list[int]:
        self.threads.record()
        return super().encode_marked(text)


def _model(tokenizer: Tokenizer, context_length: int = 100_000) -> LoadedModel:
    model = deterministic_test_model("m", "1", 0.0, SchedulerLimits())
    return dataclasses.replace(model, tokenizer=tokenizer, context_length=context_length)


class _Cache:
    """The one template a test renders (the worker's TemplateCache, already warm)."""

    def __init__(self, template: PromptTemplate) -> None:
        self.template = template

    async def get(self, name: str, selector: str) -> PromptTemplate:
        return self.template


def _template(source: str) -> tuple[PromptTemplate, _Cache]:
    template = PromptTemplate("t", 1, source, "", declare(source, "", ()))
    _ = template.prompt  # compiled, as the cache does it (off the loop) before a render
    return template, _Cache(template)


def _spec(**fields: object) -> GenerationSpec:
    return GenerationSpec.from_pb(pb.CompleteRequest(model="m", **fields))  # type: ignore[arg-type]


async def test_a_small_request_that_renders_long_is_tokenized_off_the_event_loop():
    threads = _Threads()
    template, cache = _template(AMPLIFIER)
    spec = _spec(template="t@1", variables=AMPLIFIED)
    prepared = await prompting.prepare(spec, _model(_RecordingWords(threads)), cache)
    assert len(prepared.token_ids) == 7 * 8000
    assert threads.seen and threading.get_ident() not in threads.seen


@pytest.mark.parametrize(
    "source",
    [
        AMPLIFIER,
        "{{ (text ~ ' ') * 8000 }}",  # the operator's own constant
        "{{ ((text ~ ' ') * (times | int)).split() | join(' ') }}",  # ~150 ms of filters
    ],
)
def test_a_template_that_does_more_than_print_its_values_renders_in_a_thread(source):
    template, _ = _template(source)
    assert not prompting._renders_inline(_spec(template="t@1", variables=AMPLIFIED), template)


async def test_short_renders_stay_on_the_event_loop():
    threads = _Threads()
    model = _model(_RecordingWords(threads))
    template, cache = _template("Q: {{ ask }} {% for m in messages %}{{ m.content }}{% endfor %}")
    substitution, substitution_cache = _template("Q: {{ ask }} A: {{ messages[0].content }}")
    await prompting.prepare(_spec(prompt="the mesh routes"), model, None)
    await prompting.prepare(
        _spec(template="t@1", prompt="x", variables={"ask": "a"}), model, substitution_cache
    )
    assert len(threads.seen) >= 2 and set(threads.seen) == {threading.get_ident()}
    assert not prompting._renders_inline(_spec(template="t@1", variables={"ask": "a"}), template)


async def test_a_render_past_the_context_is_refused_before_it_is_tokenized():
    threads = _Threads()
    model = _model(_RecordingDemoLm(threads), context_length=512)
    template, cache = _template(AMPLIFIER)
    with pytest.raises(InvalidArgument) as info:
        await prompting.prepare(_spec(template="t@1", variables=AMPLIFIED), model, cache)
    assert info.value.reason == "CONTEXT_LENGTH_EXCEEDED"
    assert [v.field for v in info.value.violations] == ["template"]
    assert not threads.seen, "refused as it rendered: nothing was tokenized"
    with pytest.raises(InvalidArgument) as info:
        await prompting.prepare(_spec(prompt="And God said " * 1000), model, None)
    assert [v.field for v in info.value.violations] == ["prompt"]
    assert not threads.seen
    fits = await prompting.prepare(_spec(prompt="a " * 255), model, None)
    assert 255 <= len(fits.token_ids) <= 512


@pytest.mark.parametrize(
    "text",
    [
        " Nebuchadnezzar" * 300,  # the longest tokens there are
        "And God said, Let there be light: and there was light. " * 40,
        "\u00e9\u4e2d\U0001f600 ~~~~~~~ 12345 " * 40,  # multi-byte characters
    ],
)
def test_the_character_bound_never_refuses_a_text_that_fits(text):
    tokenizer = HuggingFaceTokenizer(DEMO_LM)
    per_token = tokenizer.max_token_chars()
    assert per_token is not None
    assert len(text) <= len(tokenizer.encode(text)) * per_token
    assert WordTokenizer().max_token_chars() is None, "it drops spaces: no bound"


async def test_tokenizing_a_long_text_in_a_thread_lets_the_event_loop_run():
    # `tokenizers` holds the GIL through `encode`: the loop could not run at all while
    # a thread tokenized 256 000 characters (0.4-1.9 s here). A ratio, not a time:
    # the loop's longest wait must be a small part of the tokenization, not all of it.
    tokenizer = HuggingFaceTokenizer(DEMO_LM)
    text = "And God said let there be light " * 8000
    encoding = asyncio.ensure_future(asyncio.to_thread(tokenizer.encode, text))
    ticks = [time.perf_counter()]
    while not encoding.done():
        await asyncio.sleep(0)
        ticks.append(time.perf_counter())
    assert len(await encoding) > 50_000
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < (ticks[-1] - ticks[0]) / 2, f"the loop waited {longest:.3f} s in one go"
