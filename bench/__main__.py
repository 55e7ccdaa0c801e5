"""`make bench`: measures every target against a baseline from the same run.

Prints progress and the targets table (one row per target, S1 ... K2, each
ending PASS, FAIL or reported); writes bench/results/<timestamp>/ with
results.json, summary.md (the table, where each process ran) and PNG plots.
Scenarios and their rows are listed in bench.registry. Bounded: every load
loop has a count and a time limit.

    python -m bench                      # every default scenario
    python -m bench --only S1,S2,S3      # the scenarios that fill these rows
    python -m bench --only edge --quick  # a smoke run: fewer, shorter rounds
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.pinning import Placement, layout
from bench.registry import SCENARIOS, select
from bench.report import write_report
from bench.rows import Context, Row, Scenario, all_rows, spec, table
from bench.servers import state_dir

RESULTS = Path(__file__).resolve().parent / "results"
#: Seconds the scenarios of a plain `make bench` may take: it must end within 15
#: minutes on a fresh clone, and its setup (venvs, models, the peer) takes 40-100 s.
BUDGET_S = 780.0
#: Windows and counts never shrink below this share (shorter ones measure noise).
MIN_SCALE = 0.6


def pace(elapsed_s: float, remaining: Sequence[Scenario]) -> float:
    """The share of their windows and counts the remaining scenarios run so that the run
    ends within BUDGET_S: 1 while it keeps to its quiet-VM seconds (Scenario.seconds).
    A VM ~40% slower took 794 s of 780 at full windows; a slower one shortens the
    remaining windows instead of running past 15 minutes (startup does not shrink,
    so each next scenario paces again from where the run is)."""
    planned = sum(s.seconds for s in remaining)
    if planned <= 0:
        return 1.0
    return min(1.0, max(MIN_SCALE, (BUDGET_S - elapsed_s) / planned))


def _run(scenario: Scenario, ctx: Context, out: Path) -> tuple[Any, list[Row], list[Path]]:
    """Measures one scenario; a failure becomes FAIL rows, not the end of the run."""
    try:
        results = scenario.measure(ctx)
        rows = scenario.judge(results)
    except Exception as error:  # noqa: BLE001 - reported in the table, with its traceback
        traceback.print_exc()
        message = f"error: {type(error).__name__}: {error}"[:200]
        return {"error": message}, [_failed(row_id, message) for row_id in scenario.rows], []
    plots = scenario.plots(results, out) if scenario.plots else []
    return results, rows, plots


def _failed(row_id: str, message: str) -> Row:
    try:
        what, target = spec(row_id).what, spec(row_id).target
    except StopIteration:
        what, target = row_id, ""
    return Row(row_id, what, target, message, passed=False)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    names = ", ".join(f"{s.name} ({' '.join(s.rows)})" for s in SCENARIOS)
    parser.add_argument(
        "--only", default=None, help=f"comma-separated scenarios or row ids: {names}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter rounds: a smoke run, not a measurement"
    )
    args = parser.parse_args()
    chosen = select(args.only)
    started = time.monotonic()
    out = RESULTS / datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    placement = Placement(layout())
    state = state_dir()
    results: dict[str, Any] = {}
    rows: list[Row] = []
    plots: list[Path] = []
    seconds: dict[str, int] = {}
    scales: dict[str, float] = {}
    try:
        for n, scenario in enumerate(chosen, 1):
            scale = 1.0 if args.quick else pace(time.monotonic() - started, chosen[n - 1 :])
            ctx = Context(state, args.quick, placement, scale)
            # Scenarios with load windows or fixed counts run them at `scale` (the docs list them).
            paced = f" (run behind time: at {scale:.2f})" if scale < 0.995 else ""
            print(
                f"[{n}/{len(chosen)}] {scenario.name}: {', '.join(scenario.rows)}{paced}",
                flush=True,
            )
            scales[scenario.name] = round(scale, 2)
            scenario_started = time.monotonic()
            results[scenario.name], filled, drawn = _run(scenario, ctx, out)
            # Each scenario's share of the run (make bench must fit in 15 minutes).
            seconds[scenario.name] = round(time.monotonic() - scenario_started)
            print(f"  ({scenario.name}: {seconds[scenario.name]} s)", flush=True)
            rows += filled
            plots += drawn
    finally:
        shutil.rmtree(state, ignore_errors=True)  # scratch only: the report goes to RESULTS
    rows = all_rows(rows)
    results["quick"] = args.quick
    results["seconds"] = {**seconds, "total": round(time.monotonic() - started)}
    results["scale"] = scales
    write_report(out, results, rows, placement.to_json(), plots)
    print()
    print(table(rows))
    print(f"\nreport: {out}  ({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
