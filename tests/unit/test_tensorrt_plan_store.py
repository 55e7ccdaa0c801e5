"""A TensorRT plan reaches the cache whole or not at all (no GPU needed: only the
file handling). A worker stopped mid-build exits without waiting for the build's
thread (services.core.tasks.exit_past_abandoned_threads); a plan it was writing in
place stayed cut short at its final name and failed to load at every later start."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from services.inference.engines.tensorrt import store_plan

PLAN_BYTES = 256 << 20


def test_a_stored_plan_replaces_the_old_whole_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "cache" / "m.plan"
    store_plan(path, b"old")
    store_plan(path, b"new plan")
    assert path.read_bytes() == b"new plan"
    assert [p.name for p in path.parent.iterdir()] == ["m.plan"]


def test_a_process_that_exits_mid_write_leaves_no_cut_plan(tmp_path):
    path = tmp_path / "m.plan"
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from services.core import tasks
        from services.inference.engines.tensorrt import store_plan

        def build():
            store_plan(Path({str(path)!r}), b"\\1" * {PLAN_BYTES})

        async def main():
            started = asyncio.ensure_future(tasks.to_daemon_thread("load-m-1", build))
            await asyncio.sleep(0.05)
            started.cancel()  # the stop abandons the build
            await asyncio.gather(started, return_exceptions=True)

        asyncio.run(main())
        tasks.exit_past_abandoned_threads(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    assert not path.exists() or path.stat().st_size == PLAN_BYTES
