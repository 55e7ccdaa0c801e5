"""`tokenmesh policies` / `samples` argument handling (no mesh needed)."""

from __future__ import annotations

import datetime

import pytest

from services.cli.__main__ import parser
from services.cli.policies import pii_rules, since_timestamp
from tokenmesh.router.v1 import policy_pb2


def test_detector_lists_become_rules_with_actions():
    args = parser().parse_args(
        ["policies", "create", "p", "--redact", "email,phone", "--block", "card", "--flag", "ip"]
    )
    rules = {r.detector: r.action for r in pii_rules(args)}
    assert rules == {
        "email": policy_pb2.POLICY_ACTION_REDACT,
        "phone": policy_pb2.POLICY_ACTION_REDACT,
        "card": policy_pb2.POLICY_ACTION_BLOCK,
        "ip": policy_pb2.POLICY_ACTION_FLAG,
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["policies", "create", "p", "--redact", "passport"],
        ["policies", "create", "p", "--redact", "email", "--block", "email"],
    ],
)
def test_unknown_or_doubled_detectors_are_refused(argv):
    with pytest.raises(SystemExit):
        pii_rules(parser().parse_args(argv))


def test_attach_needs_exactly_one_subject():
    with pytest.raises(SystemExit):
        parser().parse_args(["policies", "attach", "p", "--tenant", "a", "--key", "k"])
    args = parser().parse_args(["policies", "attach", "p@2", "--key", "k1"])
    assert (args.reference, args.key, args.tenant) == ("p@2", "k1", None)


def test_since_takes_iso_times_and_durations_ago():
    now = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=datetime.UTC)
    assert since_timestamp("2h", now).ToDatetime(datetime.UTC) == now - datetime.timedelta(hours=2)
    assert since_timestamp("2026-01-30T00:00:00Z", now).ToSeconds() == int(
        datetime.datetime(2026, 1, 30, tzinfo=datetime.UTC).timestamp()
    )
    with pytest.raises(SystemExit):
        since_timestamp("yesterday", now)
