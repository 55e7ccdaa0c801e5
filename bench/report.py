"""Benchmark reports: a targets table, JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.clients import StreamRecord


@dataclass(frozen=True)
class Target:
    """Target is one claim with its measured value (passed None: a figure reported, no goal)."""

    name: str
    goal: str
    measured: str
    passed: bool | None

    @property
    def result(self) -> str:
        """Returns PASS, FAIL, or "reported" for a figure without a goal."""
        if self.passed is None:
            return "reported"
        return "PASS" if self.passed else "FAIL"


def targets_table(targets: Sequence[Target]) -> str:
    """Returns the targets as a Markdown table."""
    lines = ["| target | goal | measured | result |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.goal} | {t.measured} | {t.result} |" for t in targets]
    return "\n".join(lines)


def write_report(
    out: Path,
    results: dict[str, Any],
    targets: Sequence[Target],
    streams: dict[str, list[StreamRecord]],
) -> None:
    """Writes results.json, summary.md and plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"results": results, "targets": [asdict(t) for t in targets]}, indent=2)
    )
    plots = _plots(out, results, streams)
    summary = [
        "# tokenmesh benchmark",
        "",
        targets_table(targets),
        "",
        "## Results (raw samples in results.json)",
        "",
        "```json",
        json.dumps(_without_samples(results), indent=2),
        "```",
        "",
    ]
    summary += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "summary.md").write_text("\n".join(summary) + "\n")


def _without_samples(results: dict[str, Any]) -> dict[str, Any]:
    """Returns the results without raw latency samples (they stay in results.json)."""
    trimmed = dict(results)
    if "edge" in trimmed:
        trimmed["edge"] = {k: v for k, v in trimmed["edge"].items() if k != "latencies_ms"}
    return trimmed


def _plots(
    out: Path, results: dict[str, Any], streams: dict[str, list[StreamRecord]]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    if streams:
        fig, (ttft_ax, itl_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for concurrency, records in sorted(streams.items(), key=lambda kv: int(kv[0])):
            ttft = np.sort([r.ttft * 1000 for r in records if r.ok])
            gaps = np.sort([g * 1000 for r in records if r.ok for g in r.gaps])
            if len(ttft):
                ttft_ax.plot(ttft, np.linspace(0, 1, len(ttft)), label=f"{concurrency} streams")
            if len(gaps):
                itl_ax.plot(gaps, np.linspace(0, 1, len(gaps)), label=f"{concurrency} streams")
        ttft_ax.set(title="Time to first token (CDF)", xlabel="ms", ylabel="fraction")
        itl_ax.set(title="Inter-token latency (CDF)", xlabel="ms", xscale="log")
        ttft_ax.legend()
        itl_ax.legend()
        paths.append(_save(fig, out / "ttft_itl_cdf.png"))
    served = results.get("served", {})
    ceiling = results.get("engine_ceiling", {})
    if served:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = sorted(served, key=int)
        ax.plot(
            [int(x) for x in xs],
            [served[x]["tokens_per_s"] for x in xs],
            "o-",
            label="served over gRPC",
        )
        if ceiling:
            cs = sorted(ceiling, key=int)
            ax.plot(
                [int(x) for x in cs],
                [ceiling[x]["tokens_per_s"] for x in cs],
                "s--",
                label="engine ceiling",
            )
        ax.set(
            title="Throughput vs concurrency (demo-lm)",
            xlabel="concurrent streams",
            ylabel="tokens/s",
            xscale="log",
        )
        ax.legend()
        paths.append(_save(fig, out / "throughput.png"))
    edge = results.get("edge", {})
    if edge.get("latencies_ms"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, values in edge["latencies_ms"].items():
            ax.hist(
                values,
                bins=60,
                alpha=0.5,
                label=name,
                range=(0, max(5.0, float(np.percentile(values, 99)))),
            )
        ax.set(title="Unary latency histogram", xlabel="ms", ylabel="calls")
        ax.legend()
        paths.append(_save(fig, out / "unary_latency.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
