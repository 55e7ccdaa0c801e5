"""Usage by dimension: the rows the meter adds per request, and the groups reports make of them.

Beside the v1 buckets (`model|version|kind` counters), each bucket has a
dimension hash whose rows are keyed by labels, the model version and the
price the request was metered at:

- a base row per request: {api_version, template}: every request has one;
- a tag row per request metadata entry: {"tag:<key>": value};
- a key row {key} and a tenant row {tenant}.

Each row counts requests, prompt, cached and completion tokens. A report
groups by one dimension: model, version, api_version and template come from
the base rows; tag:<key>, key and tenant from their rows, and what those
rows do not cover (requests without the tag) is the group "". Usage metered
before dimension rows existed is in the v1 buckets only: reports count it
under "" with no price, so totals always equal the v1 report's.

A tag row is optional bookkeeping, so it is bounded: once a bucket's
dimension hash holds its granularity's cap of tag rows' fields
(`DIMENSION_FIELD_CAPS`, at most `MAX_DIMENSION_FIELDS`; counted in its field
`TAG_FIELDS`), a new tag value is counted as `OTHER_VALUE`,
and past twice that it is not counted by tag at all (the request is then in
the "" group of that tag). The caps are per granularity because a bucket is
kept its granularity's retention: with one cap of 20,000 fields for all, one
key sending unique tag values (16 tags of 256 characters, 2 tokens a request)
made ~334 KB of Redis a request, ~50 MB a minute at the default 600 requests a
minute, every minute's hashes kept 2 days: a 1 GiB Redis full in 20 minutes.
Now a hostile key's tag rows stay in the order of its dedupe markers (~350 MB
over the 2 days minute buckets live, worst case). Tags are for grouping
(a team, a feature, an environment), not per-user ids: a bucket keeps 16
(minute), 64 (hour), 256 (day) or 1,024 (month) rows apart, the rest "(other)".
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument
from services.core.pricing import Cost, Price, cost_of
from tokenmesh.inference.v1 import inference_pb2

KINDS = ("requests", "prompt", "cached", "completion")
MAX_DIMENSION_FIELDS = 20_000
# Each granularity's cap on a dimension hash's fields of tag rows (4 a row), within
# MAX_DIMENSION_FIELDS: the finer, the more buckets are kept at once.
DIMENSION_FIELD_CAPS = {"minute": 64, "hour": 256, "day": 1_024, "month": 4_096}
# The hash field counting its tag rows' fields (no row's field starts with "#").
TAG_FIELDS = "#tag-fields"
OTHER_VALUE = "(other)"
BASE_DIMENSIONS = ("model", "version", "api_version", "template")
ROW_DIMENSIONS = ("key", "tenant")
TAG_PREFIX = "tag:"
GROUP_BY_RULE = (
    'one of "model", "version", "key", "tenant", "api_version", "template" or "tag:<key>"'
)
# A price as stored in a row: [prompt, cached, completion] strings, or None.
PriceKey = tuple[str, str, str] | None
Labels = tuple[tuple[str, str], ...]


@dataclass
class Counts:
    """Counts are a row's (or a group's) counters."""

    requests: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0

    def add(self, kind: str, amount: int) -> None:
        """Adds to one counter by its row kind."""
        setattr(self, kind, getattr(self, kind) + amount)

    def plus(self, other: Counts, sign: int = 1) -> None:
        """Adds (or, with sign -1, subtracts) another's counters."""
        for kind in KINDS:
            self.add(kind, sign * getattr(other, kind))

    def empty(self) -> bool:
        """Tells whether every counter is zero."""
        return not any(getattr(self, kind) for kind in KINDS)


@dataclass(frozen=True)
class Row:
    """Row identifies one set of counters in a dimension hash."""

    labels: Labels
    model: str
    version: str
    price: PriceKey

    def field_prefix(self) -> str:
        """Returns the hash-field prefix of this row (a kind follows after `|`)."""
        price = None if self.price is None else list(self.price)
        return json.dumps(
            [dict(self.labels), self.model, self.version, price],
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def parse(cls, raw_field: str) -> tuple[Row, str]:
        """Returns the row and the counter kind of a hash field."""
        prefix, _, kind = raw_field.rpartition("|")
        return cls.from_prefix(prefix), kind

    @classmethod
    def from_prefix(cls, prefix: str) -> Row:
        """Returns the row a hash-field prefix (`field_prefix`) names."""
        labels, model, version, price = json.loads(prefix)
        return cls(tuple(sorted(labels.items())), model, version, _price_key(price))

    def label(self, name: str) -> str | None:
        """Returns the value of one label (None when the row has none)."""
        return dict(self.labels).get(name)


def _price_key(price: list[str] | None) -> PriceKey:
    return None if price is None else (price[0], price[1], price[2])


def price_key(price: Price | None) -> PriceKey:
    """Returns how a price is recorded in rows."""
    return None if price is None else _price_key(price.to_json())


@dataclass(frozen=True)
class RowIncrement:
    """RowIncrement is what one request adds to one row.

    Attributes:
        prefix: the row's hash-field prefix.
        overflow: the prefix it is counted under once the hash is full ("" never
            overflows: base, key and tenant rows are bounded by the catalogue and keys).
        counts: requests, prompt, cached and completion.
    """

    prefix: str
    overflow: str
    counts: tuple[int, int, int, int]


def event_rows(
    event: inference_pb2.UsageEvent, price: Price | None, template: str
) -> list[RowIncrement]:
    """Returns the dimension rows one request adds to (in each of its buckets).

    Args:
        event: the request's usage event.
        price: its model version's price when it finished (None: no price).
        template: the template that rendered its prompt as "name@version" ("": none).
    """
    model, version, priced = event.model.name, event.model.version, price_key(price)
    prompt = event.usage.prompt_tokens
    counts = (1, prompt, min(event.cached_prompt_tokens, prompt), event.usage.completion_tokens)
    base: Labels = (("api_version", event.api_version or "v1"), ("template", template))
    labelled: list[tuple[Labels, bool]] = [(base, False)]
    labelled += [(((f"{TAG_PREFIX}{k}", v),), True) for k, v in sorted(event.metadata.items())]
    labelled += [((("key", event.key_id),), False)] if event.key_id else []
    labelled += [((("tenant", event.tenant),), False)] if event.tenant else []
    out = []
    for labels, bounded in labelled:
        prefix = Row(labels, model, version, priced).field_prefix()
        overflow = ""
        if bounded:
            name = labels[0][0]
            overflow = Row(((name, OTHER_VALUE),), model, version, priced).field_prefix()
        out.append(RowIncrement(prefix, overflow, counts))
    return out


def row_prefixes(dimension: str) -> tuple[bytes, ...]:
    """Returns how the hash fields of the rows a report grouped by `dimension` begin.

    A report needs the base rows (every request has one) and the rows of its
    own dimension; a hash also holds the rows of every other tag, which are
    most of a busy bucket's fields. Telling them apart by the field's first
    bytes costs ~0.1 µs; parsing a field's JSON costs ~5 µs.
    """
    # field_prefix sorts the label keys, and a base row's first one is api_version.
    prefixes = [b'[{"api_version":']
    if dimension not in BASE_DIMENSIONS:
        prefixes.append(b"[{" + json.dumps(dimension).encode() + b":")
    return tuple(prefixes)


def parse_group_by(value: str) -> str:
    """Returns the report dimension `value` names ("" means model); raises InvalidArgument."""
    if not value:
        return "model"
    if value in BASE_DIMENSIONS or value in ROW_DIMENSIONS:
        return value
    if value.startswith(TAG_PREFIX) and contract.is_metadata_key(value[len(TAG_PREFIX) :]):
        return value
    raise InvalidArgument([FieldViolation("group_by", f"must be {GROUP_BY_RULE}")])


@dataclass
class GroupTotals:
    """GroupTotals are a group's counters and what the priced part of them cost."""

    counts: Counts = field(default_factory=Counts)
    cost: Cost | None = None
    unpriced: Counts = field(default_factory=Counts)

    def add(self, price: PriceKey, counts: Counts) -> None:
        """Adds the counters of requests metered at `price`."""
        self.counts.plus(counts)
        if price is None:
            self.unpriced.plus(counts)
            return
        priced = cost_of(Price.from_json(price), counts.prompt, counts.cached, counts.completion)
        self.cost = priced if self.cost is None else self.cost + priced

    def plus(self, other: GroupTotals) -> None:
        """Adds another group's counters and cost (cost is linear in the counts)."""
        self.counts.plus(other.counts)
        self.unpriced.plus(other.unpriced)
        if other.cost is not None:
            self.cost = other.cost if self.cost is None else self.cost + other.cost


@dataclass(frozen=True)
class GroupKey:
    """GroupKey is one group of a report: its value (and model, version when grouped by them)."""

    value: str
    model: str = ""
    version: str = ""


Cells = Mapping[Row, Counts]


def all_cells(plain: Mapping[tuple[str, str], Counts], rows: Cells) -> dict[Row, Counts]:
    """Returns the base rows plus, per model version, what the v1 buckets count beyond them.

    That remainder was metered before dimension rows existed: no labels, no price.
    """
    cells: dict[Row, Counts] = defaultdict(Counts)
    remainder: dict[tuple[str, str], Counts] = defaultdict(Counts)
    for (model, version), counts in plain.items():
        remainder[(model, version)].plus(counts)
    for row, counts in rows.items():
        if row.label("api_version") is not None:
            cells[row].plus(counts)
            remainder[(row.model, row.version)].plus(counts, -1)
    for (model, version), counts in remainder.items():
        if not counts.empty():
            unknown = (("api_version", ""), ("template", ""))
            cells[Row(unknown, model, version, None)].plus(counts)
    return cells


def _base_key(dimension: str, row: Row) -> GroupKey:
    if dimension == "model":
        return GroupKey(row.model, model=row.model)
    if dimension == "version":
        return GroupKey(f"{row.model}@{row.version}", row.model, row.version)
    return GroupKey(row.label(dimension) or "")


def group(dimension: str, cells: Cells, rows: Cells) -> dict[GroupKey, GroupTotals]:
    """Splits `cells` (from `all_cells`) by `dimension`, costing each group."""
    groups: dict[GroupKey, GroupTotals] = defaultdict(GroupTotals)
    if dimension in BASE_DIMENSIONS:
        for row, counts in cells.items():
            groups[_base_key(dimension, row)].add(row.price, counts)
        return dict(groups)
    # What the dimension's rows do not cover, per model version and price, is "".
    uncovered: dict[tuple[str, str, PriceKey], Counts] = defaultdict(Counts)
    for row, counts in cells.items():
        uncovered[(row.model, row.version, row.price)].plus(counts)
    for row, counts in rows.items():
        value = row.label(dimension)
        if value is not None:
            groups[GroupKey(value)].add(row.price, counts)
            uncovered[(row.model, row.version, row.price)].plus(counts, -1)
    for (_, _, price), counts in uncovered.items():
        if not counts.empty():
            groups[GroupKey("")].add(price, counts)
    return dict(groups)


def totals(cells: Iterable[tuple[Row, Counts]]) -> GroupTotals:
    """Returns the counters and cost of every cell together."""
    out = GroupTotals()
    for row, counts in cells:
        out.add(row.price, counts)
    return out
