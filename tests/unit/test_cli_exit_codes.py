"""The `tokenmesh` CLI's exit codes (services/cli/exits.py), from the real process.

2: input the command cannot use, 1: a service that answers with an error or
not at all. Most input checks exited 1 (a `SystemExit("tokenmesh: ...")`), so a
script could not tell "fix the command" from "the mesh failed". Every case
runs `python -m services.cli` with no mesh: the inputs are refused before
anything is sent (127.0.0.1:1 answers nothing, and is never asked).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from services.core import contract, pki

EDGE = ["--edge-address", "127.0.0.1:1", "--api-key", "tm_x"]
AUTH = ["--auth-address", "127.0.0.1:1", "--api-key", "tm_x"]
ITEM = '{"complete": {"model": "m", "prompt": "p"}}\n'

# id: (argv, exit code, what the line says); {tmp} is the test's directory.
CASES: dict[str, tuple[list[str], int, str]] = {
    "split-weight": ([*EDGE, "models", "split", "m", "1=abc"], 2, "is not VERSION=WEIGHT"),
    "sunset": (
        [*EDGE, "models", "deprecate", "m", "1", "--sunset", "tomorrow"],
        2,
        "--sunset 'tomorrow' is not YYYY-MM-DD",
    ),
    "template-file": (
        [*EDGE, "prompts", "create", "p", "--template-file", "{tmp}/none.j2"],
        2,
        "--template-file {tmp}/none.j2: No such file",
    ),
    "variable": (
        [*EDGE, "prompts", "create", "p", "--template-file", "{tmp}/t.j2", "--variable", "x:abc"],
        2,
        "--variable 'x:abc' is not NAME:MAXLEN",
    ),
    "prompt-version": (
        [*EDGE, "prompts", "alias", "p", "stable", "abc"],
        2,
        "'abc' is not a version number",
    ),
    "job-line": ([*EDGE, "jobs", "submit", "{tmp}/bad.jsonl"], 2, "bad.jsonl:2: not a job item"),
    "job-metadata": (
        [*EDGE, "jobs", "submit", "{tmp}/ok.jsonl", "--metadata", "novalue"],
        2,
        "--metadata 'novalue' is not KEY=VALUE",
    ),
    "detector": ([*EDGE, "policies", "create", "p", "--redact", "nosuch"], 2, "nosuch"),
    "samples-since": (
        [*EDGE, "samples", "export", "--tenant", "t", "--since", "yesterday"],
        2,
        "--since 'yesterday'",
    ),
    "samples-rate": (
        [*EDGE, "samples", "enable", "--tenant", "t", "--rate", "5"],
        2,
        "--rate must be in (0, 1]",
    ),
    "rollout-words": (
        [*EDGE, "models", "rollout", "status", "a", "b"],
        2,
        "[start] MODEL VERSION",
    ),
    "rollout-steps": (
        [*EDGE, "models", "rollout", "m", "2", "--steps", "a,b"],
        2,
        "--steps 'a,b' is not a list of numbers",
    ),
    "shadow": ([*EDGE, "models", "shadow", "m"], 2, "--percent P"),
    "compare-since": (
        [*EDGE, "models", "compare", "m", "1", "2", "--since", "yesterday"],
        2,
        "is not like 30m",
    ),
    "pin": (
        [
            "--pki-dir",
            "{tmp}/pki",
            *AUTH,
            "keys",
            "create",
            "--tenant",
            "t",
            "--scopes",
            "s",
            "--pin",
            "bad",
        ],
        2,
        "--pin 'bad' is not MODEL=VERSION",
    ),
    "no-api-key": (["--edge-address", "127.0.0.1:1", "models", "list"], 2, "no API key"),
    "edge-ca": (
        [*EDGE, "--edge-ca", "{tmp}/none.pem", "models", "list"],
        2,
        "cannot read the edge's CA",
    ),
    "no-pki-dir": ([*AUTH, "keys", "list"], 2, "needs the operator certificate"),
    # The service side: nothing listens, or no mesh runs where the CLI looks.
    "unavailable": ([*EDGE, "models", "list"], 1, "UNAVAILABLE"),
    "no-local-mesh": (["--api-key", "tm_x", "models", "list"], 1, "no local mesh at"),
}


@pytest.fixture(scope="module")
def exits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str]]]:
    """Runs every case's CLI at once (each process takes about a second to start)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "t.j2").write_text("{{ x }}")
    (tmp / "ok.jsonl").write_text(ITEM)
    (tmp / "bad.jsonl").write_text(ITEM + '{"nope": 1}\n')
    pki.ensure_local_pki(tmp / "pki", [contract.OPERATOR])
    env = {**os.environ, "TOKENMESH_STATE_DIR": str(tmp / "no-mesh")}
    for name in [n for n in env if n.startswith("TOKENMESH_") and n != "TOKENMESH_STATE_DIR"]:
        del env[name]
    env.pop("REDIS_URL", None)
    running = {
        case: subprocess.Popen(
            [sys.executable, "-m", "services.cli", *(a.format(tmp=tmp) for a in argv)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (argv, _, _) in CASES.items()
    }
    try:
        results = {}
        for case, process in running.items():
            _, err = process.communicate(timeout=120)
            results[case] = (process.returncode, err.replace(str(tmp), "{tmp}"))
        yield results
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()


@pytest.mark.parametrize("case", list(CASES))
def test_each_error_is_one_line_and_its_exit_code_says_whose(
    case: str, exits: dict[str, tuple[int, str]]
) -> None:
    _, code, says = CASES[case]
    returned, err = exits[case]
    assert (returned, err.count("\n")) == (code, 1), err
    assert err.startswith("tokenmesh: ") and "Traceback" not in err, err
    assert says in err, err
