"""The stream and record stages on their own, over a scripted generation (no engine).

`FakeGeneration` has what the stages read of a v2 Generation: its choices
(real `Choice` objects), the prompt, a scripted delta stream and the request's
identity; `FakeAdmission` answers budget checks and keeps recorded events.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest

from services.core.errors import Unavailable
from services.inference.generation import Delta
from services.inference.pipeline import record, stream
from services.inference.pipeline.content import RequestContent
from services.inference.v2.choices import Choice, request_finish_reason
from tokenmesh.inference.v1 import inference_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.type.v1 import types_pb2

Script = list[tuple[int, Delta] | Exception]


def _choice(index: int) -> Choice:
    now = time.monotonic()
    seq = SimpleNamespace(
        token_logprobs=[],
        started_at=now,
        submitted_at=now - 0.002,
        first_token_at=now + 0.001,
        last_token_at=now + 0.003,
    )
    return Choice(index=index, seq=cast(Any, seq), state=cast(Any, None))


@dataclass(eq=False)  # hashed by identity, as a Generation (Admission.open_streams)
class FakeGeneration:
    script: Script
    n: int = 1
    prompt_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    request_id: str = "req-1"
    sent_tokens: int = 0
    template: Any = None
    content: RequestContent = field(default_factory=RequestContent)
    spec: Any = field(default_factory=lambda: SimpleNamespace(logprobs=False))
    started: float = field(default_factory=time.monotonic)
    closed: bool = False
    unmetered: bool = True  # every message asks the fake admission's budget

    def __post_init__(self) -> None:
        self.choices = [_choice(i) for i in range(self.n)]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cached_prompt_tokens(self) -> int:
        return 1

    def model_ref(self) -> types_pb2.ModelRef:
        return types_pb2.ModelRef(name="m", version="1")

    def running(self) -> list[Choice]:
        return [c for c in self.choices if not c.finish_reason]

    def end_running(self, reason: str) -> None:
        for choice in self.running():
            choice.finish_reason = reason

    def finish_reason(self) -> str:
        return request_finish_reason([c.finish_reason for c in self.choices])

    async def deltas(self) -> AsyncGenerator[tuple[Choice, Delta], None]:
        try:
            for step in self.script:
                if isinstance(step, Exception):
                    raise step
                index, delta = step
                yield self.choices[index], delta
        finally:
            self.closed = True

    def usage_event(
        self, usage: types_pb2.TokenUsage, finish_reason: str, timing: v1_pb.Timing | None
    ) -> v1_pb.UsageEvent:
        return v1_pb.UsageEvent(
            request_id=self.request_id, usage=usage, finish_reason=finish_reason, timing=timing
        )


@dataclass
class FakeAdmission:
    budget_tokens: int = 1_000
    events: list[v1_pb.UsageEvent] = field(default_factory=list)
    open_streams: set[Any] = field(default_factory=set)
    streams_ended_by: Any = None

    async def within_budget(self, generation: FakeGeneration, used: int) -> bool:
        return used < self.budget_tokens

    def record(self, generation: FakeGeneration, event: v1_pb.UsageEvent) -> None:
        self.events.append(event)


async def _produce(admission: FakeAdmission, generation: FakeGeneration) -> list[Any]:
    return [m async for m in stream.produce(cast(Any, admission), cast(Any, generation))]


async def test_produce_sends_each_delta_and_ends_a_choice_with_its_outcome() -> None:
    generation = FakeGeneration([(0, Delta("a", [7])), (0, Delta("b", [8, 9], "length"))])
    messages = await _produce(FakeAdmission(), generation)
    assert [(m.text, list(m.token_ids)) for m in messages] == [("a", [7]), ("b", [8, 9])]
    assert all(m.request_id == "req-1" for m in messages)
    assert not messages[0].HasField("usage")
    last = messages[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 3)
    assert last.usage.total_tokens == 6 and last.usage.cached_prompt_tokens == 1
    assert last.model.name == "m" and last.timing.total_ms > 0
    assert generation.sent_tokens == 3 and generation.closed


async def test_produce_stops_every_running_choice_when_the_budget_runs_out() -> None:
    script: Script = [(0, Delta("a", [1])), (1, Delta("b", [2])), (0, Delta("c", [3]))]
    generation = FakeGeneration(script, n=2)
    messages = await _produce(FakeAdmission(budget_tokens=5), generation)  # 3 prompt + 2 sent
    assert [m.text for m in messages[:2]] == ["a", "b"]
    finals = messages[2:]
    assert sorted(m.choice_index for m in finals) == [0, 1]
    assert {m.finish_reason for m in finals} == {inference_pb2.FINISH_REASON_QUOTA}
    assert all(m.usage.completion_tokens == 2 for m in finals)
    assert generation.finish_reason() == "quota" and generation.closed


async def test_a_failure_after_messages_ends_each_choice_with_the_error() -> None:
    generation = FakeGeneration([(0, Delta("a", [1])), Unavailable("engine went away")])
    messages: list[Any] = []
    with pytest.raises(stream.StreamAborted) as info:
        async for message in stream.produce(cast(Any, FakeAdmission()), cast(Any, generation)):
            messages.append(message)
    assert info.value.error.message == "engine went away"
    assert messages[-1].finish_reason == inference_pb2.FINISH_REASON_ERROR
    assert messages[-1].error.message == "engine went away"
    assert generation.finish_reason() == "error"


async def test_a_failure_before_any_message_is_a_plain_error() -> None:
    """Its caller holds its headers (OpenAI): it answers with an error of its own."""
    generation = FakeGeneration([Unavailable("no engine")])
    with pytest.raises(Unavailable):
        await _produce(FakeAdmission(), generation)
    assert generation.finish_reason() == "error"


async def test_a_failure_before_any_message_with_the_headers_out_is_told_in_band() -> None:
    """A v1/v2 stream sent its headers when it was queued: a status alone reached a
    REST client as `200 text/event-stream` and no SSE event at all."""
    generation = FakeGeneration([Unavailable("no engine")], n=2)
    admission = FakeAdmission()
    messages: list[Any] = []
    with pytest.raises(stream.StreamAborted) as info:
        produced = stream.produce(cast(Any, admission), cast(Any, generation), headers_out=True)
        async for message in produced:
            messages.append(message)
    assert info.value.error.message == "no engine"
    assert sorted(m.choice_index for m in messages) == [0, 1]
    assert {m.finish_reason for m in messages} == {inference_pb2.FINISH_REASON_ERROR}
    assert all(m.error.message == "no engine" and not m.token_ids for m in messages)
    assert generation.finish_reason() == "error"
    assert not admission.open_streams


async def test_a_stream_is_open_while_it_runs_with_its_headers_out() -> None:
    """The worker's shutdown ends the open streams in-band (stream.end_streams)."""
    admission = FakeAdmission()
    held = FakeGeneration([(0, Delta("a", [1])), (0, Delta("b", [2], "length"))])
    produced = stream.produce(cast(Any, admission), cast(Any, held), headers_out=True)
    first = await anext(produced)
    assert first.text == "a" and admission.open_streams == {held}
    await produced.aclose()  # its caller left: it is no longer open
    assert not admission.open_streams
    # A caller that holds its headers until its first message: open once it took it
    # (it sent its headers with it) and came back for more.
    later = FakeGeneration(
        [(0, Delta("a", [1])), (0, Delta("b", [2])), (0, Delta("c", [3], "stop"))]
    )
    produced = stream.produce(cast(Any, admission), cast(Any, later))
    await anext(produced)
    assert not admission.open_streams
    await anext(produced)
    assert admission.open_streams == {later}
    assert [m.text async for m in produced] == ["c"]
    assert not admission.open_streams


async def test_collect_gathers_each_choice_and_the_usage() -> None:
    script: Script = [
        (1, Delta("x", [4])),
        (0, Delta("he", [1])),
        (0, Delta("llo", [2], "stop")),
        (1, Delta("y", [5], "length")),
    ]
    generation = FakeGeneration(script, n=2)
    response = await stream.collect(cast(Any, FakeAdmission()), cast(Any, generation))
    assert [(c.index, c.text, list(c.token_ids)) for c in response.choices] == [
        (0, "hello", [1, 2]),
        (1, "xy", [4, 5]),
    ]
    assert [c.finish_reason for c in response.choices] == [
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    ]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 4)
    assert response.request_id == "req-1"


async def test_collect_ends_with_quota_when_the_budget_runs_out() -> None:
    generation = FakeGeneration([(0, Delta("a", [1])), (0, Delta("b", [2]))])
    response = await stream.collect(
        cast(Any, FakeAdmission(budget_tokens=4)), cast(Any, generation)
    )
    assert response.choices[0].text == "a"
    assert response.choices[0].finish_reason == inference_pb2.FINISH_REASON_QUOTA
    assert response.usage.completion_tokens == 1


def test_finish_reason_names_round_trip() -> None:
    for name, number in stream.FINISH_REASONS.items():
        assert stream.finish_reason_name(number) == name
    assert stream.finish_reason_name(999) == ""


@pytest.mark.parametrize(
    ("billing", "billed"), [("full", (3, 5)), ("prompt_only", (3, 0)), ("none", (0, 0))]
)
def test_a_served_request_is_recorded_cached_with_what_it_received(
    billing: str, billed: tuple[int, int]
) -> None:
    admission, generation = FakeAdmission(), FakeGeneration([])
    record.record_served(
        cast(Any, admission),
        cast(Any, generation),
        prompt_tokens=3,
        completion_tokens=5,
        finish_reason="stop",
        first_token_ms=0.5,
        billing=billing,
    )
    [event] = admission.events
    assert event.cached and event.finish_reason == "stop"
    assert (event.usage.prompt_tokens, event.usage.completion_tokens) == billed
    assert (event.served_usage.prompt_tokens, event.served_usage.completion_tokens) == (3, 5)
    assert event.timing.time_to_first_token_ms == 0.5
    assert event.request_id == "req-1"
