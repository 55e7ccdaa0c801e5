"""The CLI answers ordinary bad input with one `tokenmesh: ...` line and exit code 2.

Each of these ended in a Python traceback (exit 1). None reaches a server: the
input is refused before anything is sent (the addresses below answer nothing).
"""

from __future__ import annotations

import pytest

from services.cli.__main__ import main

EDGE = ["--edge-address", "127.0.0.1:1", "--api-key", "tm_x"]
AUTH = ["--auth-address", "127.0.0.1:1", "--api-key", "tm_x"]


@pytest.fixture(autouse=True)
def no_local_mesh(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMESH_STATE_DIR", str(tmp_path / "no-mesh"))
    monkeypatch.delenv("REDIS_URL", raising=False)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    """Runs the CLI in-process; returns (exit code, stderr)."""
    try:
        code: object = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([*EDGE, "jobs", "submit", "/nonexistent.jsonl"], "/nonexistent.jsonl: No such file"),
        ([*EDGE, "models", "split", "demo-lm", "1=99999999999"], "0-100"),
        ([*EDGE, "prompts", "alias", "p", "stable", "99999999999"], "out of range"),
        ([*EDGE, "models", "rollout", "demo-lm", "2", "--step-seconds", "1e300"], "invalid value"),
    ],
    ids=["missing-jsonl", "weight", "prompt-version", "step-seconds"],
)
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys):
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert err.startswith("tokenmesh: ") and err.count("\n") == 1, err
    assert says in err


def test_a_window_a_duration_cannot_hold_is_refused(capsys, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"complete": {"model": "m", "prompt": "p"}}\n')
    code, err = _run([*EDGE, "jobs", "submit", str(items), "--window", str(10**20)], capsys)
    assert code == 2, err
    assert err == f"tokenmesh: invalid value: Value out of range: {10**20}\n"


def test_a_pki_dir_without_the_operator_certificate_is_named(capsys, tmp_path):
    code, err = _run(["--pki-dir", str(tmp_path), *AUTH, "keys", "list"], capsys)
    assert code == 2, err
    assert err.startswith(f"tokenmesh: {tmp_path} holds no operator certificate"), err
    assert err.count("\n") == 1


def test_a_redis_url_of_another_scheme_is_named_without_its_password(capsys, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "http://admin:hunter2secret@x:6379/0")
    code, err = _run(["usage", "dead-letters"], capsys)
    assert code == 2, err
    assert err.startswith("tokenmesh: REDIS_URL must start with redis://"), err
    assert "'http'" in err and "hunter2secret" not in err, err


@pytest.mark.parametrize(
    ("manifest", "says"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ("{}", "no auth"),
        ('{"pki_dir": 5, "ports": {"auth": 1}}', "bad 'pki_dir': 5"),
    ],
    ids=["corrupt", "not-an-object", "no-ports", "pki-dir-not-a-path"],
)
def test_a_broken_local_manifest_is_named(manifest, says, capsys, tmp_path, monkeypatch):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    (state / "run" / "mesh.json").write_text(manifest)
    monkeypatch.setenv("TOKENMESH_STATE_DIR", str(state))
    code, err = _run(["--api-key", "tm_x", "keys", "list"], capsys)
    assert code == 2, err
    assert err.startswith(f"tokenmesh: the local mesh's {state / 'run' / 'mesh.json'} "), err
    assert says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_dead_letter_limit_below_one_is_refused(limit, capsys, monkeypatch):
    # It listed one entry (max(1, limit)).
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1")
    code, err = _run(["usage", "dead-letters", "--limit", limit], capsys)
    assert code == 2, err
    assert "above 0" in err or "positive" in err, err
