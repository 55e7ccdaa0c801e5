"""`tokenmesh policies ...` and `tokenmesh samples ...`: content policies and redacted samples.

    tokenmesh policies create NAME [--redact DETECTOR,...] [--block DETECTOR,...]
        [--flag DETECTOR,...] [--block-pattern REGEX]... [--block-keyword WORD]...
        [--output-block-pattern REGEX]... [--max-input-chars N] [--json]
    tokenmesh policies list|get NAME[@VERSION]
    tokenmesh policies attach NAME[@VERSION] --tenant TENANT | --key KEY_ID
    tokenmesh policies detach --tenant TENANT | --key KEY_ID
    tokenmesh samples enable --tenant TENANT --rate 1.0 [--note TEXT]
    tokenmesh samples disable --tenant TENANT
    tokenmesh samples export --tenant TENANT [--since 2025-01-31T00:00:00Z | 1h] > samples.jsonl

Every command goes through the edge with an admin key (RouterService).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from services.cli.exits import BadInput
from services.cli.output import as_dict
from tokenmesh.router.v1 import policy_pb2

TIMEOUT_S = 10.0
DETECTORS = ("email", "phone", "card", "iban", "ssn", "ip", "secret")
_ACTIONS = {
    "block": policy_pb2.POLICY_ACTION_BLOCK,
    "redact": policy_pb2.POLICY_ACTION_REDACT,
    "flag": policy_pb2.POLICY_ACTION_FLAG,
}
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
Metadata = Sequence[tuple[str, str]]


def _print(message: Any, as_json: bool, text: str) -> None:
    print(json.dumps(as_dict(message), indent=2) if as_json else text)


def _detectors(value: str | None, option: str) -> list[str]:
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise BadInput(
            f"--{option}: unknown detector(s) {', '.join(unknown)} (known: {', '.join(DETECTORS)})"
        )
    return names


def pii_rules(args: argparse.Namespace) -> list[policy_pb2.PiiRule]:
    """Returns the detectors of --redact/--block/--flag with their actions."""
    rules: dict[str, policy_pb2.PiiRule] = {}
    for action, number in _ACTIONS.items():
        for detector in _detectors(getattr(args, action), action):
            if detector in rules:
                raise BadInput(f"detector {detector!r} is given two actions")
            rules[detector] = policy_pb2.PiiRule(detector=detector, action=number)
    return list(rules.values())


def _patterns(values: Sequence[str] | None) -> list[policy_pb2.PatternRule]:
    return [policy_pb2.PatternRule(pattern=v) for v in values or []]


def _action_name(number: int) -> str:
    return policy_pb2.PolicyAction.Name(number).removeprefix("POLICY_ACTION_").lower()  # type: ignore[arg-type]


def policy_text(policy: policy_pb2.ContentPolicy) -> str:
    """Returns a policy version in words."""
    lines = [f"{policy.name}@{policy.version}  (by {policy.created_by or '-'})"]
    lines += [f"  pii {r.detector}: {_action_name(r.action)}" for r in policy.pii_rules]
    for label, rules in (
        ("block pattern", policy.block_patterns),
        ("block keyword", policy.block_keywords),
        ("output block pattern", policy.output_block_patterns),
    ):
        lines += [f"  {label} {i}: {r.pattern}" for i, r in enumerate(rules)]
    if policy.max_input_chars:
        lines.append(f"  max input chars: {policy.max_input_chars}")
    return "\n".join(lines)


def policies_create(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    request = policy_pb2.CreatePolicyRequest(
        name=args.name,
        pii_rules=pii_rules(args),
        block_patterns=_patterns(args.block_pattern),
        block_keywords=_patterns(args.block_keyword),
        output_block_patterns=_patterns(args.output_block_pattern),
        max_input_chars=args.max_input_chars or 0,
    )
    reply = stub.CreatePolicy(request, metadata=metadata, timeout=TIMEOUT_S)
    _print(reply.policy, args.json, f"created {reply.policy.name}@{reply.policy.version}")


def policies_get(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    name, _, version = args.reference.partition("@")
    reply = stub.GetPolicy(
        policy_pb2.GetPolicyRequest(name=name, version=version),
        metadata=metadata,
        timeout=TIMEOUT_S,
    )
    _print(reply.policy, args.json, policy_text(reply.policy))


def _attachment_text(attachment: policy_pb2.PolicyAttachment) -> str:
    subject = f"tenant {attachment.tenant}" if attachment.tenant else f"key {attachment.key_id}"
    return f"{subject} -> {attachment.policy}"


def policies_list(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    reply = stub.ListPolicies(
        policy_pb2.ListPoliciesRequest(), metadata=metadata, timeout=TIMEOUT_S
    )
    lines = [f"{p.name:<24} latest={p.latest_version}" for p in reply.policies]
    lines += [f"  {_attachment_text(a)}" for a in reply.attachments]
    _print(reply, args.json, "\n".join(lines) or "(no policies)")


def policies_attach(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    request = policy_pb2.AttachPolicyRequest(
        policy=args.reference, tenant=args.tenant or "", key_id=args.key or ""
    )
    reply = stub.AttachPolicy(request, metadata=metadata, timeout=TIMEOUT_S)
    _print(reply.attachment, args.json, f"attached: {_attachment_text(reply.attachment)}")


def policies_detach(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    request = policy_pb2.DetachPolicyRequest(tenant=args.tenant or "", key_id=args.key or "")
    reply = stub.DetachPolicy(request, metadata=metadata, timeout=TIMEOUT_S)
    _print(reply.attachment, args.json, f"detached: {_attachment_text(reply.attachment)}")


def _set_samples(stub: Any, args: argparse.Namespace, metadata: Metadata, rate: float) -> None:
    request = policy_pb2.SetSampleSettingsRequest(
        tenant=args.tenant, rate=rate, consent_note=getattr(args, "note", None) or ""
    )
    reply = stub.SetSampleSettings(request, metadata=metadata, timeout=TIMEOUT_S)
    settings = reply.settings
    text = (
        f"sampling {settings.tenant} at {settings.rate:g} (consent by {settings.consented_by})"
        if settings.rate
        else f"sampling off for {settings.tenant}"
    )
    _print(settings, args.json, text)


def samples_enable(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    if not 0 < args.rate <= 1:
        raise BadInput("--rate must be in (0, 1]")
    _set_samples(stub, args, metadata, args.rate)


def samples_disable(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    _set_samples(stub, args, metadata, 0.0)


def since_timestamp(value: str, now: datetime.datetime | None = None) -> timestamp_pb2.Timestamp:
    """Parses --since: an ISO 8601 time (UTC if no zone) or a duration ago (30m, 2h, 7d)."""
    now = now or datetime.datetime.now(datetime.UTC)
    relative = _RELATIVE.match(value)
    if relative:
        moment = now - datetime.timedelta(seconds=int(relative[1]) * _UNITS[relative[2]])
    else:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(f"--since {value!r} is neither ISO 8601 nor N[s|m|h|d]") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def samples_export(stub: Any, args: argparse.Namespace, metadata: Metadata) -> None:
    """Prints every sample (oldest first) as one JSON object per line."""
    request = policy_pb2.ExportSamplesRequest(tenant=args.tenant, page_size=1000)
    if args.since:
        request.since.CopyFrom(since_timestamp(args.since))
    while True:
        reply = stub.ExportSamples(request, metadata=metadata, timeout=TIMEOUT_S)
        for sample in reply.samples:
            print(json.dumps(as_dict(sample), sort_keys=True))
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def _subject_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--tenant", help="the tenant")
    group.add_argument("--key", help="one API key id")


def add_parsers(groups: Any) -> list[argparse.ArgumentParser]:
    """Adds the `policies` and `samples` command groups; returns their commands."""
    policies = groups.add_parser("policies", help="content policies (through the edge)")
    policies.set_defaults(target="edge")
    actions = policies.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="add a version (1, 2, ...: one more each time)")
    create.add_argument("name")
    for action in _ACTIONS:
        create.add_argument(f"--{action}", metavar="DETECTOR,...", help=f"detectors to {action}")
    create.add_argument("--block-pattern", action="append", metavar="REGEX")
    create.add_argument("--block-keyword", action="append", metavar="WORD")
    create.add_argument("--output-block-pattern", action="append", metavar="REGEX")
    create.add_argument("--max-input-chars", type=int, metavar="N")
    create.set_defaults(run=policies_create)
    listing = actions.add_parser("list", help="policies, newest versions, attachments")
    listing.set_defaults(run=policies_list)
    get = actions.add_parser("get", help="one version: NAME or NAME@VERSION")
    get.add_argument("reference", metavar="NAME[@VERSION]")
    get.set_defaults(run=policies_get)
    attach = actions.add_parser("attach", help="apply a policy to a tenant or a key")
    attach.add_argument("reference", metavar="NAME[@VERSION]")
    _subject_options(attach)
    attach.set_defaults(run=policies_attach)
    detach = actions.add_parser("detach", help="remove a tenant's or a key's policy")
    _subject_options(detach)
    detach.set_defaults(run=policies_detach)

    samples = groups.add_parser("samples", help="opt-in redacted samples (through the edge)")
    samples.set_defaults(target="edge")
    sample_actions = samples.add_subparsers(dest="action", required=True)
    enable = sample_actions.add_parser("enable", help="sample a tenant's requests (consent)")
    enable.add_argument("--tenant", required=True)
    enable.add_argument("--rate", type=float, required=True, help="share sampled, (0, 1]")
    enable.add_argument("--note", help="the tenant's consent (a ticket, a contract clause)")
    enable.set_defaults(run=samples_enable)
    disable = sample_actions.add_parser("disable", help="stop sampling a tenant")
    disable.add_argument("--tenant", required=True)
    disable.set_defaults(run=samples_disable)
    export = sample_actions.add_parser("export", help="JSONL of a tenant's samples on stdout")
    export.add_argument("--tenant", required=True)
    export.add_argument("--since", help="ISO 8601 time, or a duration ago (30m, 2h, 7d)")
    export.set_defaults(run=samples_export)
    return [create, listing, get, attach, detach, enable, disable, export]
