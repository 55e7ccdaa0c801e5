"""`tokenmesh jobs ...` and `tokenmesh webhooks ...`: asynchronous jobs, through the edge.

    tokenmesh jobs submit FILE.jsonl [--webhook URL] [--wait] [--metadata KEY=VALUE]...
        [--idempotency-key KEY] [--window SECONDS] [--json]
        (--wait exits 1 unless the job SUCCEEDED: FAILED, CANCELLED, EXPIRED, or
        the progress stream ended first)
    tokenmesh jobs list [--status STATUS] [--limit N] [--json]
    tokenmesh jobs get|cancel|redeliver ID [--json]
    tokenmesh jobs results ID > results.jsonl
    tokenmesh webhooks secret create|rotate [--overlap SECONDS] [--json]

Each line of FILE.jsonl is one item: {"complete": {<v2 CompleteRequest>}},
{"embed": {<v2 EmbedRequest>}} or {"generate": {...}}. Every command acts for
the calling key (--api-key / TOKENMESH_API_KEY; the local dev key by default),
which needs the `jobs` scope. A webhook secret is printed once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2, json_format

from services.cli.exits import INTERRUPTED, BadInput, positive_int
from services.cli.output import as_dict
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as pb

TIMEOUT_S = 30.0
SUCCEEDED = "SUCCEEDED"
FINAL = (SUCCEEDED, "FAILED", "CANCELLED", "EXPIRED")
Metadata = Sequence[tuple[str, str]]


def _line(job: jobs_pb2.Job) -> str:
    counts = job.counts
    return (
        f"{job.id}  {job.status:<9}  {counts.succeeded + counts.failed}/{counts.total} done"
        f"  ({counts.failed} failed)  webhook: {job.webhook.state or '-'}"
    )


def _print_job(job: jobs_pb2.Job, as_json: bool) -> None:
    print(json.dumps(as_dict(job), indent=2) if as_json else _line(job))


def read_items(path: Path) -> list[jobs_pb2.JobItem]:
    """Returns the items of a JSONL file; exits naming the first bad line."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json_format.Parse(line, jobs_pb2.JobItem()))
        except json_format.ParseError as exc:
            raise BadInput(f"{path}:{number}: not a job item: {exc}") from None
    if not items:
        raise BadInput(f"{path} holds no items")
    return items


def _metadata_pairs(pairs: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not (sep and key):
            raise BadInput(f"--metadata {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def jobs_submit(stub: Any, args: argparse.Namespace, metadata: Metadata) -> int:
    """Submits a job; with --wait, follows it and returns 0 only if it SUCCEEDED."""
    request = pb.CreateJobRequest(
        items=read_items(Path(args.file)),
        webhook_url=args.webhook or "",
        metadata=_metadata_pairs(args.metadata),
        idempotency_key=args.idempotency_key or "",
    )
    if args.window is not None:
        request.completion_window.CopyFrom(duration_pb2.Duration(seconds=args.window))
    job = stub.CreateJob(request, metadata=metadata, timeout=TIMEOUT_S)
    if not args.wait:
        _print_job(job, args.json)
        return 0
    try:
        job = _wait(stub, job, metadata)
    except KeyboardInterrupt:
        # Its id was only on the progress line: say the job runs on, and how to find it.
        print(
            f"\ntokenmesh: interrupted; job {job.id} keeps running (tokenmesh jobs get {job.id})",
            file=sys.stderr,
        )
        return INTERRUPTED
    _print_job(job, args.json)
    if job.status == SUCCEEDED:
        return 0
    if job.status in FINAL:
        print(f"tokenmesh: job {job.id} ended {job.status}", file=sys.stderr)
    else:  # the stream ended before the job did (e.g. the job was deleted)
        print(
            f"tokenmesh: job {job.id} is still {job.status or 'unknown'}: its progress stream "
            "ended before the job did",
            file=sys.stderr,
        )
    return 1


def _wait(stub: Any, job: jobs_pb2.Job, metadata: Metadata) -> jobs_pb2.Job:
    """Follows the job's progress stream (WatchJob) until it ends, showing it on stderr;
    returns the job as last seen (the caller checks whether it ended)."""
    for update in stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata):
        job = update.event.job
        print(f"\r{_line(job)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return job


def jobs_list(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    reply = stub.ListJobs(
        pb.ListJobsRequest(page_size=args.limit, status=args.status or ""),
        metadata=metadata,
        timeout=TIMEOUT_S,
    )
    if args.json:
        print(json.dumps(as_dict(reply), indent=2))
        return
    for job in reply.jobs:
        print(_line(job))
    if not reply.jobs:
        print("no jobs")


def jobs_get(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    _print_job(
        stub.GetJob(pb.GetJobRequest(id=args.id), metadata=metadata, timeout=TIMEOUT_S), args.json
    )


def jobs_cancel(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    job = stub.CancelJob(pb.CancelJobRequest(id=args.id), metadata=metadata, timeout=TIMEOUT_S)
    _print_job(job, args.json)


def jobs_redeliver(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    request = pb.RedeliverWebhookRequest(id=args.id)
    _print_job(stub.RedeliverWebhook(request, metadata=metadata, timeout=TIMEOUT_S), args.json)


def jobs_results(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    """Prints every result as one JSON line, in item order."""
    token = ""
    while True:
        page = stub.ListJobResults(
            pb.ListJobResultsRequest(id=args.id, page_size=1000, page_token=token),
            metadata=metadata,
            timeout=TIMEOUT_S,
        )
        for result in page.results:
            print(json.dumps(as_dict(result), separators=(",", ":")))
        token = page.next_page_token
        if not token:
            return


def secret_create(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    reply = stub.CreateWebhookSecret(
        pb.CreateWebhookSecretRequest(), metadata=metadata, timeout=TIMEOUT_S
    )
    _print_secret(reply, args.json)


def secret_rotate(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    request = pb.RotateWebhookSecretRequest()
    if args.overlap is not None:
        request.overlap.CopyFrom(duration_pb2.Duration(seconds=args.overlap))
    _print_secret(
        stub.RotateWebhookSecret(request, metadata=metadata, timeout=TIMEOUT_S), args.json
    )


def _print_secret(reply: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(as_dict(reply), indent=2))
        return
    print(reply.secret)
    print(
        f"(key {reply.key_id}: shown only now; verify webhook-signature with it)", file=sys.stderr
    )


def add_parsers(groups: Any) -> list[argparse.ArgumentParser]:
    """Adds the `jobs` and `webhooks` command groups; returns their commands."""
    jobs = groups.add_parser("jobs", help="asynchronous jobs (through the edge)")
    jobs.set_defaults(target="jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="submit a JSONL file of v2 requests")
    submit.add_argument("file", metavar="FILE.jsonl")
    submit.add_argument("--webhook", metavar="URL", help="signed completion callback (https)")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait until the job ends; exit 1 unless it SUCCEEDED",
    )
    submit.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    submit.add_argument("--idempotency-key", metavar="KEY")
    submit.add_argument(
        "--window", type=positive_int, metavar="SECONDS", help="completion window (above 0)"
    )
    submit.set_defaults(run=jobs_submit)
    listing = actions.add_parser("list", help="the key's jobs, newest first")
    listing.add_argument("--status", help="QUEUED, RUNNING, SUCCEEDED, FAILED, ...")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(run=jobs_list)
    commands = [submit, listing]
    for name, run, text in (
        ("get", jobs_get, "one job"),
        ("cancel", jobs_cancel, "stop a job (finished results are kept)"),
        ("results", jobs_results, "every result as JSON lines, in item order"),
        ("redeliver", jobs_redeliver, "send a finished job's webhook again"),
    ):
        command = actions.add_parser(name, help=text)
        command.add_argument("id")
        command.set_defaults(run=run)
        commands.append(command)

    webhooks = groups.add_parser("webhooks", help="webhook signing secrets (through the edge)")
    webhooks.set_defaults(target="jobs")
    secret = webhooks.add_subparsers(dest="thing", required=True).add_parser(
        "secret", help="the calling key's webhook secret"
    )
    secret_actions = secret.add_subparsers(dest="action", required=True)
    create = secret_actions.add_parser("create", help="create it (printed once)")
    create.set_defaults(run=secret_create)
    rotate = secret_actions.add_parser("rotate", help="replace it (printed once)")
    rotate.add_argument(
        "--overlap", type=int, metavar="SECONDS", help="old one signs too this long (24 h)"
    )
    rotate.set_defaults(run=secret_rotate)
    return [*commands, create, rotate]
