"""Where a worker's CPU goes under a benchmark's load: py-spy on the running worker.

    python -m bench.profile S3   # zero-compute engine, batching off, 32 streams
    python -m bench.profile S1   # demo-lm, 32 streams
    python -m bench.profile S3 /tmp/s3.txt  # also keep py-spy's collapsed stacks
    python -m bench.profile S3 --gil        # only samples of the thread holding the GIL

Starts the row's worker pinned as `make bench` pins it, runs 32 streams from
the load core while `py-spy record` samples the worker (every thread, idle
frames left out), and prints the functions with the most samples: by self
time (the frame on top) and inclusive (anywhere on the stack). py-spy comes
with the bench extra (`pip install -e .[bench]`).

`--gil` keeps only the samples of the thread holding the GIL: the Python
work, without threads that py-spy counts as busy while they wait in C (gRPC's
poller, the engine's condition variable).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench.clients import run_streams
from bench.peers import bench_pki
from bench.pinning import SUT, layout, pin, pinned_self
from bench.servers import service_pid, state_dir, worker
from bench.serving import STREAMS, served_request, zero_compute_request
from services.launcher.mesh import spawn_redis

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


def main() -> None:
    gil = "--gil" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--gil"]
    row = args[0] if args else "S3"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    lay, state = layout(), state_dir()
    request = zero_compute_request() if row == "S3" else served_request()
    out = state / "profile.txt"
    with pinned_self(lay.load):
        redis, redis_url = spawn_redis(state / "redis", state / "redis.log")
        try:
            pin(redis.pid, lay.sut)
            env = {**WORKERS[row], "TOKENMESH_MAX_SEQUENCES": str(STREAMS)}
            env["TOKENMESH_ENGINE_THREADS"] = str(lay.threads(SUT))
            with worker(
                state, redis_url, "p", pki_dir=bench_pki(state), prefix=lay.taskset(SUT), **env
            ) as target:
                run_streams(target, 2, 1, request, processes=1)  # warm-up
                command = [spy, "record", "-p", str(service_pid(state, "p")), "-d", str(SECONDS)]
                command += ["-r", "200", "-f", "raw", "-o", str(out), "--threads", "--nonblocking"]
                command += ["--gil"] if gil else []
                recorder = threading.Thread(
                    target=subprocess.run, args=(command,), kwargs={"capture_output": True}
                )
                recorder.start()
                run_streams(target, STREAMS, 1000, request, processes=1, budget_s=SECONDS + 1)
                recorder.join()
        finally:
            redis.terminate()
            redis.wait(10)
    own, anywhere, total = top(out)
    whose = "the GIL holder" if gil else "the worker's busy threads"
    print(f"{row}: {total} samples of {whose}")
    for title, frames in (("self", own), ("inclusive", anywhere)):
        print(f"\n{title}:")
        for frame, samples in frames:
            print(f"  {samples / total:6.1%}  {frame}")
    if len(args) > 1:
        shutil.copy(out, args[1])
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
