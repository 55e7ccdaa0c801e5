"""Where a process's CPU goes under a benchmark's load: py-spy on the running process.

    python -m bench.profile S3   # the worker: zero-compute engine, batching off, 32 streams
    python -m bench.profile S1   # the worker: demo-lm, 32 streams
    python -m bench.profile E2   # the worker under E2's call through the full edge
    python -m bench.profile E2-direct  # ... and called directly (compare the two)
    python -m bench.profile E1   # the worker under ListModels (E1's call) through the edge
    python -m bench.profile E1-direct  # ... and called directly
    python -m bench.profile R1   # the rate limiter under R1's decisions (leases on)
    python -m bench.profile S3 /tmp/s3.txt  # also keep py-spy's collapsed stacks
    python -m bench.profile S3 --gil        # only samples of the thread holding the GIL

Starts what the row measures pinned as `make bench` pins it, loads it from
the load core while `py-spy record` samples it (every thread, idle frames
left out), and prints the functions with the most samples: by self time
(the frame on top) and inclusive (anywhere on the stack), and the samples
per unit of work. py-spy comes with the bench extra (`pip install -e .[bench]`).

`--gil` keeps only the samples of the thread holding the GIL: the Python
work, without threads that py-spy counts as busy while they wait in C (gRPC's
poller, the engine's condition variable).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench import edge, usage
from bench.clients import run_streams
from bench.peers import Peer, bench_pki
from bench.pinning import SUT, Layout, layout, pin, pinned_self
from bench.servers import redis_server, service_pid, state_dir, worker
from bench.serving import STREAMS, served_request, zero_compute_request
from services.core import contract
from services.launcher.mesh import Mesh, spawn_redis

Load = Callable[[float], int]  # loads the process for about that many seconds; returns the units

SECONDS = 8
LINE = re.compile(r":\d+\)$")
WORKERS = {
    "S1": {"TOKENMESH_MODELS": "demo-lm:1"},
    "S3": {
        "TOKENMESH_MODELS": "",
        "TOKENMESH_TEST_MODELS": "deterministic-test:1",
        "TOKENMESH_TEST_ENGINE_STEP_MS": "1",
        "TOKENMESH_MESSAGES_PER_STEP": "0",
    },
}


def top(collapsed: Path, n: int = 25) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """Returns the top frames by self and by inclusive samples, and the sample count,
    from py-spy's collapsed ("raw") output."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # By function, not by line: "f (path:12)" -> "f (path)".
        frames = [LINE.sub(")", f) for f in stack.split(";") if not f.startswith("thread ")]
        if not frames:
            continue
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            anywhere[frame] += samples
    return own.most_common(n), anywhere.most_common(n), total


def record(pid: int, load: Load, out: Path, gil: bool) -> float:
    """Samples `pid` with py-spy while `load` runs; returns the units of work done in
    the sampled seconds (the load's rate times SECONDS; 0 when it counts none)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [spy, "record", "-p", str(pid), "-d", str(SECONDS), "-r", "200", "-f", "raw"]
    command += ["-o", str(out), "--threads", "--nonblocking"] + (["--gil"] if gil else [])
    finished: list[subprocess.CompletedProcess[str]] = []
    recorder = threading.Thread(
        target=lambda: finished.append(subprocess.run(command, capture_output=True, text=True))
    )
    recorder.start()
    started = time.monotonic()
    done = load(SECONDS + 1)
    elapsed = time.monotonic() - started
    recorder.join()
    if not out.exists():
        raise SystemExit(f"py-spy recorded nothing: {finished[0].stderr.strip()[-500:]}")
    return done * SECONDS / elapsed


@contextlib.contextmanager
def serving_worker(row: str, lay: Layout, state: Path) -> Iterator[tuple[int, Load]]:
    """S1/S3: the row's worker alone, loaded by 32 streams (units: streams)."""
    request = zero_compute_request() if row == "S3" else served_request()
    redis, redis_url = spawn_redis(state / "redis", state / "redis.log")
    try:
        pin(redis.pid, lay.sut)
        env = {**WORKERS[row], "TOKENMESH_MAX_SEQUENCES": str(STREAMS)}
        env["TOKENMESH_ENGINE_THREADS"] = str(lay.threads(SUT))
        with worker(
            state, redis_url, "p", pki_dir=bench_pki(state), prefix=lay.taskset(SUT), **env
        ) as target:
            run_streams(target, 2, 1, request, processes=1)  # warm-up

            def load(seconds: float) -> int:
                run_streams(target, STREAMS, 1000, request, processes=1, budget_s=seconds)
                return 0

            yield service_pid(state, "p"), load
    finally:
        redis.terminate()
        redis.wait(10)


@contextlib.contextmanager
def edge_worker(
    direct: bool, lay: Layout, state: Path, method: str = edge.COMPLETE
) -> Iterator[tuple[int, Load]]:
    """E2 (E1): the worker of the edge's mesh under E2's call (demo-lm Complete, 16
    tokens; E1: ListModels), 32 concurrent, through the full edge with a JWT or
    directly (units: calls)."""
    body = edge.REALISTIC.SerializeToString() if method == edge.COMPLETE else None
    calls = 300 if method == edge.COMPLETE else 3000
    with Mesh(edge.mesh_config(state, edge_tls_port=None)) as mesh:
        for child in mesh.children:
            pin(child.pid, lay.sut)
        if direct:
            target = Peer(mesh.address("inference-0"), contract.WORKER, mesh.pki_dir)
            metadata: list[tuple[str, str]] = []
        else:
            token = edge.issue_token(mesh.edge_url, mesh.dev_api_key())
            target, metadata = Peer(mesh.edge_address), [("authorization", f"Bearer {token}")]
        edge.throughput_rps(target, state, metadata, 200, method, body)  # warm-up

        def load(seconds: float) -> int:
            done, stop = 0, time.monotonic() + seconds
            while time.monotonic() < stop:
                edge.throughput_rps(target, state, metadata, calls, method, body)
                done += calls
            return done

        yield next(c.pid for c in mesh.children if c.name == "inference-0"), load


@contextlib.contextmanager
def rate_limiter(lay: Layout, state: Path) -> Iterator[tuple[int, Load]]:
    """R1: the usage service deciding rate limits from leases (units: decisions)."""
    with (
        redis_server(state, cores=lay.sut) as redis_url,
        redis_server(state, durable=False, name="redis-limits", cores=lay.sut) as limits_url,
        usage.limiter(state, "usage", redis_url, limits_url, lay.taskset(SUT)) as limiter,
    ):
        asyncio.run(usage.rls_load(limiter))  # warm-up (and its own measurement)

        def load(seconds: float) -> int:
            done, stop = 0, time.monotonic() + seconds
            while time.monotonic() < stop:
                asyncio.run(usage.rls_load(limiter))
                done += usage.RLS_LOAD_CALLS
            return done

        yield service_pid(state, "usage"), load


def target(
    row: str, lay: Layout, state: Path
) -> contextlib.AbstractContextManager[tuple[int, Load]]:
    """The process a row profiles and its load."""
    if row in WORKERS:
        return serving_worker(row, lay, state)
    if row in ("E2", "E2-direct"):
        return edge_worker(row == "E2-direct", lay, state)
    if row in ("E1", "E1-direct"):
        return edge_worker(row == "E1-direct", lay, state, edge.METHOD)
    if row == "R1":
        return rate_limiter(lay, state)
    raise SystemExit(f"no profile for {row!r}: S1, S3, E1, E1-direct, E2, E2-direct or R1")


def main() -> None:
    gil = "--gil" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--gil"]
    row = args[0] if args else "S3"
    lay, state = layout(), state_dir()
    out = state / "profile.txt"
    with pinned_self(lay.load), target(row, lay, state) as (pid, load):
        units = record(pid, load, out, gil)
    own, anywhere, total = top(out)
    whose = "the GIL holder" if gil else "the busy threads"
    # 200 samples a second: each sample stands for 5 ms of the sampled thread(s).
    per = f", ~{total * 5000 / units:.0f} µs per unit of work" if units else ""
    print(f"{row}: {total} samples of {whose} (200 Hz){per}")
    for title, frames in (("self", own), ("inclusive", anywhere)):
        print(f"\n{title}:")
        for frame, samples in frames:
            print(f"  {samples / total:6.1%}  {frame}")
    if len(args) > 1:
        shutil.copy(out, args[1])
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
