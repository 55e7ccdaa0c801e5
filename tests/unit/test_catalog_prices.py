"""Prices in the model catalogue: per version, with history, stored in the model's document."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from services.core.errors import InvalidArgument
from services.core.pricing import Price, price_at
from services.router import catalog as cat
from services.router.catalog import ModelEntry

PRICE = Price(Decimal("0.15"), Decimal("0.6"), Decimal("0.075"))


def _model() -> ModelEntry:
    return cat.add_version(cat.add_version(None, "demo-lm", "1", 0), "demo-lm", "2", 0)


def test_a_price_applies_to_one_version_from_the_time_it_is_set():
    model = cat.set_price(_model(), "2", PRICE, now=100.0)
    assert model.version("1").price is None
    assert model.version("2").price == PRICE
    history = model.version("2").prices
    assert price_at(history, 99_999) is None and price_at(history, 100_000) == PRICE
    cleared = cat.set_price(model, "2", None, now=200.0)
    assert cleared.version("2").price is None
    assert price_at(cleared.version("2").prices, 150_000) == PRICE


def test_prices_survive_the_catalogue_document_and_old_documents_still_parse():
    model = cat.set_price(_model(), "1", PRICE, now=100.0)
    assert ModelEntry.from_json("demo-lm", model.to_json()) == model
    old = json.dumps({"versions": [{"version": "1", "weight": 100}], "aliases": {}})
    assert ModelEntry.from_json("demo-lm", old).version("1").price is None


def test_an_unknown_version_cannot_be_priced():
    with pytest.raises(InvalidArgument) as raised:
        cat.set_price(_model(), "9", PRICE, now=1.0)
    assert raised.value.violations[0].field == "version"
