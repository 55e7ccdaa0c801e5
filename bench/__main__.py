"""`make bench`: measures every scenario against a baseline from the same run.

Prints progress and a targets table; writes bench/results/<timestamp>/ with
results.json, summary.md and PNG plots. Bounded: every load loop has a count
and a time limit, and the whole run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time
from pathlib import Path
from typing import Any

from bench import ceiling, edge, inference, mtls, templates, usage
from bench.report import Target, targets_table, write_report
from bench.servers import state_dir

RESULTS = Path(__file__).resolve().parent / "results"


def _inference_targets(results: dict[str, Any]) -> list[Target]:
    targets = []
    served, rounds = results["served"], results["served_ratio_rounds"]
    ratio = rounds["served_median"] / rounds["ceiling_median"]
    uncached = rounds["uncached_median"] / rounds["ceiling_median"]
    targets.append(
        Target(
            "served tokens/s at 32 streams vs engine ceiling at batch 32",
            ">= 80%",
            f"{ratio:.0%} (median of {len(rounds['ceiling_tokens_per_s'])} interleaved rounds;"
            f" every bench prompt from the prefix cache; computed each time: {uncached:.0%})",
            ratio >= 0.8,
        )
    )
    shared = rounds["system_prompt_ttft"]
    cached_ttft, computed_ttft = (shared[k]["ttft_p50_ms"] for k in ("cached", "uncached"))
    targets.append(
        Target(
            f"prefix cache: TTFT p50 with a shared {shared['cached']['prompt_tokens']}-token"
            " system prompt, cached vs computed",
            "faster",
            f"{cached_ttft:.1f} vs {computed_ttft:.1f} ms ({computed_ttft / cached_ttft:.1f}x)",
            cached_ttft < computed_ttft,
        )
    )
    ttft_ratio = served["32"]["ttft_p99_ms"] / max(served["1"]["ttft_p99_ms"], 1e-9)
    bare = results["served_bare"]
    bare_ratio = bare["32"]["ttft_p99_ms"] / max(bare["1"]["ttft_p99_ms"], 1e-9)
    burst_ratio = served["32"]["opening_ttft_p99_ms"] / max(served["1"]["ttft_p99_ms"], 1e-9)
    targets.append(
        Target(
            "TTFT p99 at 32 streams vs TTFT p99 at 1 stream",
            "<= 5x",
            f"{ttft_ratio:.1f}x (opening burst of 32 at once: {burst_ratio:.1f}x;"
            f" a bare grpc.aio streamer, same client: {bare_ratio:.1f}x)",
            ttft_ratio <= 5,
        )
    )
    scaling = served["32"]["tokens_per_s"] / served["1"]["tokens_per_s"]
    targets.append(
        Target(
            "aggregate tokens/s at 32 streams vs 1 stream",
            "several times",
            f"{scaling:.1f}x",
            scaling >= 3,
        )
    )
    overhead = results["serving_overhead"]
    msg_ratio = overhead["zero_compute"]["messages_per_s"] / overhead["bare"]["messages_per_s"]
    tok_ratio = overhead["zero_compute"]["tokens_per_s"] / overhead["bare"]["tokens_per_s"]
    targets.append(
        Target(
            "zero-compute engine vs bare grpc.aio streamer (messages/s)",
            ">= 80%",
            f"{msg_ratio:.0%}",
            msg_ratio >= 0.8,
        )
    )
    targets.append(
        Target(
            "zero-compute engine vs bare grpc.aio streamer (tokens/s)",
            ">= 80%",
            f"{tok_ratio:.0%}",
            tok_ratio >= 0.8,
        )
    )
    return targets


def _edge_targets(results: dict[str, Any]) -> list[Target]:
    latency, rps = results["edge"]["latency"], results["edge"]["requests_per_s"]
    added_p50 = latency["edge-jwt"]["p50_ms"] - latency["direct"]["p50_ms"]
    added_p99 = latency["edge-jwt"]["p99_ms"] - latency["direct"]["p99_ms"]
    ratio = rps["edge-jwt"] / rps["direct"]
    bare_p50 = latency["edge-jwt-no-ratelimit"]["p50_ms"] - latency["direct"]["p50_ms"]
    bare_ratio = rps["edge-jwt-no-ratelimit"] / rps["direct"]
    routing = results["edge"]["routing"]
    routing_p50 = routing["routed"]["p50_ms"] - routing["unrouted"]["p50_ms"]
    return [
        Target(
            "model routing (Lua + xDS routes) vs the same edge without, added p50",
            "<= 0.3 ms",
            f"{routing_p50:+.2f} ms",
            routing_p50 <= 0.3,
        ),
        Target(
            "full edge (JWT), added unary latency p50",
            "<= 1.0 ms",
            f"{added_p50:+.2f} ms",
            added_p50 <= 1.0,
        ),
        Target(
            "full edge (JWT), added unary latency p99",
            "<= 3.0 ms",
            f"{added_p99:+.2f} ms",
            added_p99 <= 3.0,
        ),
        Target(
            "full edge (JWT) throughput vs direct-to-worker", ">= 90%", f"{ratio:.0%}", ratio >= 0.9
        ),
        Target(
            "edge without rate limiting (JWT), added unary latency p50",
            "<= 1.0 ms",
            f"{bare_p50:+.2f} ms",
            bare_p50 <= 1.0,
        ),
        Target(
            "edge without rate limiting (JWT) throughput vs direct",
            ">= 90%",
            f"{bare_ratio:.0%}",
            bare_ratio >= 0.9,
        ),
    ]


def _usage_targets(results: dict[str, Any]) -> list[Target]:
    echo, limiter = results["usage"]["echo"], results["usage"]["rate_limit"]
    ratio = limiter["rps"] / echo["rps"]
    unleased = results["usage"]["no_leases"]["rps"] / echo["rps"]
    return [
        Target(
            "rate-limit decisions/s vs bare grpc.aio echo",
            ">= 70%",
            f"{ratio:.0%} (keys far below their limits, admitted from leases; leases off,"
            f" a Redis round trip per decision as above half a limit: {unleased:.0%})",
            ratio >= 0.7,
        ),
        Target(
            "rate-limit decision p99, one at a time (median of the rounds)",
            "<= 3 ms",
            f"{limiter['sequential']['p99_ms']:.2f} ms (the echo: {echo['sequential']['p99_ms']:.2f} ms)",
            limiter["sequential"]["p99_ms"] <= 3,
        ),
    ]


def _mtls_targets(results: dict[str, Any]) -> list[Target]:
    cost = results["mtls_cost"]
    unary, streams, ratios = cost["unary"], cost["streams"], cost["ratios"]
    rounds = f"median of {cost['rounds']} interleaved rounds' ratios"
    mtls_u, plain_u = unary["mtls"], unary["plaintext"]
    mtls_s, plain_s = streams["mtls"], streams["plaintext"]
    return [
        Target(
            "mTLS vs plaintext, same worker: unary Complete p50, one at a time",
            "reported",
            f"{mtls_u['p50_ms']:.2f} vs {plain_u['p50_ms']:.2f} ms"
            f" ({ratios['unary_p50']['median']:.2f}x, {rounds}); worker CPU"
            f" {mtls_u['worker_cpu_us_per_call']:.0f} vs {plain_u['worker_cpu_us_per_call']:.0f}"
            f" us/call ({ratios['unary_worker_cpu']['median']:.2f}x), client CPU"
            f" {mtls_u['client_cpu_us_per_call']:.0f} vs {plain_u['client_cpu_us_per_call']:.0f}"
            " us/call",
            None,
        ),
        Target(
            f"mTLS vs plaintext, same worker: streamed tokens/s at {cost['streams_concurrency']}"
            " streams (demo-lm)",
            "reported",
            f"{mtls_s['tokens_per_s']:.0f} vs {plain_s['tokens_per_s']:.0f} tokens/s"
            f" ({ratios['tokens_per_s']['median']:.0%}, {rounds}); worker CPU"
            f" {mtls_s['worker_cpu_us_per_token']:.0f} vs"
            f" {plain_s['worker_cpu_us_per_token']:.0f} us/token"
            f" ({ratios['stream_worker_cpu']['median']:.2f}x)",
            None,
        ),
    ]


def _template_targets(results: dict[str, Any]) -> list[Target]:
    shared, distinct = results["template_heads"]["shared"], results["template_heads"]["distinct"]
    p50 = (shared["ttft_p50_ms"], distinct["ttft_p50_ms"])
    p99 = (shared["ttft_p99_ms"], distinct["ttft_p99_ms"])
    return [
        Target(
            f"prompt templates: TTFT of calls sharing one {shared['prompt_tokens']:.0f}-token"
            " template head vs distinct heads of the same size (edge, 2 demo-lm workers)",
            "faster",
            f"p50 {p50[0]:.1f} vs {p50[1]:.1f} ms ({p50[1] / max(p50[0], 1e-9):.1f}x),"
            f" p99 {p99[0]:.1f} vs {p99[1]:.1f} ms; {shared['cached_prompt_tokens']:.0f}"
            f" tokens from the prefix cache vs {distinct['cached_prompt_tokens']:.0f}",
            p50[0] < p50[1],
        )
    ]


def _measure(only: str | None, state: Path) -> tuple[dict[str, Any], list[Target], Any]:
    """Runs the chosen scenarios; returns results, targets and raw stream records."""
    results: dict[str, Any] = {}
    targets: list[Target] = []
    streams: dict[str, Any] = {}
    if only in (None, "inference"):
        print("[1/6] engine ceiling (in-process ONNX Runtime, demo-lm)", flush=True)
        results["engine_ceiling"] = ceiling.engine_ceiling()
        print("[2/6] served streams through one worker over gRPC (mTLS)", flush=True)
        results["served"], streams, results["served_ratio_rounds"] = inference.served_streams(state)
        results["served_bare"] = inference.bare_streams(state)
        print("[3/6] serving overhead: zero-compute engine vs bare grpc.aio", flush=True)
        results["serving_overhead"] = inference.serving_overhead(state)
        targets += _inference_targets(results)
    if only in (None, "mtls"):
        print("[4/6] what mTLS costs: the same worker over mTLS vs plaintext", flush=True)
        results["mtls_cost"] = mtls.mtls_cost(state)
        targets += _mtls_targets(results)
    if only in (None, "usage"):
        print("[5/6] rate-limit decisions vs bare grpc.aio echo; metering throughput", flush=True)
        results["usage"] = usage.rate_limit_decisions(state)
        targets += _usage_targets(results)
    if only in (None, "edge"):
        print("[6/6] edge overhead: direct vs full edge vs bare Envoy vs bare grpc.aio", flush=True)
        results["edge"] = edge.edge_overhead(state)
        targets += _edge_targets(results)
    if only in (None, "templates"):
        print("[+] shared template heads: prefix affinity + prefix cache, through the edge")
        results["template_heads"] = templates.template_heads(state)
        targets += _template_targets(results)
    return results, targets, streams


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--only", choices=["inference", "mtls", "edge", "usage", "templates"], default=None
    )
    args = parser.parse_args()
    started = time.monotonic()
    state = state_dir()
    try:
        results, targets, streams = _measure(args.only, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)  # scratch only: the report goes to RESULTS
    out = RESULTS / datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    write_report(out, results, targets, streams)
    print()
    print(targets_table(targets))
    print(f"\nreport: {out}  ({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
