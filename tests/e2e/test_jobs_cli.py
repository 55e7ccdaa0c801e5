"""`tokenmesh jobs submit --wait` through the real edge: its exit code says how the job ended.

A script (`tokenmesh jobs submit items.jsonl --wait && next-step`) must not
go on after a job that FAILED, was CANCELLED or EXPIRED, nor after the
progress stream ended before the job did: only SUCCEEDED exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis

from services.jobs.store import job_key
from services.launcher.mesh import Mesh
from tests.e2e.test_auth import create_key
from tests.e2e.test_jobs import JOB_SCOPES, complete_body

#: The CLI of `jobs submit --wait`, and the id of the job it watches.
Running = tuple[subprocess.Popen[str], str]
#: Long enough that the test acts on the job while the CLI watches it.
LONG_ITEM = {**complete_body(0), "max_output_tokens": 400}


def _items(tmp_path: Path, *bodies: dict[str, Any]) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"complete": body}) + "\n" for body in bodies))
    return path


def _submit_and_wait(mesh: Mesh, secret: str, items: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--api-key", secret]
        + ["jobs", "submit", str(items), "--wait", "--json"],
        env={**os.environ, "TOKENMESH_STATE_DIR": str(mesh.state_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ended(cli: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    """Waits for the CLI; returns its exit code, the job it printed, and its stderr."""
    stdout, stderr = cli.communicate(timeout=120)
    return cli.returncode, json.loads(stdout), stderr


def _watched_job_id(stderr: IO[str]) -> str:
    """Reads the CLI's progress (stderr) until its first line of the watched job; returns
    the job's id (the watch stream is then open)."""
    seen = ""
    while not seen.endswith("done"):
        char = stderr.read(1)
        assert char, f"the CLI ended before it watched the job: {seen!r}"
        seen += char
    return seen.strip().split()[0]


@pytest.fixture
def cli_key(mesh: Mesh) -> str:
    secret: str = create_key(mesh, scopes=JOB_SCOPES)["secret"]
    return secret


@pytest.fixture
def running(mesh: Mesh, cli_key: str, tmp_path: Path) -> Iterator[Running]:
    """`jobs submit --wait` of a long job, its watch open; yields the CLI and the job's id."""
    cli = _submit_and_wait(mesh, cli_key, _items(tmp_path, LONG_ITEM, LONG_ITEM))
    try:
        assert cli.stderr is not None
        yield cli, _watched_job_id(cli.stderr)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()


def test_a_job_that_succeeded_exits_0(mesh: Mesh, cli_key: str, tmp_path: Path) -> None:
    cli = _submit_and_wait(mesh, cli_key, _items(tmp_path, complete_body(1)))
    code, job, stderr = _ended(cli)
    assert (code, job["status"]) == (0, "SUCCEEDED"), stderr


def test_a_job_that_failed_exits_non_zero(mesh: Mesh, tmp_path: Path) -> None:
    # Every item asks for more tokens than the model's context holds, which only its
    # worker knows: the job is accepted and ends FAILED. (A model the key may not use
    # is refused when the job is created.)
    secret = create_key(mesh, scopes=JOB_SCOPES)["secret"]
    too_long = [{**complete_body(i), "max_output_tokens": 1000} for i in (2, 3)]
    cli = _submit_and_wait(mesh, secret, _items(tmp_path, *too_long))
    code, job, stderr = _ended(cli)
    assert job["status"] == "FAILED"
    assert code == 1
    assert f"job {job['id']} ended FAILED" in stderr


def test_a_job_cancelled_while_waited_on_exits_non_zero(
    mesh: Mesh, cli_key: str, running: Running
) -> None:
    cli, job_id = running
    cancelled = httpx.post(
        f"{mesh.edge_url}/v1/jobs/{job_id}:cancel",
        json={},
        headers={"x-api-key": cli_key},
        timeout=10,
    )
    assert cancelled.status_code == 200, cancelled.text
    code, job, stderr = _ended(cli)
    assert job["status"] == "CANCELLED"
    assert code == 1
    assert f"job {job_id} ended CANCELLED" in stderr


def test_a_watch_that_ends_before_the_job_exits_non_zero(mesh: Mesh, running: Running) -> None:
    cli, job_id = running
    # The job's record goes (as when its retention ends): the stream ends without an end.
    client = redis.Redis.from_url(mesh.redis_url)
    try:
        assert client.delete(job_key(job_id)) == 1
    finally:
        client.close()
    code, job, stderr = _ended(cli)
    assert job["status"] in ("QUEUED", "RUNNING")
    assert code == 1
    assert "ended before the job did" in stderr
