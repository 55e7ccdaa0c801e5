"""The benchmark's rows: what each target measures, and the registry of scenarios.

A row is one target of the issue's table (S1 ... K2), or an extra figure a
scenario reports. A scenario measures once and fills one or more rows:

    Scenario("serving", ("S1", "S2", "S3"), measure, judge, plots)

`measure(ctx)` returns the scenario's results (JSON-able), `judge(results)`
turns them into Rows, `plots(results, out)` writes PNGs and returns their
paths. To add rows, write those three functions in a module of your own and
add one Scenario line to `bench.registry.SCENARIOS`; the table, the JSON, the
Markdown report and `--only` pick it up. Rows no scenario filled still print,
as "not run", with their target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pinning import Placement


@dataclass(frozen=True)
class Spec:
    """Spec is a row's fixed part: what it measures and its target."""

    id: str
    what: str
    target: str


#: SPECS: the issue's targets, in the order the table prints them.
SPECS: tuple[Spec, ...] = (
    Spec("S1", "served tokens/s at 32 streams vs in-process engine ceiling at batch 32", ">= 85%"),
    Spec(
        "S2",
        "TTFT p99 at 32 streams vs a bare grpc.aio streamer's, same load and client",
        "<= 1.5x",
    ),
    Spec(
        "S3",
        "worker CPU per stream message, token batching off, engine sleeping 1 ms a step,"
        " vs a bare grpc.aio streamer's",
        "<= 1.5x",
    ),
    Spec("E1", "full edge chain unary p50 vs direct-to-worker p50", "<= 1.6x"),
    Spec("E1k", "API-key caller vs JWT caller through the edge, unary p50", "<= 1.1x"),
    Spec(
        "E2",
        "full edge throughput vs direct (demo-lm Complete, 16 tokens, 32 concurrent)",
        ">= 90%",
    ),
    Spec(
        "E3",
        "edge CPU per request (Envoy + every Python callout + the rate-limit Redis), cheapest call",
        "reported",
    ),
    Spec("R1", "rate-limit decisions/s vs bare grpc.aio echo", ">= 70%"),
    Spec(
        "P1",
        "OpenAI surface vs LiteLLM proxy, same worker: added p50 and p99",
        "<= 1/3 of LiteLLM's",
    ),
    Spec(
        "P2",
        "the same, requests/s (32 concurrent) and streamed tokens/s (32 streams)",
        ">= 2x LiteLLM's",
    ),
    Spec(
        "K1",
        "prefix-heavy traffic, 2 workers: prefix affinity vs round robin",
        ">= 3x lower TTFT p90, >= 1.3x throughput",
    ),
    Spec(
        "K2",
        "low-reuse control (all prompts distinct): affinity vs round robin",
        "no worse than 5%",
    ),
    Spec(
        "J1",
        "interactive TTFT p99 while a 2,000-item job runs vs without it (same worker)",
        "<= 1.5x",
    ),
)
TARGET_IDS = tuple(spec.id for spec in SPECS)


@dataclass(frozen=True)
class Row:
    """Row is one measured target (or an extra figure: an id not in SPECS).

    passed: None for a figure without a goal ("reported"); ran: False for a
    row no scenario of this run filled.
    """

    id: str
    what: str
    target: str
    measured: str = ""
    baseline: str = ""
    cpu: str = ""
    passed: bool | None = None
    ran: bool = True

    @property
    def result(self) -> str:
        """Returns PASS, FAIL, "reported", or "not run"."""
        if not self.ran:
            return "not run"
        if self.passed is None:
            return "reported"
        return "PASS" if self.passed else "FAIL"


def spec(row_id: str) -> Spec:
    """Returns the Spec of target `row_id`."""
    return next(s for s in SPECS if s.id == row_id)


def row(
    row_id: str,
    measured: str,
    passed: bool | None,
    baseline: str = "",
    cpu: str = "",
) -> Row:
    """Returns target `row_id`'s row with what the run measured."""
    s = spec(row_id)
    return Row(s.id, s.what, s.target, measured, baseline, cpu, passed)


@dataclass(frozen=True)
class Context:
    """Context is what every scenario gets: scratch space, mode, and where processes run."""

    state: Path  # the run's scratch directory (removed afterwards)
    quick: bool  # fewer rounds and shorter windows: a smoke run, not a measurement
    placement: Placement  # record every process a scenario pins
    #: The share of its load windows and fixed request counts a scenario runs: below 1
    #: only when the run has fallen behind the time `make bench` has (bench.__main__).
    scale: float = 1.0

    def scaled(self, value: float) -> float:
        """`value` (a window's seconds, a request count) at this run's scale."""
        return value * self.scale


Measure = Callable[[Context], dict[str, Any]]
Judge = Callable[[dict[str, Any]], list[Row]]
Plots = Callable[[dict[str, Any], Path], list[Path]]


@dataclass(frozen=True)
class Scenario:
    """Scenario measures once and fills `rows` (see the module docstring).

    default: run by a plain `make bench` (False: only when named by --only).
    seconds: what it takes on a quiet 2-core VM, setup included (the run's pacing).
    """

    name: str
    rows: tuple[str, ...]
    measure: Measure
    judge: Judge
    plots: Plots | None = None
    default: bool = True
    seconds: int = 60


def table(rows: list[Row]) -> str:
    """Returns the rows as a Markdown table; each line starts with the id, ends with the result."""
    lines = [
        "| id | what | measured | baseline (same run) | CPU cost | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.id} | {r.what} | {r.measured} | {r.baseline} | {r.cpu} | {r.target} | {r.result} |"
        for r in rows
    ]
    return "\n".join(lines)


def all_rows(filled: list[Row]) -> list[Row]:
    """Returns every target row (filled, or "not run") in SPECS order, then the extras."""
    by_id = {r.id: r for r in filled}
    rows = [by_id.get(s.id) or Row(s.id, s.what, s.target, ran=False) for s in SPECS]
    return rows + [r for r in filled if r.id not in TARGET_IDS]
