"""Which core each benchmark process runs on, and how much CPU it used.

On a machine with two or more cores the load generator (this process and
the client processes it spawns) runs on the first core and the system under
test on the second; every baseline runs where the system it is compared
with runs, with the same thread count. A ratio then compares the product
with its baseline, not with a baseline that had the whole machine. Every
process pinned here is recorded with its role and cores, and the report
prints that table.

CPU time per unit of work comes from /proc/<pid>/stat (utime + stime over
all threads, optionally with waited-for children) before and after a round:
unlike wall time, it hardly depends on who else uses the machine (on a VM,
time the hypervisor steals from a running thread still counts as its own).

TOKENMESH_BENCH_PIN=0 turns pinning off (the report says so).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOAD, SUT = "load generator", "system under test"


@dataclass(frozen=True)
class Layout:
    """Layout says which cores each role gets (all of them for both when unpinned)."""

    load: frozenset[int]
    sut: frozenset[int]

    @property
    def pinned(self) -> bool:
        """Returns whether the roles have cores of their own."""
        return not self.load & self.sut

    def cores(self, role: str) -> frozenset[int]:
        """Returns the cores of `role` (LOAD or SUT)."""
        return self.load if role == LOAD else self.sut

    def threads(self, role: str) -> int:
        """Returns the thread count a compute pool of `role` should use: one per core."""
        return len(self.cores(role))

    def taskset(self, role: str) -> list[str]:
        """Returns an argv prefix that starts a command on `role`'s cores."""
        return ["taskset", "-c", _cpu_list(self.cores(role))] if self.pinned else []


def layout() -> Layout:
    """Returns this machine's layout: core 0 for the load, core 1 for the system under test."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or os.environ.get("TOKENMESH_BENCH_PIN", "1") == "0":
        return Layout(frozenset(cores), frozenset(cores))
    return Layout(frozenset(cores[:1]), frozenset(cores[1:2]))


@dataclass
class Placement:
    """Placement records which process ran where, for the report."""

    layout: Layout
    processes: list[dict[str, object]] = field(default_factory=list)

    def record(self, name: str, pid: int | str, role: str, threads: int | str = "") -> None:
        """Adds one process (once per name: a process restarted per round is one entry)."""
        if any(p["name"] == name for p in self.processes):
            return
        cores = _cpu_list(self.layout.cores(role))
        self.processes.append(
            {"name": name, "pid": pid, "role": role, "cores": cores, "threads": threads}
        )

    def to_json(self) -> dict[str, object]:
        """Returns the layout and the processes, as the report writes them."""
        return {
            "pinned": self.layout.pinned,
            "load_cores": _cpu_list(self.layout.load),
            "sut_cores": _cpu_list(self.layout.sut),
            "processes": self.processes,
        }


def pin(pid: int, cores: frozenset[int]) -> None:
    """Pins every thread of process `pid` to `cores` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cores)


@contextlib.contextmanager
def pinned_self(cores: frozenset[int]) -> Iterator[None]:
    """Runs this process (and what it spawns meanwhile) on `cores`; restores it afterwards."""
    before = os.sched_getaffinity(0)
    pin(os.getpid(), cores)
    try:
        yield
    finally:
        pin(os.getpid(), frozenset(before))


def cpu_seconds(pid: int, children: bool = False) -> float:
    """Returns the CPU time (user + system, all threads) process `pid` has used, in s.

    children: also count its children that it has waited for (cutime + cstime).
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CpuMeter measures the CPU seconds of named processes over one round.

    with CpuMeter({"worker": pid}) as meter: ...; meter.used["worker"]
    """

    def __init__(self, pids: Mapping[str, int], children: bool = False) -> None:
        self.pids = dict(pids)
        self.children = children
        self.used: dict[str, float] = {}
        self._before: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._before = {n: cpu_seconds(p, self.children) for n, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {
            n: cpu_seconds(p, self.children) - self._before[n] for n, p in self.pids.items()
        }


def _cpu_list(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))
