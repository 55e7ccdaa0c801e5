"""`tokenmesh --json COMMAND` and `tokenmesh COMMAND --json` both print JSON.

Every command also takes --json after its name; that copy's default (False)
overwrote the root's value, so `tokenmesh --json keys list` printed text.
"""

from __future__ import annotations

import json
import uuid

import pytest

from services.cli.__main__ import main, parser

COMMANDS = [
    ["keys", "list"],
    ["keys", "create", "--tenant", "acme", "--scopes", "models:read"],
    ["token"],
    ["models", "list"],
    ["prompts", "get", "greeting@stable"],
    ["workers", "list"],
    ["usage", "dead-letters"],
    ["jobs", "submit", "items.jsonl", "--wait"],
    ["jobs", "get", "job-1"],
    ["webhooks", "secret", "rotate"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_json_before_the_command_is_kept(command: list[str]) -> None:
    assert parser().parse_args(["--json", *command]).json is True


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_json_after_the_command_is_kept(command: list[str]) -> None:
    assert parser().parse_args([*command, "--json"]).json is True


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_json_means_text(command: list[str]) -> None:
    assert parser().parse_args(command).json is False


@pytest.mark.parametrize("placement", ["before", "after"])
def test_a_command_prints_json_whichever_the_placement(
    placement: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An empty dead-letter stream on the real Redis: JSON `[]`, text "no dead letters".
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENMESH_USAGE_STREAM", f"usage-json-flag:{uuid.uuid4().hex}")
    command = ["usage", "dead-letters"]
    argv = ["--json", *command] if placement == "before" else [*command, "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == []
