"""Prices and cost math: exact decimals, cached tokens, price history."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from services.core.errors import InvalidArgument
from services.core.pricing import (
    PRICE_HISTORY_LIMIT,
    Price,
    PriceChange,
    cost_of,
    format_amount,
    parse_amount,
    price_at,
    with_change,
)
from tokenmesh.type.v1 import types_pb2


def test_cost_is_tokens_times_price_per_million_exactly():
    price = Price(prompt=Decimal("0.15"), completion=Decimal("0.6"))
    cost = cost_of(price, prompt_tokens=1000, cached_tokens=0, completion_tokens=333)
    assert (cost.prompt, cost.completion) == (Decimal("0.00015"), Decimal("0.0001998"))
    assert format_amount(cost.total) == "0.0003498"


def test_cached_prompt_tokens_cost_the_prompt_price_unless_there_is_a_cached_price():
    without = Price(prompt=Decimal("2"), completion=Decimal("8"))
    cost = cost_of(without, prompt_tokens=1_000_000, cached_tokens=400_000, completion_tokens=0)
    assert (cost.prompt, cost.cached_prompt) == (Decimal("1.2"), Decimal("0.8"))
    with_cached = Price(prompt=Decimal("2"), completion=Decimal("8"), cached_prompt=Decimal("0.5"))
    cost = cost_of(with_cached, 1_000_000, 400_000, 0)
    assert (cost.prompt, cost.cached_prompt, cost.total) == (
        Decimal("1.2"),
        Decimal("0.2"),
        Decimal("1.4"),
    )


def test_huge_sums_do_not_round():
    price = Price(prompt=Decimal("999999999999.999999999"), completion=Decimal("0.000000001"))
    tokens = 2**63 - 1
    cost = cost_of(price, tokens, 0, tokens)
    assert Fraction(cost.prompt) == Fraction(tokens) * Fraction(price.prompt) / 1_000_000
    assert format_amount(cost.completion) == "9223.372036854775807"


@pytest.mark.parametrize("value", ["", "-1", "1e3", "0.1234567891", "1234567890123", "NaN", " 1"])
def test_bad_amounts_are_refused_naming_the_field(value):
    with pytest.raises(InvalidArgument) as raised:
        parse_amount(value, "price.prompt_per_million_tokens")
    assert raised.value.violations[0].field == "price.prompt_per_million_tokens"


def test_a_price_round_trips_through_protobuf_and_json():
    message = types_pb2.Price(
        prompt_per_million_tokens="0.150",
        completion_per_million_tokens="12",
        cached_prompt_per_million_tokens="",
    )
    price = Price.from_pb(message)
    assert price.cached_prompt is None and price.cached_rate == Decimal("0.15")
    assert price.to_pb().prompt_per_million_tokens == "0.15"
    assert price.to_pb().currency_code == "USD"
    assert Price.from_json(price.to_json()) == price


def test_only_usd_is_accepted():
    message = types_pb2.Price(
        currency_code="EUR", prompt_per_million_tokens="1", completion_per_million_tokens="1"
    )
    with pytest.raises(InvalidArgument) as raised:
        Price.from_pb(message)
    assert raised.value.violations[0].field == "price.currency_code"


def test_the_price_in_effect_is_the_last_change_at_or_before_the_time():
    one = Price(Decimal(1), Decimal(1))
    two = Price(Decimal(2), Decimal(2))
    history = with_change(with_change((), PriceChange(1000, one)), PriceChange(2000, two))
    history = with_change(history, PriceChange(3000, None))
    assert [price_at(history, t) for t in (999, 1000, 1999, 2000, 3000)] == [
        None,
        one,
        one,
        two,
        None,
    ]
    # Setting the price already in effect adds nothing; history stays bounded and ordered.
    assert with_change(history, PriceChange(4000, None)) == history
    assert with_change(history, PriceChange(10, one))[-1] == PriceChange(3000, one)
    for t in range(PRICE_HISTORY_LIMIT + 5):
        history = with_change(history, PriceChange(5000 + t, Price(Decimal(t), Decimal(t))))
    assert len(history) == PRICE_HISTORY_LIMIT


def test_amounts_print_without_trailing_zeros_or_exponents():
    assert [format_amount(Decimal(v)) for v in ("0", "1.500", "1E+2", "0.000000001")] == [
        "0",
        "1.5",
        "100",
        "0.000000001",
    ]
