"""Usage grouped by dimension, with cost: the rows one request adds and the groups reports make."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import pytest

from services.core.errors import InvalidArgument
from services.core.pricing import Price
from services.usage.dimensions import (
    KINDS,
    Counts,
    Row,
    all_cells,
    event_rows,
    group,
    parse_group_by,
    totals,
)
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.type.v1 import types_pb2

PRICE = Price(prompt=Decimal("1"), completion=Decimal("2"), cached_prompt=Decimal("0.5"))


def _event(
    prompt: int,
    completion: int,
    cached: int = 0,
    api_version: str = "v2",
    metadata: dict[str, str] | None = None,
    version: str = "1",
    key: str = "k1",
) -> inference_pb2.UsageEvent:
    return inference_pb2.UsageEvent(
        request_id="r",
        key_id=key,
        tenant="acme",
        model=types_pb2.ModelRef(name="demo-lm", version=version),
        usage=types_pb2.TokenUsage(prompt_tokens=prompt, completion_tokens=completion),
        cached_prompt_tokens=cached,
        api_version=api_version,
        metadata=metadata or {},
    )


class Bucket:
    """A bucket as the meter's script fills it: v1 counters and dimension rows."""

    def __init__(self) -> None:
        self.plain: dict[tuple[str, str], Counts] = defaultdict(Counts)
        self.rows: dict[Row, Counts] = defaultdict(Counts)

    def meter(self, event, price=None, template="", with_rows=True):
        counts = self.plain[(event.model.name, event.model.version)]
        cached = min(event.cached_prompt_tokens, event.usage.prompt_tokens)
        counts.plus(Counts(1, event.usage.prompt_tokens, cached, event.usage.completion_tokens))
        for increment in event_rows(event, price, template) if with_rows else []:
            for kind, amount in zip(KINDS, increment.counts, strict=True):
                row, _ = Row.parse(f"{increment.prefix}|{kind}")
                self.rows[row].add(kind, amount)

    def groups(self, dimension):
        cells = all_cells(self.plain, self.rows)
        return {
            key.value: (g.counts, g.cost, g.unpriced)
            for key, g in group(dimension, cells, self.rows).items()
        }


def test_tag_groups_split_tokens_and_cost_and_untagged_requests_are_the_empty_group():
    bucket = Bucket()
    bucket.meter(_event(1_000_000, 500_000, metadata={"team": "a"}), PRICE)
    bucket.meter(_event(2_000_000, 0, cached=1_000_000, metadata={"team": "b"}), PRICE)
    bucket.meter(_event(10, 10), PRICE)
    groups = bucket.groups("tag:team")
    assert set(groups) == {"a", "b", ""}
    counts, cost, unpriced = groups["a"]
    assert (counts.requests, counts.prompt, counts.completion) == (1, 1_000_000, 500_000)
    assert (cost.prompt, cost.completion, cost.total) == (Decimal(1), Decimal(1), Decimal(2))
    counts, cost, _ = groups["b"]
    assert counts.cached == 1_000_000
    assert (cost.prompt, cost.cached_prompt, cost.total) == (
        Decimal(1),
        Decimal("0.5"),
        Decimal("1.5"),
    )
    assert groups[""][0].requests == 1 and unpriced.empty()


def test_a_version_without_a_price_has_no_cost_and_counts_as_unpriced():
    bucket = Bucket()
    bucket.meter(_event(100, 50, version="1"), PRICE)
    bucket.meter(_event(7, 3, version="2"), None)
    by_version = bucket.groups("version")
    assert by_version["demo-lm@2"][1] is None
    assert by_version["demo-lm@2"][2].requests == 1
    overall = totals(all_cells(bucket.plain, bucket.rows).items())
    assert overall.counts.requests == 2
    assert (overall.unpriced.prompt, overall.unpriced.completion) == (7, 3)
    assert overall.cost.total == Decimal("0.0002")  # only version 1's 100 + 2 x 50 millionths


def test_usage_metered_before_dimension_rows_is_counted_under_empty_without_a_price():
    bucket = Bucket()
    bucket.meter(_event(5, 5, api_version=""), with_rows=False)  # an old event
    bucket.meter(_event(5, 5, api_version="v1"), PRICE)
    bucket.meter(_event(5, 5, api_version="v2"), PRICE)
    by_api = bucket.groups("api_version")
    assert {v: c.requests for v, (c, _, _) in by_api.items()} == {"": 1, "v1": 1, "v2": 1}
    assert by_api[""][1] is None and by_api["v1"][1] is not None
    assert bucket.groups("model")["demo-lm"][0].requests == 3
    assert bucket.groups("tag:team")[""][0].requests == 3


def test_templates_keys_and_tenants_group_like_tags():
    bucket = Bucket()
    bucket.meter(_event(1, 1, key="k1"), PRICE, template="support@3")
    bucket.meter(_event(1, 1, key="k2"), PRICE)
    assert {v: c.requests for v, (c, _, _) in bucket.groups("template").items()} == {
        "support@3": 1,
        "": 1,
    }
    assert set(bucket.groups("key")) == {"k1", "k2"}
    assert {v: c.requests for v, (c, _, _) in bucket.groups("tenant").items()} == {"acme": 2}


def test_a_tag_value_that_looks_like_json_or_has_a_bar_keeps_its_value():
    bucket = Bucket()
    bucket.meter(_event(1, 1, metadata={"team": 'a|b"],{'}), PRICE)
    assert set(bucket.groups("tag:team")) == {'a|b"],{'}


@pytest.mark.parametrize("value", ["model", "version", "key", "tenant", "api_version", "template"])
def test_group_by_names_a_dimension(value):
    assert parse_group_by(value) == value


def test_group_by_defaults_to_model_and_takes_tags():
    assert parse_group_by("") == "model"
    assert parse_group_by("tag:team.x-1") == "tag:team.x-1"


@pytest.mark.parametrize("value", ["team", "tag:", "tag:a b", "Model", "tag:" + "x" * 65])
def test_a_bad_group_by_is_refused_naming_the_parameter(value):
    with pytest.raises(InvalidArgument) as raised:
        parse_group_by(value)
    assert raised.value.violations[0].field == "group_by"
