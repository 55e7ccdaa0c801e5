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

from gateway import admin as envoy_admin
from services.launcher.mesh import envoy_binary

#: Where an Envoy's admin API is: the product's Unix socket, or a test bootstrap's port.
Admin = Path | int


@contextlib.contextmanager
def running_envoy(bootstrap: dict[str, Any], admin: Admin, state: Path) -> Iterator[None]:
    """Runs Envoy (one worker thread) on `bootstrap` until it answers /ready on
    `admin`; stops it on exit. Its log is `state`/envoy.log."""
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
            while not ready(admin):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "envoy did not become ready"
                time.sleep(0.1)
            yield
        finally:
            process.terminate()
            process.wait(timeout=10)


def ready(admin: Admin) -> bool:
    """Tells whether the Envoy with this admin socket (or port) answers /ready with 200."""
    if isinstance(admin, Path):
        return envoy_admin.text(admin, "/ready", timeout_s=1) is not None
    try:
        reply = httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200
