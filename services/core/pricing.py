"""Model-version prices and what usage costs them: exact decimal money, never floats.

A price is in US dollars per million tokens, as decimal strings in protos
(`tokenmesh.type.v1.Price`) and `decimal.Decimal` inside: at most
`MAX_INTEGER_DIGITS` digits before the point and `MAX_FRACTION_DIGITS` after.
Cost = tokens x price / 1,000,000, summed exactly (a high-precision decimal
context: no rounding at all) and printed without trailing zeros.

Cached prompt tokens (served by the prefix cache) are prompt tokens: they cost
the cached prompt price when the version has one, else the prompt price.

The catalogue keeps each version's price history (`PriceChange`s, newest
last); the meter prices a request with the change in effect when it finished,
so a later price change never rewrites what earlier usage cost.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.core.errors import FieldViolation, InvalidArgument
from tokenmesh.type.v1 import types_pb2

CURRENCY = "USD"
MAX_INTEGER_DIGITS = 12
MAX_FRACTION_DIGITS = 9
# The newest changes kept per version: far more than any metering backlog spans.
PRICE_HISTORY_LIMIT = 32
TOKENS_PER_UNIT = Decimal(1_000_000)
_AMOUNT = re.compile(rf"^\d{{1,{MAX_INTEGER_DIGITS}}}(\.\d{{1,{MAX_FRACTION_DIGITS}}})?$")
# Exact: int64 token sums (19 digits) x 21-digit prices fit with room to spare.
_EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])
AMOUNT_RULE = (
    f"a non-negative decimal of at most {MAX_INTEGER_DIGITS} integer and "
    f"{MAX_FRACTION_DIGITS} fractional digits, e.g. 0.15"
)


def parse_amount(value: str, field_name: str) -> Decimal:
    """Returns a price amount; raises InvalidArgument naming `field_name`."""
    if not _AMOUNT.match(value):
        raise InvalidArgument([FieldViolation(field_name, f"must be {AMOUNT_RULE}")])
    return Decimal(value)


def format_amount(amount: Decimal) -> str:
    """Returns `amount` as a plain decimal string without trailing zeros ("0.5", "12")."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class Price:
    """Price is what one model version costs, in `CURRENCY` per million tokens.

    Attributes:
        prompt: per million prompt tokens.
        completion: per million completion tokens.
        cached_prompt: per million cached prompt tokens; None means `prompt`.
    """

    prompt: Decimal
    completion: Decimal
    cached_prompt: Decimal | None = None

    @property
    def cached_rate(self) -> Decimal:
        """Returns the price of a million cached prompt tokens."""
        return self.prompt if self.cached_prompt is None else self.cached_prompt

    @classmethod
    def from_pb(cls, price: types_pb2.Price, field_name: str = "price") -> Price:
        """Validates and converts a protobuf price; raises InvalidArgument naming the field."""
        if price.currency_code not in ("", CURRENCY):
            raise InvalidArgument(
                [FieldViolation(f"{field_name}.currency_code", f"must be {CURRENCY} (or empty)")]
            )
        cached = price.cached_prompt_per_million_tokens
        return cls(
            prompt=parse_amount(
                price.prompt_per_million_tokens, f"{field_name}.prompt_per_million_tokens"
            ),
            completion=parse_amount(
                price.completion_per_million_tokens, f"{field_name}.completion_per_million_tokens"
            ),
            cached_prompt=(
                parse_amount(cached, f"{field_name}.cached_prompt_per_million_tokens")
                if cached
                else None
            ),
        )

    def to_pb(self) -> types_pb2.Price:
        """Returns the price as a protobuf message."""
        return types_pb2.Price(
            currency_code=CURRENCY,
            prompt_per_million_tokens=format_amount(self.prompt),
            cached_prompt_per_million_tokens=(
                "" if self.cached_prompt is None else format_amount(self.cached_prompt)
            ),
            completion_per_million_tokens=format_amount(self.completion),
        )

    def to_json(self) -> list[str]:
        """Returns the price as [prompt, cached ("" for none), completion] strings."""
        cached = "" if self.cached_prompt is None else format_amount(self.cached_prompt)
        return [format_amount(self.prompt), cached, format_amount(self.completion)]

    @classmethod
    def from_json(cls, data: Sequence[str]) -> Price:
        """Parses a price stored by `to_json`."""
        prompt, cached, completion = data
        return cls(Decimal(prompt), Decimal(completion), Decimal(cached) if cached else None)


@dataclass(frozen=True)
class PriceChange:
    """PriceChange is a version's price from `since_ms` (Unix ms) on; None: no price."""

    since_ms: int
    price: Price | None

    def to_json(self) -> dict[str, Any]:
        """Serialises the change for the catalogue document."""
        return {
            "since_ms": self.since_ms,
            "price": None if self.price is None else self.price.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriceChange:
        """Parses a change stored by `to_json`."""
        raw = data.get("price")
        return cls(int(data["since_ms"]), None if raw is None else Price.from_json(raw))


def price_at(history: Sequence[PriceChange], unix_ms: int) -> Price | None:
    """Returns the price in effect at `unix_ms` (history is oldest first)."""
    current: Price | None = None
    for change in history:
        if change.since_ms > unix_ms:
            break
        current = change.price
    return current


def with_change(history: Sequence[PriceChange], change: PriceChange) -> tuple[PriceChange, ...]:
    """Returns `history` with `change` appended (the newest `PRICE_HISTORY_LIMIT` kept).

    A change that sets the price already in effect changes nothing.
    """
    if history and history[-1].price == change.price:
        return tuple(history)
    if history and change.since_ms < history[-1].since_ms:
        # Clocks of router replicas differ a little: history stays ordered.
        change = PriceChange(history[-1].since_ms, change.price)
    return (*history, change)[-PRICE_HISTORY_LIMIT:]


@dataclass(frozen=True)
class Cost:
    """Cost is what some tokens cost, split like the tokens (amounts in `CURRENCY`)."""

    prompt: Decimal = Decimal(0)
    cached_prompt: Decimal = Decimal(0)
    completion: Decimal = Decimal(0)

    @property
    def total(self) -> Decimal:
        """Returns prompt + cached_prompt + completion."""
        return _EXACT.add(_EXACT.add(self.prompt, self.cached_prompt), self.completion)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            _EXACT.add(self.prompt, other.prompt),
            _EXACT.add(self.cached_prompt, other.cached_prompt),
            _EXACT.add(self.completion, other.completion),
        )


def cost_of(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Cost:
    """Returns what tokens cost at `price` (cached tokens are part of `prompt_tokens`)."""
    cached = min(cached_tokens, prompt_tokens)
    return Cost(
        prompt=_per_million(prompt_tokens - cached, price.prompt),
        cached_prompt=_per_million(cached, price.cached_rate),
        completion=_per_million(completion_tokens, price.completion),
    )


def _per_million(tokens: int, rate: Decimal) -> Decimal:
    return _EXACT.divide(_EXACT.multiply(Decimal(tokens), rate), TOKENS_PER_UNIT)
