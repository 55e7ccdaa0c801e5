"""`tokenmesh models rollout ...`: SLO-gated canary rollouts, through the edge.

tokenmesh models rollout [start] MODEL VERSION [--steps 5,25,50,100] [--step-seconds 60]
    [--max-error-rate 0.01] [--max-ttft-p99-ratio 1.5] [--min-requests 50]
tokenmesh models rollout status|pause|resume|abort MODEL

A model named like an operation ("status") is rolled out with `start`:
`rollout status 2` reads as the status of model "2".
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import duration_pb2

from services.cli.exits import BadInput
from services.cli.output import as_dict
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb

TIMEOUT_S = 10.0
OPERATIONS = {
    "status": ("GetRollout", router_pb.GetRolloutRequest),
    "pause": ("PauseRollout", router_pb.PauseRolloutRequest),
    "resume": ("ResumeRollout", router_pb.ResumeRolloutRequest),
    "abort": ("AbortRollout", router_pb.AbortRolloutRequest),
}


def add_parser(actions: Any) -> argparse.ArgumentParser:
    """Adds `rollout` to the `models` actions; returns its parser."""
    rollout: argparse.ArgumentParser = actions.add_parser(
        "rollout",
        help="start (MODEL VERSION) or operate (status|pause|resume|abort MODEL) a canary rollout",
    )
    # Fixed positionals (not nargs="+"): options may stand between them, as before.
    rollout.add_argument("first", help="MODEL, start, or status|pause|resume|abort")
    rollout.add_argument("second", help="VERSION to roll out, or MODEL")
    rollout.add_argument("third", nargs="?", help="VERSION, after start MODEL")
    rollout.add_argument("--steps", default="5,25,50,100", help="traffic shares, percent")
    rollout.add_argument("--step-seconds", type=float, default=60.0)
    rollout.add_argument("--max-error-rate", type=float, default=0.01)
    rollout.add_argument("--max-ttft-p99-ratio", type=float, default=1.5)
    rollout.add_argument("--min-requests", type=int, default=50)
    rollout.set_defaults(run=models_rollout)
    return rollout


def models_rollout(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    """Starts a rollout, or shows / pauses / resumes / aborts one."""
    words = [w for w in (args.first, args.second, args.third) if w is not None]
    operation, model, version = parse_words(words)
    if operation != "start":
        rpc, request_type = OPERATIONS[operation]
        reply = getattr(stub, rpc)(request_type(model=model), metadata=metadata, timeout=TIMEOUT_S)
    else:
        request = start_request(args, model, version)
        reply = stub.StartRollout(request, metadata=metadata, timeout=TIMEOUT_S)
    if args.json:
        print(json.dumps(as_dict(reply.rollout), indent=2))
    else:
        print(describe(reply.rollout))


def parse_words(words: Sequence[str]) -> tuple[str, str, str]:
    """Returns (operation, model, version) of `rollout`'s words ("start" or an OPERATIONS
    key; version "" for an operation)."""
    if len(words) == 3 and words[0] == "start":
        return "start", words[1], words[2]
    if len(words) == 2 and words[0] in OPERATIONS:
        return words[0], words[1], ""
    if len(words) == 2:
        return "start", words[0], words[1]
    raise BadInput(
        "models rollout takes [start] MODEL VERSION, or "
        f"{'|'.join(OPERATIONS)} MODEL; got {' '.join(words)!r}"
    )


def start_request(
    args: argparse.Namespace, model: str, version: str
) -> router_pb.StartRolloutRequest:
    """Builds StartRollout from the command line."""
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        raise BadInput(f"--steps {args.steps!r} is not a list of numbers") from None
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(args.step_seconds * 1e9))
    return router_pb.StartRolloutRequest(
        model=model,
        version=version,
        steps=steps,
        step_duration=duration,
        max_error_rate=args.max_error_rate,
        max_ttft_p99_ratio=args.max_ttft_p99_ratio,
        min_requests=args.min_requests,
    )


def _state(rollout: router_pb2.Rollout) -> str:
    return router_pb2.RolloutState.Name(rollout.state).removeprefix("ROLLOUT_STATE_").lower()


def _window(name: str, window: router_pb2.RolloutWindow) -> str:
    return (
        f"  {name:<8} {window.requests:>7} requests  {window.errors:>5} errors "
        f"({window.error_rate:.3f})  ttft p99 {window.ttft_p99_ms:.0f}ms"
    )


def describe(rollout: router_pb2.Rollout) -> str:
    """Returns a rollout as text: where it stands, this step's figures, its decisions."""
    steps = ",".join(map(str, rollout.steps))
    lines = [
        f"{rollout.model} {rollout.stable_version} -> {rollout.version}: {_state(rollout)} at "
        f"{rollout.weight}% (steps {steps}, {rollout.step_duration.seconds}s each; bounds: "
        f"error rate {rollout.max_error_rate:g}, ttft p99 x{rollout.max_ttft_p99_ratio:g}, "
        f"min {rollout.min_requests} requests)",
        f"  now: {rollout.reason}",
        _window(f"v{rollout.version}", rollout.canary),
        _window(f"v{rollout.stable_version}", rollout.stable),
        "  decisions:",
    ]
    for decision in rollout.decisions:
        when = datetime.datetime.fromtimestamp(decision.time.seconds, datetime.UTC)
        lines.append(
            f"    {when:%H:%M:%S} {decision.action:<8} -> {decision.weight:>3}%  {decision.reason}"
        )
    return "\n".join(lines)
