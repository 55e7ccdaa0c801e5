"""Where the edge's Envoy CPU per request goes: the same call through edges that each
leave one group of filters out.

    python -m bench.edge_split            # 4 interleaved rounds of 600 Completes a path
    python -m bench.edge_split --rounds 6

E2 shows that the full edge's Envoy costs about twice a bare proxy's CPU per
demo-lm Complete. This splits the difference: one mesh (one demo-lm worker,
pinned like E2), and beside its edge, Envoys on the same control plane that
differ in one thing each:

    full             the edge as it ships (extra edge, same config as the mesh's)
    no-routing-lua   without the model-routing Lua filter (routes by header only)
    no-ratelimit     without the rate-limit filter (no callout to the usage service)
    no-auth          without JWT, RBAC, API keys and the rate limit
    bare             a bare Envoy proxy: router filter only, mTLS upstream (E2's floor)

Each path runs E2's call (demo-lm Complete, 16 tokens, 32 concurrent, h2load)
in interleaved rounds, order flipped every round; the table shows each
process's CPU µs per Complete (median of the rounds) from /proc. A group's
cost is the full edge's Envoy CPU minus that path's. Every idle Envoy still
costs ~25-35 µs per Complete of the round (its timers), in every row alike.
On this 2-core VM a path moved by up to ~270 µs between runs: take 8 rounds
or more, and compare runs (docs/perf/summary.md, seventh session).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.edge import (
    COMPLETE,
    REALISTIC,
    bare_envoy,
    complete_throughput,
    issue_token,
    mesh_config,
    throughput_rps,
)
from bench.peers import Peer
from bench.pinning import LOAD, SUT, layout, pin, pinned_self
from gateway.edge_auth import EdgeAuth
from services.launcher.mesh import Mesh

# Each variant: the EdgeConfig changes of an extra edge (see Mesh.start_extra_edge).
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no-routing-lua": {"model_routing": False},
    "no-ratelimit": {"auth": EdgeAuth(ratelimit=False)},
    "no-auth": {"auth": None},
}
Target = tuple[Peer, list[tuple[str, str]]]  # where to call, with which metadata


def measure(
    mesh: Mesh, state: Path, paths: dict[str, Target], bare_pid: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Runs E2's rounds over every path (bench.edge.complete_throughput, after a
    warm-up left out); returns each path's median req/s and CPU µs per Complete."""
    body = REALISTIC.SerializeToString()
    for target, metadata in paths.values():
        throughput_rps(target, state, metadata, 200, COMPLETE, body)
    measured = complete_throughput(mesh, state, paths, bare_pid, rounds)
    return {
        name: {
            "rps": statistics.median(measured[name]),
            "cpu_us": {p: round(v) for p, v in measured["cpu_us_per_request"][name].items()},
        }
        for name in paths
    }


def own_envoy(name: str) -> str:
    """The process name of a path's own Envoy."""
    return "bare-envoy" if name == "bare" else f"edge-{name}"


def print_table(results: Mapping[str, Mapping[str, Any]]) -> None:
    full = results["full"]["cpu_us"][own_envoy("full")]
    print(f"{'path':>15} {'req/s':>7} {'Envoy µs':>9} {'saves':>6} {'worker µs':>10}")
    for name, result in results.items():
        envoy = result["cpu_us"].get(own_envoy(name), 0)
        worker = result["cpu_us"].get("inference-0", 0)
        print(f"{name:>15} {result['rps']:7.1f} {envoy:9d} {full - envoy:6d} {worker:10d}")
    for name, result in results.items():
        print(f"  {name}: {result['cpu_us']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    cores = layout()
    with tempfile.TemporaryDirectory(prefix="edge-split-") as tmp:
        state = Path(tmp)
        with pinned_self(cores.load), Mesh(mesh_config(state, edge_tls_port=None)) as mesh:
            token = issue_token(mesh.edge_url, mesh.dev_api_key())
            jwt = [("authorization", f"Bearer {token}")]
            paths: dict[str, Target] = {
                name: (Peer(mesh.start_extra_edge(f"edge-{name}", **changes)), jwt)
                for name, changes in VARIANTS.items()
            }
            paths["no-auth"] = (paths["no-auth"][0], [])
            bare, bare_address = bare_envoy(
                state, mesh.ports["inference-0"], mesh.sds_dir, direct=False
            )
            try:
                paths["bare"] = (Peer(bare_address), [])
                for pid in [bare.pid, *(c.pid for c in mesh.children if not c.stopping)]:
                    pin(pid, cores.sut)
                print(f"{LOAD}: cores {sorted(cores.load)}; {SUT} (every Envoy, the mesh):")
                print(f"  cores {sorted(cores.sut)}")
                print_table(measure(mesh, state, paths, bare.pid, args.rounds))
            finally:
                bare.terminate()
                bare.wait(10)


if __name__ == "__main__":
    main()
