"""The launcher's supervisor backs off a child that keeps dying, however slowly it starts.

Real child processes; the restart function waits until the child says it serves,
as the launcher's does (services.launcher.mesh).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from services.launcher.processes import Child, wait_for
from services.launcher.supervisor import RestartPolicy, Supervisor

# Starts in 0.4 s (longer than the policy's reset_after_s), says so, dies at once.
SLOW_START_THEN_CRASH = (
    "import time, sys; time.sleep(0.4); print('serving', flush=True); sys.exit(3)"
)
POLICY = RestartPolicy(base_s=0.01, max_s=10.0, reset_after_s=0.3)


class Mesh:
    """The owner's side: its children, and a restart that waits until one serves."""

    def __init__(self, tmp_path: Path, *, comes_up: bool) -> None:
        self.tmp_path, self.comes_up = tmp_path, comes_up
        self.lock = threading.Lock()
        self.children: list[Child] = []
        self.spawned = 0

    def spawn(self) -> Child:
        self.spawned += 1
        log = self.tmp_path / f"child-{self.spawned}.log"
        child = Child("flaky", [sys.executable, "-c", SLOW_START_THEN_CRASH], {}, log)
        with self.lock:
            self.children.append(child)
        return child

    def snapshot(self) -> list[Child]:
        with self.lock:
            return list(self.children)

    def forget(self, child: Child) -> None:
        with self.lock:
            self.children.remove(child)

    def restart(self, name: str) -> None:
        child = self.spawn()
        if not self.comes_up:  # it never serves: the restart times out
            child.wait(5)
            raise TimeoutError(f"{name} did not come up")
        serving = child.log_path
        wait_for(lambda: b"serving" in serving.read_bytes(), 5, "serving")


def _streak_after_crashes(mesh: Mesh, crashes: int) -> int:
    """Runs the supervisor until the child's streak reaches `crashes` or it was spawned
    `crashes` + 2 times (15 s at most); returns the streak."""
    supervisor = Supervisor(mesh.snapshot, mesh.forget, mesh.restart, lambda: None, POLICY, 0.01)
    mesh.spawn()
    supervisor.start()
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            record = supervisor.records["flaky"]
            if record.streak >= crashes or mesh.spawned >= crashes + 2:
                return record.streak
            time.sleep(0.005)
        raise AssertionError("the child was not restarted in time")
    finally:
        supervisor.stop()
        for child in mesh.snapshot():
            child.kill()
            child.wait(5)


@pytest.mark.parametrize("comes_up", [True, False], ids=["dies-once-up", "never-comes-up"])
def test_a_slow_starting_child_that_keeps_dying_backs_off_further(tmp_path, comes_up):
    """The streak was measured from the restart's spawn: a child whose start took longer
    than reset_after_s (a worker loading its models) started a new streak at every
    crash, and one whose restarts failed did too, so it was restarted at base_s
    forever instead of backing off."""
    assert _streak_after_crashes(Mesh(tmp_path, comes_up=comes_up), crashes=3) >= 3
