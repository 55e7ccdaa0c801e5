"""A sequence's outbox: items in order, one wake-up for a waiting reader, cancellable waits."""

from __future__ import annotations

import asyncio

from services.inference.scheduler import Finished, Outbox


async def test_take_returns_everything_waiting_in_order() -> None:
    outbox = Outbox()
    for item in (5, 6, Finished("length")):
        outbox.put_nowait(item)
    assert await outbox.take() == [5, 6, Finished("length")]
    assert outbox.empty()


async def test_a_waiting_reader_gets_what_arrives() -> None:
    outbox = Outbox()
    reader = asyncio.create_task(outbox.take())
    await asyncio.sleep(0)  # the reader now waits
    assert not reader.done()
    outbox.put_nowait(1)
    outbox.put_nowait(2)  # before the reader runs: both in one take
    assert await reader == [1, 2]


async def test_get_returns_one_item_at_a_time() -> None:
    outbox = Outbox()
    getter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    outbox.put_nowait(3)
    outbox.put_nowait(4)
    assert await getter == 3
    assert await outbox.get() == 4


async def test_a_cancelled_wait_leaves_the_outbox_usable() -> None:
    outbox = Outbox()
    reader = asyncio.create_task(outbox.take())
    await asyncio.sleep(0)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    outbox.put_nowait(7)  # nobody waits: kept for the next reader
    assert await outbox.take() == [7]
