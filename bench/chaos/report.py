"""The fault table in Markdown, and where it goes (docs/reliability.md, README.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.chaos.faults import Row

BEGIN = "<!-- chaos-table:begin (written by `make chaos`) -->"
END = "<!-- chaos-table:end -->"

HEADER = (
    "| fault | requests | failed (by status) | streams cut | cut (accepted) "
    "| new requests OK after | usage lost | usage duplicated | metered, client saw a failure "
    "| left behind | budget charged − metered |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _failed(row: Row) -> str:
    if not row.failed:
        return "0"
    return ", ".join(f"{status} {n}" for status, n in row.failed.most_common())


def _recovery(row: Row) -> str:
    return "never" if row.recovery_s is None else f"{row.recovery_s:.1f} s"


def table(rows: Sequence[Row]) -> str:
    """Returns the Markdown table of `rows`."""
    lines = [HEADER]
    for row in rows:
        lines.append(
            f"| {row.fault.title} | {row.requests} | {_failed(row)} | {row.cut} "
            f"| {row.cut_accepted} | {_recovery(row)} | {row.usage.lost} "
            f"| {row.usage.duplicated} | {row.usage.metered_failed} "
            f"| {', '.join(map(str, row.left_behind)) or 'none'} | {row.budget_gap} |"
        )
    return "\n".join(lines)


def write_table(path: Path, markdown: str, footer: str = "") -> None:
    """Replaces the text between the markers in `path` with `markdown` (and `footer`)."""
    text = path.read_text()
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"{path}: the markers {BEGIN!r} and {END!r} are missing")
    body = f"{markdown}\n\n{footer}".rstrip()
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
