"""Child processes that die with their parent and keep their logs in files."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


# reserve_port picks listening ports at or above this and below the kernel's
# ephemeral range (net.ipv4.ip_local_port_range, 32768 by default).
RESERVED_PORTS_FROM = 10000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def reserve_port(host: str = "127.0.0.1") -> int:
    """Returns a port that was free a moment ago, for a program that cannot bind :0
    and report back (Envoy, Redis), which binds it seconds later.

    Not from the kernel's ephemeral range: a port bound to :0 and released is one
    the kernel also gives to outgoing connections as their source port, so the
    mesh's own traffic in those seconds took it now and then (Envoy then failed:
    "cannot bind ... Address already in use"). Below that range the kernel never
    assigns it; a port is still checked free, and never handed out twice by this
    process. Falls back to :0 where the range leaves no room below it.
    """
    ephemeral_from = _ephemeral_range_start()
    if ephemeral_from - RESERVED_PORTS_FROM >= 1000:
        for _ in range(100):
            port = random.randrange(RESERVED_PORTS_FROM, ephemeral_from)
            if port not in _handed_out and not port_in_use(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_range_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the launcher is killed
    # (even with SIGKILL), the kernel sends the child SIGTERM.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def dying_with_parent(argv: Sequence[str]) -> tuple[list[str], Callable[[], None] | None]:
    """Returns the command and preexec_fn that run `argv` with PR_SET_PDEATHSIG (SIGTERM).

    No Python code may run between fork and exec when the parent uses gRPC (its
    fork handlers can abort the child), so util-linux's setpriv sets the signal
    and then execs the command; without setpriv, a preexec_fn does it.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    return list(argv), _die_with_parent


class Child:
    """Child is one supervised process with its output in `log_path`."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        # Set once the owner stops the child on purpose: a supervisor leaves it dead.
        self.stopping = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command, preexec = dying_with_parent(argv)
        # 0600: a log can hold what its process printed of a request (Envoy's debug
        # level prints every header, credentials included).
        descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(descriptor, 0o600)  # a log an older launcher made 0644 too
        with open(descriptor, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=preexec,
                # A process group of its own: Ctrl-C in a terminal signals the whole
                # foreground group, and Redis (SIGINT is its shutdown) and every
                # service stopped at once, before the launcher's ordered stop (the
                # supervisor even began restarting Redis under the draining workers).
                # The launcher stops its children itself; PDEATHSIG still ends them
                # if it is killed.
                process_group=0,
            )

    @property
    def pid(self) -> int:
        """Returns the child's process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Tells whether the child is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """Returns the last `lines` lines of the child's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        """Asks the child to stop (SIGTERM: services drain gracefully); it stays stopped."""
        self.stopping = True
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kills the child (SIGKILL) on purpose; it stays stopped."""
        self.stopping = True
        if self.alive():
            self.process.kill()

    def wait(self, timeout_s: float) -> int | None:
        """Waits for the child to exit; kills it when `timeout_s` passes."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=5)


class Interrupted(RuntimeError):
    """Interrupted says a wait was given up because its owner is stopping (Ctrl-C)."""


def wait_for(
    condition: object,
    timeout_s: float,
    what: str,
    child: Child | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Polls `condition()` until it is true; raises with the child's log otherwise.

    The first line of the error says what failed; the child's log tail follows.

    Raises:
        RuntimeError: the child exited first.
        TimeoutError: `timeout_s` passed.
        Interrupted: `cancelled()` became true (checked at every poll).
    """
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if cancelled is not None and cancelled():
            raise Interrupted(f"stopped while waiting for {what}")
        if child is not None and not child.alive():
            raise RuntimeError(
                f"{child.name} exited with {child.process.returncode} while "
                f"waiting for {what} (log: {child.log_path}):\n{child.log_tail()}"
            )
        time.sleep(0.05)
    tail = f" (log: {child.log_path}):\n{child.log_tail()}" if child is not None else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")


def port_in_use(host: str, port: int) -> bool:
    """Tells whether something listens on host:port (or holds it bound).

    The probe binds as an exclusive listener would: with SO_REUSEADDR (a
    connection of an earlier run lingering in TIME_WAIT does not count) but
    without SO_REUSEPORT, so a listener that shares its port still counts.

    Raises:
        OSError: binding failed for another reason (a privileged port, no such address).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def clean_env(base: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """Returns the child environment: `base` plus `overrides`."""
    env = dict(base)
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def pid_alive(pid: int) -> bool:
    """Tells whether a process with `pid` exists (and is not a zombie we own)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
