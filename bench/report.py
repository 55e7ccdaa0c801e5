"""Benchmark reports: the rows table, where each process ran, JSON, Markdown, plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.rows import Row, table

#: Plots the report promises, and the rows whose scenario draws each.
PROMISED_PLOTS = {
    "throughput.png": ("throughput vs concurrency", "S1"),
    "ttft_itl_cdf.png": ("TTFT and inter-token latency CDFs", "S2"),
    "litellm.png": ("tokenmesh vs LiteLLM", "P1, P2"),
    "routing.png": ("prefix affinity vs round robin", "K1, K2"),
}


def write_report(
    out: Path,
    results: dict[str, Any],
    rows: Sequence[Row],
    placement: dict[str, Any],
    plots: Sequence[Path],
) -> None:
    """Writes results.json and summary.md into `out` (the plots are already there)."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "rows": [{**asdict(r), "result": r.result} for r in rows],
        "placement": placement,
        "results": public(results),
    }
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    summary = [
        "# tokenmesh benchmark",
        "",
        table(list(rows)),
        "",
        "## Where each process ran",
        "",
        placement_table(placement),
        "",
        "## Plots",
        "",
    ]
    drawn = {p.name for p in plots}
    summary += [f"![{p.stem}]({p.name})" for p in plots]
    summary += [
        f"- {title} ({row_ids}): not drawn in this run"
        for name, (title, row_ids) in PROMISED_PLOTS.items()
        if name not in drawn
    ]
    summary += ["", "Every figure, with each round's, is in results.json."]
    (out / "summary.md").write_text("\n".join(summary) + "\n")


def placement_table(placement: dict[str, Any]) -> str:
    """Returns which process ran on which cores, as Markdown."""
    if not placement.get("pinned"):
        head = "Not pinned (fewer than 2 cores, or TOKENMESH_BENCH_PIN=0): every process shared every core."
    else:
        head = (
            f"Load generator on core {placement['load_cores']}, system under test and its"
            f" baselines on core {placement['sut_cores']}."
        )
    head += " Processes of scenarios not listed here ran unpinned, sharing every core."
    lines = [head, "", "| process | pid | role | cores | threads |", "|---|---|---|---|---|"]
    lines += [
        f"| {p['name']} | {p['pid']} | {p['role']} | {p['cores']} | {p['threads']} |"
        for p in placement.get("processes", [])
    ]
    return "\n".join(lines)


def public(results: dict[str, Any]) -> dict[str, Any]:
    """Returns the results without raw objects (keys starting with "_": the plots' input)."""
    return {
        key: public(value) if isinstance(value, dict) else value
        for key, value in results.items()
        if not key.startswith("_")
    }


def save_figure(fig: Any, path: Path) -> Path:
    """Saves a matplotlib figure as PNG and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
