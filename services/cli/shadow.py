"""`tokenmesh models shadow|compare`: shadow traffic and version comparison, through the edge.

tokenmesh models shadow MODEL VERSION --percent P   (mirror P% of live requests)
tokenmesh models shadow MODEL --off                 (or --percent 0: stop)
tokenmesh models compare MODEL BASELINE CANDIDATE [--since 1h]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import duration_pb2

from services.cli.exits import BadInput
from services.cli.output import as_dict
from services.router import rollouts
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb

TIMEOUT_S = 30.0
# One cell of the comparison table: a version's side -> its text.
Cell = Callable[[router_pb2.VersionComparison], str]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def add_parsers(actions: Any) -> list[argparse.ArgumentParser]:
    """Adds `shadow` and `compare` to the `models` actions; returns their parsers."""
    shadow = actions.add_parser(
        "shadow", help="mirror a share of a model's live requests to a version (--off stops)"
    )
    shadow.add_argument("model")
    shadow.add_argument("version", nargs="?", default="")
    shadow.add_argument("--percent", type=int, default=None, help="1-100 (0 stops)")
    shadow.add_argument("--off", action="store_true", help="stop the model's shadow traffic")
    shadow.set_defaults(run=models_shadow)
    compare = actions.add_parser(
        "compare", help="compare two versions on the same live requests (shadow pairs)"
    )
    compare.add_argument("model")
    compare.add_argument("baseline", help="the version that answered the callers")
    compare.add_argument("candidate", help="the shadow version")
    compare.add_argument("--since", default="1h", help="window: 30m, 1h, 2d (default 1h)")
    compare.set_defaults(run=models_compare)
    return [shadow, compare]


def shadow_request(args: argparse.Namespace) -> router_pb.SetShadowTrafficRequest:
    """Builds SetShadowTraffic from the command line."""
    if args.off or args.percent == 0:
        return router_pb.SetShadowTrafficRequest(model=args.model)
    if not args.version or args.percent is None:
        raise BadInput("models shadow MODEL VERSION --percent P (or MODEL --off)")
    return router_pb.SetShadowTrafficRequest(
        model=args.model, version=args.version, percent=args.percent
    )


def models_shadow(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    """Starts, changes or stops a model's shadow traffic."""
    reply = stub.SetShadowTraffic(shadow_request(args), metadata=metadata, timeout=TIMEOUT_S)
    model = reply.model
    if args.json:
        print(json.dumps(as_dict(model), indent=2))
    elif model.HasField("shadow"):
        print(
            f"{model.name}: mirroring {model.shadow.percent}% of live requests "
            f"to version {model.shadow.version}"
        )
    else:
        print(f"{model.name}: no shadow traffic")


def parse_since(value: str) -> duration_pb2.Duration:
    """Parses a window such as 90s, 30m, 1h or 2d."""
    found = _SPAN.match(value.strip())
    if found is None:
        raise BadInput(f"--since {value!r} is not like 30m, 1h or 2d")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(float(found[1]) * _UNITS[found[2]] * 1e9))
    return duration


def models_compare(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    """Prints two versions' figures over the same requests, side by side."""
    request = router_pb.CompareModelVersionsRequest(
        model=args.model,
        baseline_version=args.baseline,
        candidate_version=args.candidate,
        since=parse_since(args.since),
    )
    reply = stub.CompareModelVersions(request, metadata=metadata, timeout=TIMEOUT_S)
    if args.json:
        print(json.dumps(as_dict(reply), indent=2))
    else:
        print(describe(reply, args.since))


# Fewer pairs than this: the table says the figures are too few to judge by (a p99
# of 3 requests is their slowest; 1 agreeing pair of 1 read as 100.0%).
MIN_PAIRS = 30
_Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def _sampled(latency: router_pb2.LatencySummary) -> bool:
    """Whether a latency summarises any value (a router from before `samples` sends
    none: a summary of values reads above 0)."""
    return latency.samples > 0 or latency.mean_ms > 0


def _latency(read: Callable[[router_pb2.VersionComparison], router_pb2.LatencySummary]) -> Cell:
    """A latency's cell: `-` without a sample (0.0 read as "instant": no successful
    request, or one-token answers' inter-token latency)."""
    return lambda side: (
        f"{read(side).p50_ms:.1f} / {read(side).p99_ms:.1f}" if _sampled(read(side)) else "-"
    )


def wilson_interval(hits: int, total: int) -> tuple[float, float]:
    """Returns the 95% Wilson score interval of a share `hits / total` ((0, 1) without any)."""
    return rollouts.wilson_interval(hits, total, _Z95)


def _reasons(side: router_pb2.VersionComparison) -> str:
    total = side.requests or 1
    return " ".join(f"{r} {n / total:.0%}" for r, n in sorted(side.finish_reasons.items())) or "-"


def _lengths(side: router_pb2.VersionComparison) -> str:
    out = side.output_tokens
    return f"{out.mean:.1f} / {out.p50} / {out.p90} / {out.max}"


def _measured(side: router_pb2.VersionComparison) -> bool:
    """Tells whether any request of the window had log-probabilities. The reply has no
    presence for the two means (0.0 when none had any, e.g. only v1 Completes), and a
    measured window's confidence, a geometric-mean token probability, is above 0."""
    return side.mean_confidence > 0 or side.mean_logprob != 0


def _quality(value: Callable[[router_pb2.VersionComparison], float]) -> Cell:
    """A quality figure's cell: `-` when nothing measured it (0.000 read as "certain")."""
    return lambda side: f"{value(side):.3f}" if _measured(side) else "-"


ROWS: tuple[tuple[str, Cell], ...] = (
    ("requests", lambda s: str(s.requests)),
    ("ttft p50/p99 ms", _latency(lambda s: s.time_to_first_token)),
    ("itl p50/p99 ms", _latency(lambda s: s.inter_token_latency)),
    ("total p50/p99 ms", _latency(lambda s: s.total_latency)),
    ("queue p50/p99 ms", _latency(lambda s: s.queue_time)),
    ("error rate", lambda s: f"{s.error_rate:.3f}"),
    ("finish reasons", _reasons),
    ("output tokens mean/p50/p90/max", _lengths),
    ("mean token logprob", _quality(lambda s: s.mean_logprob)),
    ("mean confidence", _quality(lambda s: s.mean_confidence)),
)


def describe(reply: router_pb.CompareModelVersionsResponse, since: str) -> str:
    """Returns a comparison as a table: one row per figure, one column per version."""
    base, cand = reply.baseline, reply.candidate
    width = max(len(name) for name, _ in ROWS)
    lines = [
        f"{reply.model}: version {base.version} (served) vs {cand.version} (shadow), "
        f"last {since}: {reply.pairs} pairs",
        f"  {'':<{width}}  {'v' + base.version:>24}  {'v' + cand.version:>24}",
    ]
    for name, cell in ROWS:
        lines.append(f"  {name:<{width}}  {cell(base):>24}  {cell(cand):>24}")
    lines.append(_agreement(reply))
    lines.append(
        "  latencies leave out the wait for a slot (queue): a shadow copy waits behind "
        "the live requests"
    )
    if reply.pairs < MIN_PAIRS:
        lines.append(f"  fewer than {MIN_PAIRS} pairs: too few to judge the versions by")
    if reply.reversed_pairs:
        lines.append(
            f"  {reply.reversed_pairs} pairs the other way round (v{cand.version} served, "
            f"v{base.version} shadow) left out: tokenmesh models compare {reply.model} "
            f"{cand.version} {base.version}"
        )
    return "\n".join(lines)


def _agreement(reply: router_pb.CompareModelVersionsResponse) -> str:
    """The texts' agreement, with its 95% interval (a few pairs show a wide one)."""
    if not reply.seeded_pairs:
        return "  seeded pairs agreeing: none seeded (a seed or temperature 0 compares texts)"
    low, high = wilson_interval(reply.agreeing_pairs, reply.seeded_pairs)
    return (
        f"  seeded pairs agreeing: {reply.agreeing_pairs}/{reply.seeded_pairs} "
        f"({reply.agreement_rate:.1%}; 95% interval {low:.1%}-{high:.1%})"
    )
