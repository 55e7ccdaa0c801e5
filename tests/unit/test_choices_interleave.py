"""One choice's deltas are read in the request's own task; several are interleaved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from services.inference.generation import Delta
from services.inference.v2.choices import Choice, interleave, single

CHOICES = cast(list[Choice], ["first", "second"])  # interleave only indexes them


async def _deltas(
    texts: list[str], readers: list[asyncio.Task[Any] | None], closed: list[bool]
) -> AsyncGenerator[Delta, None]:
    try:
        for text in texts:
            readers.append(asyncio.current_task())
            yield Delta(text, [1])
    finally:
        closed.append(True)


async def test_one_choice_is_read_in_the_callers_task_without_a_pump() -> None:
    readers: list[asyncio.Task[Any] | None] = []
    closed: list[bool] = []
    stream = single(CHOICES[0], _deltas(["a", "b"], readers, closed))
    got = [(str(choice), delta.text) async for choice, delta in stream]
    assert got == [("first", "a"), ("first", "b")]
    assert readers == [asyncio.current_task()] * 2  # no task (and queue hop) per delta
    assert closed == [True]


async def test_one_choice_closed_early_closes_its_stream() -> None:
    closed: list[bool] = []
    stream = single(CHOICES[0], _deltas(["a", "b", "c"], [], closed))
    assert (await anext(stream))[1].text == "a"
    await stream.aclose()
    assert closed == [True]  # stream_deltas' finally cancels the sequence


async def test_one_choice_error_reaches_the_caller() -> None:
    async def failing() -> AsyncGenerator[Delta, None]:
        yield Delta("a", [1])
        raise RuntimeError("engine failed")

    stream = single(CHOICES[0], failing())
    assert (await anext(stream))[1].text == "a"
    with pytest.raises(RuntimeError, match="engine failed"):
        await anext(stream)


async def test_several_choices_still_interleave_every_delta() -> None:
    closed: list[bool] = []
    streams = [_deltas(["a1", "a2"], [], closed), _deltas(["b1"], [], closed)]
    got = sorted(
        [(str(choice), delta.text) async for choice, delta in interleave(CHOICES, streams)]
    )
    assert got == [("first", "a1"), ("first", "a2"), ("second", "b1")]
    assert closed == [True, True]
