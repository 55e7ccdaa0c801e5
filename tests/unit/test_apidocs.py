"""docs/api.md's field types, as gateway.apidocs renders them from the protos."""

from __future__ import annotations

from gateway import apidocs


def _row(rendered: str, message: str, field: str) -> str:
    section = rendered.split(f"### message `{message}`", 1)[1].split("### ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| `{field}` |"))


def test_a_map_names_its_types_and_a_message_named_entry_is_no_map():
    rendered = apidocs.render()
    # A repeated AuditEntry was listed as a `map` (its type name ends in "Entry").
    entries = _row(rendered, "tokenmesh.usage.v1.ListAuditEntriesResponse", "entries")
    assert "`repeated tokenmesh.usage.v1.AuditEntry`" in entries
    # A real map said only `map`.
    variables = _row(rendered, "tokenmesh.inference.v2.CompleteRequest", "variables")
    assert "`map<string, string>`" in variables
