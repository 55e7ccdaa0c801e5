"""A real Envoy with a given bootstrap, for tests of the configs we generate."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from services.launcher.mesh import envoy_binary


@contextlib.contextmanager
def running_envoy(bootstrap: dict[str, Any], admin_port: int, state: Path) -> Iterator[None]:
    """Runs Envoy (one worker thread) on `bootstrap` until it answers /ready on
    `admin_port`; stops it on exit. Its log is `state`/envoy.log."""
    path = state / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    log_path = state / "envoy.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(envoy_binary()), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not ready(admin_port):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "envoy did not become ready"
                time.sleep(0.1)
            yield
        finally:
            process.terminate()
            process.wait(timeout=10)


def ready(admin_port: int) -> bool:
    """Tells whether the Envoy with this admin port answers /ready with 200."""
    try:
        reply = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200
