"""Every scenario `make bench` can run, and the rows it fills (see bench.rows).

To add rows: write measure/judge/plots in a module of your own, import it
here and add one Scenario line to SCENARIOS. The scenarios below that wrap
older measurements (edge, usage, templates, mtls) keep their judges here.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench import edge, fairness, mtls, openai, peer, policy, routing, serving, templates, usage
from bench import jobs_load as jobs_scenario
from bench import load_routing as load_scenario
from bench.rows import Context, Row, Scenario, row


def _edge_measure(ctx: Context) -> dict[str, Any]:
    return edge.edge_overhead(ctx)


def _edge_judge(results: dict[str, Any]) -> list[Row]:
    latency = results["latency"]
    direct, jwt, key = (latency[k]["p50_ms"] for k in ("direct", "edge-jwt", "edge-api-key"))
    envoy = latency["envoy"]["p50_ms"]
    # Ratios are taken within a round (the paths ran interleaved), then the median.
    rounds = results.get("latency_rounds") or [{k: v["p50_ms"] for k, v in latency.items()}]
    e1 = _median([r["edge-jwt"] / max(r["direct"], 1e-9) for r in rounds])
    e1k = _median([r["edge-api-key"] / max(r["edge-jwt"], 1e-9) for r in rounds])
    bare = _median([r["envoy"] / max(r["direct"], 1e-9) for r in rounds])
    uncached_x = _median([r["edge-api-key-no-cache"] / max(r["edge-jwt"], 1e-9) for r in rounds])
    of_rounds = f"median of {len(rounds)} interleaved rounds"
    # Each path's CPU per request round by round: the medians are taken here.
    cpu_rounds = results["cpu_us_per_request"]
    cpu = edge.cpu_medians(cpu_rounds)
    uncached = latency["edge-api-key-no-cache"]["p50_ms"]
    complete = results["complete_rps"]
    edge_rps, direct_rps = _median(complete["edge-jwt"]), _median(complete["direct"])
    e2 = edge_rps / max(direct_rps, 1e-9)
    by_jwt = cpu["edge-jwt"]
    edge_cpu, worker_cpu = by_jwt.get("edge", 0.0), cpu["direct"].get("inference-0", 0.0)
    return [
        row(
            "E1",
            f"{e1:.2f}x (edge {jwt:.2f} ms; ListModels, one at a time; {of_rounds})",
            e1 <= 1.6,
            baseline=f"direct {direct:.2f} ms (bare Envoy proxy {envoy:.2f} ms: {bare:.2f}x)",
            cpu=_cpu(by_jwt),
        ),
        row(
            "E1k",
            f"{e1k:.2f}x (API key {key:.2f} ms; {of_rounds}; without the edge key cache"
            f" {uncached_x:.2f}x, {uncached:.2f} ms)",
            e1k <= 1.1,
            baseline=f"JWT {jwt:.2f} ms",
            cpu=_cpu(cpu["edge-api-key"]),
        ),
        row(
            "E2",
            f"{e2:.0%} ({edge_rps:.0f} req/s, median of {len(complete['direct'])} rounds)",
            e2 >= 0.9,
            baseline=f"direct {direct_rps:.0f} req/s"
            + (
                f" (bare Envoy proxy {_median(complete['envoy']):.0f} req/s:"
                f" {_median(complete['envoy']) / max(direct_rps, 1e-9):.0%})"
                if "envoy" in complete
                else ""
            ),
            cpu=_complete_cpu(complete.get("cpu_us_per_request", {})),
        ),
        row(
            "E3",
            f"{edge_cpu:.0f} µs/request (Envoy {by_jwt.get('envoy', 0.0):.0f}, auth"
            f" {by_jwt.get('auth', 0.0):.0f}, usage {by_jwt.get('usage', 0.0):.0f}, rate-limit"
            f" Redis {by_jwt.get('redis-limits', 0.0):.0f}; API key:"
            f" {cpu['edge-api-key'].get('edge', 0.0):.0f}); ListModels, JWT; median of"
            f" {len(cpu_rounds['edge-jwt'])} interleaved rounds",
            None,
            baseline=f"worker {worker_cpu:.0f} µs/request (direct)"
            + (
                f"; a bare Envoy proxy {cpu['envoy'].get('bare-envoy', 0.0):.0f} µs/request"
                if "envoy" in cpu
                else ""
            ),
        ),
    ]


def _median(values: list[float]) -> float:
    """The median (of an even count, the mean of the middle two); 0 for no values."""
    return statistics.median(values) if values else 0.0


def _complete_cpu(paths: dict[str, dict[str, float]]) -> str:
    """E2's mesh CPU per Complete on each path: the total, then each process."""
    return "; ".join(
        f"{path} {sum(per.values()):.0f} µs/req ("
        + ", ".join(f"{name} {value:.0f}" for name, value in per.items())
        + ")"
        for path, per in paths.items()
    )


def _cpu(per: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f}" for name, value in per.items()) + " µs/req"


def _edge_plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bench.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in results["latencies_ms"].items():
        top = max(5.0, float(np.percentile(values, 99)))
        ax.hist(values, bins=60, alpha=0.5, label=name, range=(0, top))
    ax.set(title="Unary latency histogram", xlabel="ms", ylabel="calls")
    ax.legend()
    return [save_figure(fig, out / "unary_latency.png")]


def _usage_measure(ctx: Context) -> dict[str, Any]:
    return usage.rate_limit_decisions(ctx)


def _usage_judge(results: dict[str, Any]) -> list[Row]:
    echo, limiter, unleased = results["echo"], results["rate_limit"], results["no_leases"]
    ratio = limiter["rps"] / echo["rps"]
    by_cpu = _per_cpu_ratio(limiter, echo)
    return [
        row(
            "R1",
            f"{ratio:.0%}, by CPU {by_cpu:.0%} ({limiter['rps']:.0f} decisions/s from leases;"
            f" leases off, a Redis round trip each: {unleased['rps'] / echo['rps']:.0%}, by CPU"
            f" {_per_cpu_ratio(unleased, echo):.0%}; one at a time p99"
            f" {limiter['sequential']['p99_ms']:.2f} ms)",
            ratio >= 0.7,
            baseline=f"echo {echo['rps']:.0f} req/s",
            cpu=_cpu_per_call(results),
        )
    ]


def _per_cpu_ratio(limiter: dict[str, Any], echo: dict[str, Any]) -> float:
    """Calls per CPU second of a limiter over the echo's (0 when not measured)."""
    spent = limiter.get("cpu_us_per_call", 0.0)
    return echo.get("cpu_us_per_call", 0.0) / spent if spent else 0.0


def _cpu_per_call(results: dict[str, Any]) -> str:
    """The CPU µs per call of each R1 target (a limiter's with its windows' Redis)."""
    return (
        ", ".join(
            f"{label} {results[name].get('cpu_us_per_call', 0.0):.0f}"
            for name, label in (
                ("rate_limit", "limiter"),
                ("no_leases", "leases off"),
                ("echo", "echo"),
            )
        )
        + " µs/call"
    )


def _templates_measure(ctx: Context) -> dict[str, Any]:
    return templates.template_heads(ctx)


def _templates_judge(results: dict[str, Any]) -> list[Row]:
    shared, distinct = results["shared"], results["distinct"]
    p50 = (shared["ttft_p50_ms"], distinct["ttft_p50_ms"])
    p99 = (shared["ttft_p99_ms"], distinct["ttft_p99_ms"])
    return [
        Row(
            "T1",
            f"prompt templates: TTFT of calls sharing one {shared['prompt_tokens']:.0f}-token"
            " template head vs distinct heads of the same size (edge, 2 demo-lm workers)",
            "faster",
            f"p50 {p50[0]:.1f} ms ({p50[1] / max(p50[0], 1e-9):.1f}x faster), p99 {p99[0]:.1f} ms;"
            f" {shared['cached_prompt_tokens']:.0f} tokens from the prefix cache",
            f"distinct heads p50 {p50[1]:.1f} ms, p99 {p99[1]:.1f} ms",
            passed=p50[0] < p50[1],
        )
    ]


def _mtls_measure(ctx: Context) -> dict[str, Any]:
    return mtls.mtls_cost(ctx.state)


def _mtls_judge(results: dict[str, Any]) -> list[Row]:
    unary, streams, ratios = results["unary"], results["streams"], results["ratios"]
    return [
        Row(
            "M1",
            "mTLS vs plaintext, same worker: unary Complete p50, one at a time",
            "reported",
            f"{unary['mtls']['p50_ms']:.2f} ms ({ratios['unary_p50']['median']:.2f}x)",
            f"plaintext {unary['plaintext']['p50_ms']:.2f} ms",
            f"worker {unary['mtls']['worker_cpu_us_per_call']:.0f} vs"
            f" {unary['plaintext']['worker_cpu_us_per_call']:.0f} µs/call",
        ),
        Row(
            "M2",
            "mTLS vs plaintext, same worker: streamed tokens/s at 32 streams (demo-lm)",
            "reported",
            f"{streams['mtls']['tokens_per_s']:.0f} tokens/s"
            f" ({ratios['tokens_per_s']['median']:.0%})",
            f"plaintext {streams['plaintext']['tokens_per_s']:.0f} tokens/s",
            f"worker {streams['mtls']['worker_cpu_us_per_token']:.0f} vs"
            f" {streams['plaintext']['worker_cpu_us_per_token']:.0f} µs/token",
        ),
    ]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "serving", ("S1", "S2", "S3"), serving.measure, serving.judge, serving.plots, seconds=145
    ),
    Scenario(
        "edge", ("E1", "E1k", "E2", "E3"), _edge_measure, _edge_judge, _edge_plots, seconds=125
    ),
    Scenario("usage", ("R1",), _usage_measure, _usage_judge, seconds=32),
    Scenario("templates", ("T1",), _templates_measure, _templates_judge, seconds=13),
    Scenario("mtls", ("M1", "M2"), _mtls_measure, _mtls_judge, default=False),
    Scenario("openai", ("O1", "O2"), openai.measure, openai.judge, default=False),
    Scenario("fairness", ("F1",), fairness.measure, fairness.judge, seconds=77),
    Scenario("policy", ("C1", "C2"), policy.measure, policy.judge, seconds=3),
    Scenario("peer", ("P1", "P2"), peer.measure, peer.judge, peer.plots, seconds=108),
    Scenario("routing", ("K1", "K2"), routing.measure, routing.judge, routing.plots, seconds=140),
    Scenario("load_routing", ("L1",), load_scenario.measure, load_scenario.judge, seconds=56),
    Scenario("jobs", ("J1",), jobs_scenario.measure, jobs_scenario.judge, seconds=50),
)
ALIASES = {"inference": "serving"}  # older --only names


def select(only: str | None) -> list[Scenario]:
    """Returns the scenarios to run: the default ones, or those `only` names.

    only: comma-separated scenario names and/or row ids (S1,S2 runs "serving").
    """
    if not only:
        return [s for s in SCENARIOS if s.default]
    wanted = {ALIASES.get(w.strip(), w.strip()) for w in only.split(",") if w.strip()}
    chosen = [s for s in SCENARIOS if s.name in wanted or wanted & set(s.rows)]
    known = {s.name for s in SCENARIOS} | {r for s in SCENARIOS for r in s.rows}
    unknown = wanted - known
    if unknown:
        raise SystemExit(
            f"--only: unknown {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    return chosen
