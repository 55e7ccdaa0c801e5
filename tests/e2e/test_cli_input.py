"""The operator CLI on input it cannot use, and on Ctrl-C: one line and the right code.

`--ttl 0` made a key that never expires (0 read as "none"), `jobs submit --window
0` a job with the default window; an API key with a newline (read from a file)
ended "service failed" (1) over several lines although nothing was sent; Ctrl-C
printed a Python traceback, and `jobs submit --wait` did not say that its job
runs on, nor which it was.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from services.launcher.mesh import Mesh
from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import JOB_SCOPES, MODEL


def _cli(
    mesh: Mesh, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_ttl_or_window_of_0_is_refused_before_anything_is_sent(
    mesh: Mesh, tmp_path: Path
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    refused = _cli(mesh, "keys", "create", "--tenant", tenant, "--ttl", "0")
    assert refused.returncode == 2, refused.stderr
    assert "must be above 0" in refused.stderr
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"complete": {"model": MODEL, "prompt": "a"}}) + "\n")
    window = _cli(mesh, "jobs", "submit", str(items), "--window", "0")
    assert window.returncode == 2 and "must be above 0" in window.stderr


def test_an_api_key_that_is_not_one_line_is_bad_input(mesh: Mesh) -> None:
    result = _cli(mesh, "jobs", "list", env={"TOKENMESH_API_KEY": "tm_abc\ndef"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tokenmesh: ")
    assert "not one line" in result.stderr


def test_ctrl_c_while_waiting_for_a_job_says_it_runs_on(mesh: Mesh, tmp_path: Path) -> None:
    key = create_key(mesh, "--tenant", f"cli-{uuid.uuid4().hex[:8]}", scopes=JOB_SCOPES)
    items = tmp_path / "items.jsonl"
    body = {"model": MODEL, "prompt": "a long job", "max_output_tokens": 200}
    items.write_text("".join(json.dumps({"complete": body}) + "\n" for _ in range(4)))
    with subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--api-key", key["secret"], "jobs", "submit"]
        + [str(items), "--wait"],
        env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As a terminal's foreground command: a test run started in the background
        # (`make test &`, a CI runner's shell) passes SIGINT on ignored, and Python
        # then keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as waiting:
        assert waiting.stderr is not None
        progress = b""
        deadline = time.monotonic() + 30
        while b"\rjob-" not in progress and time.monotonic() < deadline:  # its progress line
            ready, _, _ = select.select([waiting.stderr], [], [], 0.5)
            if ready:
                progress += os.read(waiting.stderr.fileno(), 4096)
        assert b"\rjob-" in progress, progress
        waiting.send_signal(signal.SIGINT)
        try:
            _, err = waiting.communicate(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.communicate()
    text = (progress + err).decode()
    job_id = re.search(r"keeps running \(tokenmesh jobs get (\S+)\)", text)
    if job_id is not None:  # it runs on, as said: the mesh's other tests need its workers
        _cli(mesh, "--api-key", key["secret"], "jobs", "cancel", job_id.group(1))
    assert waiting.returncode == 130, text
    assert "Traceback" not in text
    assert job_id is not None, text
