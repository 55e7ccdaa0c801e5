"""One launcher per state directory: an exclusive lock held for the mesh's life.

Two meshes on one state dir share far too much to both run: two Redis servers
append to the same AOF (a restart replays both histories, usage totals
double-counted), workers of the same id write the same usage spool (single
writer only), and run/*.json and the SDS files are replaced under the other
mesh. The lock is an `fcntl.flock` on `run/launcher.lock`: the kernel releases
it when its holder dies, however it dies (SIGKILL included), so a stale file
never blocks a later start. Children do not inherit it (the descriptor is
close-on-exec and `subprocess` closes the rest).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "launcher.lock"


class StateDirBusy(RuntimeError):
    """StateDirBusy says another live process holds a state directory's lock."""


class StateDirLock:
    """StateDirLock is the exclusive lock on one state directory.

    Usage::

        lock = StateDirLock.acquire(state_dir / "run")  # raises StateDirBusy
        ...
        lock.release()
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> StateDirLock:
        """Takes the lock in `run_dir` without waiting; writes this process's pid into it.

        Raises:
            StateDirBusy: another process holds it (the message names its pid when known).
        """
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(_busy_message(run_dir.parent, path)) from None
        # NOTE: truncated only while held, so a holder's pid is never wiped by a loser.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Releases the lock (idempotent). The file stays: unlinking it would let a
        starter lock a new file while another still holds the old one."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        """Tells whether this object still holds the lock."""
        return self._fd is not None


def _busy_message(state_dir: Path, path: Path) -> str:
    pid = ""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        pid = path.read_text().strip()
    holder = f" (pid {pid})" if pid.isdigit() else ""
    return f"another tokenmesh is running on {state_dir}{holder}"
