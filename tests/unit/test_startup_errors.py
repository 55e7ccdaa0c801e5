"""A reason a service cannot start that only starting finds ends in one line, not a
traceback (services.core.entrypoint): a worker whose usage spool another process holds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def test_a_worker_whose_spool_another_process_holds_exits_with_one_line(tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "inference-0"
    spool.mkdir(parents=True)
    holder = subprocess.Popen(  # the other worker: holds the spool directory's flock
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                fd = os.open({str(spool)!r}, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        script = textwrap.dedent(
            """
            import services.inference.usage_log as usage_log
            usage_log.SPOOL_LOCK_WAIT_S = 0.2  # the default waits a minute for a drain
            import services.inference.__main__ as worker
            worker.main()
            """
        )
        env = {
            **os.environ,
            "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "TOKENMESH_WORKER_ID": "inference-0",
            "TOKENMESH_PKI_DIR": "",
            "TOKENMESH_INSECURE_PEER_IDENTITY": "worker",
        }
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        holder.kill()
        holder.communicate()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "still in use by another process" in lines[0]
