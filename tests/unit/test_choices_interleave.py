"""Several choices' deltas are interleaved as they come, and every stream is closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

from services.inference.generation import Delta
from services.inference.v2.choices import Choice, interleave

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


async def test_several_choices_still_interleave_every_delta() -> None:
    closed: list[bool] = []
    streams = [_deltas(["a1", "a2"], [], closed), _deltas(["b1"], [], closed)]
    got = sorted(
        [(str(choice), delta.text) async for choice, delta in interleave(CHOICES, streams)]
    )
    assert got == [("first", "a1"), ("first", "a2"), ("second", "b1")]
    assert closed == [True, True]
