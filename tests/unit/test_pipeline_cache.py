"""The cache and coalescing stages on their own: modes, keys, billing, flights, settings."""

from __future__ import annotations

import asyncio

import pytest

from services.core.settings import SettingsError, load
from services.inference.pipeline import cache
from services.inference.pipeline.coalesce import Flights, LeaderLeft
from services.inference.pipeline.generate import _storable_stream
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb


def test_the_request_field_wins_over_cache_control():
    assert cache.client_mode({}, 0) == cache.DEFAULT_MODE
    assert cache.client_mode({"cache-control": "no-cache"}, 0) == cache.NO_CACHE
    assert cache.client_mode({"cache-control": "max-age=0, No-Store"}, 0) == cache.NO_STORE
    assert cache.client_mode({}, inference_pb2.CACHE_MODE_NO_STORE) == cache.NO_STORE
    assert (
        cache.client_mode({"cache-control": "no-store"}, inference_pb2.CACHE_MODE_NO_CACHE)
        == cache.NO_CACHE
    )


def test_keys_separate_tenants_unless_the_model_is_shared():
    config = cache.CacheConfig(enabled=True, shared_models=frozenset({"public"}))
    assert cache.scope(config, "acme", "m") != cache.scope(config, "globex", "m")
    assert cache.scope(config, "acme", "public") == cache.scope(config, "globex", "public")
    one = cache.make_key("gen", [cache.scope(config, "acme", "m"), "hello"])
    assert one == cache.make_key("gen", [cache.scope(config, "acme", "m"), "hello"])
    assert one != cache.make_key("gen", [cache.scope(config, "globex", "m"), "hello"])
    assert one.startswith(cache.KEY_PREFIX)


@pytest.mark.parametrize(
    ("billing", "expected"), [("full", (5, 7)), ("prompt_only", (5, 0)), ("none", (0, 0))]
)
def test_billing_of_answers_served_without_computing(billing, expected):
    assert cache.billed(5, 7, billing) == expected


def test_settings_are_checked():
    assert not load(cache.CacheSettings, {}).enabled
    assert load(cache.CacheSettings, {"TOKENMESH_CACHE": "on"}).config().enabled
    for variable, value in (
        ("TOKENMESH_CACHE_BILLING", "half"),
        ("TOKENMESH_CACHE_TTL_SECONDS", "0"),
        ("TOKENMESH_CACHE_MAX_ENTRY_BYTES", "10"),
    ):
        with pytest.raises(SettingsError, match=variable):
            load(cache.CacheSettings, {variable: value})


async def _numbers(count: int | None, gate: asyncio.Event, produced: list[int]) -> object:
    number = 0
    while count is None or number < count:
        await gate.wait()
        await asyncio.sleep(0)
        produced.append(number)
        yield number
        number += 1


async def test_every_waiter_of_a_flight_gets_every_item_once_computed():
    flights: Flights[int] = Flights()
    gate, produced, stored = asyncio.Event(), [], []

    async def store(flight) -> None:
        stored.append(list(flight.items))

    flight = flights.open("k")
    flight.start(_numbers(3, gate, produced), store)
    joined = flights.join("k")
    assert joined is flight

    async def read() -> list[int]:
        return [item async for item in flight.follow()]

    readers = [asyncio.create_task(read()) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*readers) == [[0, 1, 2]] * 3
    assert produced == [0, 1, 2] and stored == [[0, 1, 2]]
    assert flights.join("k") is None  # stored: no longer joinable


async def test_one_waiter_leaving_keeps_the_computation_the_last_cancels_it():
    flights: Flights[int] = Flights()
    gate, produced = asyncio.Event(), []

    async def store(flight) -> None:
        return None

    flight = flights.open("k")
    flight.start(_numbers(None, gate, produced), store)
    leaver, stayer = flight.follow(), flight.follow()
    gate.set()
    assert await anext(leaver) == 0
    await leaver.aclose()
    assert not flight.cancelled
    assert [await anext(stayer) for _ in range(3)] == [0, 1, 2]
    await stayer.aclose()
    assert flight.cancelled and flights.join("k") is None


async def test_a_flight_whose_leader_was_refused_fails_its_waiters():
    flights: Flights[int] = Flights()
    flight = flights.open("k")
    reader = flight.follow()
    flight.fail(RuntimeError("budget"))
    with pytest.raises(RuntimeError):
        await anext(reader)
    assert flights.join("k") is None


async def test_a_leader_cancelled_before_it_started_sends_its_waiters_to_compute():
    # Its client left while it reserved its budget: the waiters got its CancelledError,
    # which no `except Exception` caught, and their callers' RPCs ended as cancelled.
    flight = Flights[int]().open("k")
    reader = flight.follow()
    flight.fail(asyncio.CancelledError())
    with pytest.raises(LeaderLeft):  # an Exception: the waiter computes its own answer
        await anext(reader)


def test_a_stream_missing_a_choice_s_final_message_is_not_stored():
    final = pb.GenerateResponse(choice_index=0, text="a")
    final.finish_reason = inference_pb2.FINISH_REASON_STOP
    delta = pb.GenerateResponse(choice_index=1, text="b")
    assert not _storable_stream([final, delta], n=2)  # choice 1 never ended
    other = pb.GenerateResponse(choice_index=1)
    other.CopyFrom(final)
    other.choice_index = 1
    assert _storable_stream([final, delta, other], n=2)
