"""Resident memory and open file descriptors of the mesh's processes, from /proc.

Used by the hostile-input suite and the soak to show that no process
crashed, restarted or grew without bound: sample every child before and
after, then compare.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcSample:
    """ProcSample is one process at one moment (rss_kib and fds are 0 when it is gone)."""

    name: str
    pid: int
    alive: bool
    rss_kib: int
    fds: int


def _status_field(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def sample(name: str, pid: int) -> ProcSample:
    """Samples one process: alive (not a zombie), VmRSS and the number of open fds."""
    state = _status_field(pid, "State")
    if state is None or state.startswith("Z"):
        return ProcSample(name, pid, False, 0, 0)
    rss = _status_field(pid, "VmRSS") or "0 kB"
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        fds = 0
    return ProcSample(name, pid, True, int(rss.split()[0]), fds)


def sample_all(processes: Iterable[tuple[str, int]]) -> dict[str, ProcSample]:
    """Samples every (name, pid), keyed by name."""
    return {name: sample(name, pid) for name, pid in processes}


@dataclass(frozen=True)
class Limits:
    """Limits says how much a process may grow between two samples.

    A process may add `rss_mib` MiB plus `rss_ratio` of its starting RSS
    (allocators keep freed memory; a warm cache fills), and `fds` descriptors.
    """

    rss_mib: float = 64.0
    rss_ratio: float = 0.5
    fds: int = 32


def problems(
    before: Mapping[str, ProcSample], after: Mapping[str, ProcSample], limits: Limits
) -> list[str]:
    """Returns what went wrong between two samples: deaths, restarts and growth past `limits`."""
    found = []
    for name, first in before.items():
        last = after.get(name)
        if last is None or not last.alive:
            found.append(f"{name} (pid {first.pid}) is gone")
            continue
        if last.pid != first.pid:
            found.append(f"{name} restarted (pid {first.pid} -> {last.pid})")
            continue
        allowed_kib = first.rss_kib * (1 + limits.rss_ratio) + limits.rss_mib * 1024
        if last.rss_kib > allowed_kib:
            found.append(
                f"{name} RSS grew {first.rss_kib // 1024} -> {last.rss_kib // 1024} MiB "
                f"(allowed {allowed_kib / 1024:.0f})"
            )
        if last.fds > first.fds + limits.fds:
            found.append(f"{name} open fds grew {first.fds} -> {last.fds} (allowed +{limits.fds})")
    return found


def table(before: Mapping[str, ProcSample], after: Mapping[str, ProcSample]) -> str:
    """Returns a Markdown table of each process's RSS and fds at both samples."""
    lines = [
        "| process | pid | RSS start MiB | RSS end MiB | growth MiB | fds start | fds end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, first in before.items():
        last = after.get(name, ProcSample(name, first.pid, False, 0, 0))
        pid = str(first.pid) if last.pid == first.pid else f"{first.pid} -> {last.pid}"
        end = f"{last.rss_kib / 1024:.1f}" if last.alive else "gone"
        lines.append(
            f"| {name} | {pid} | {first.rss_kib / 1024:.1f} | {end} | "
            f"{(last.rss_kib - first.rss_kib) / 1024:+.1f} | {first.fds} | {last.fds} |"
        )
    return "\n".join(lines)
