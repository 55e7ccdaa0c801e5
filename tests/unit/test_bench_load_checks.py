"""The edge benchmark's load tools count only calls that succeeded: h2load and ghz take
a gRPC error (HTTP 200, grpc-status in the trailers) for a served request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.edge import COMPLETE, METHOD, REALISTIC, throughput_rps
from bench.peers import Peer
from bench.servers import bare_server

# h2load's summary of 100 calls that each got an empty reply (5 bytes of DATA apiece).
H2LOAD_OK = """finished in 26.12ms, 3829.07 req/s, 241.04KB/s
requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 6.29KB (6446) total, 600B (600) headers (space savings 92.59%), 500B (500) data
"""


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Peer]:
    """The bare grpc.aio server: ListModels answers OK, Complete UNIMPLEMENTED."""
    with bare_server(tmp_path, None) as peer:
        yield peer


def test_a_method_whose_every_call_fails_has_no_throughput(bare: Peer, tmp_path: Path) -> None:
    # h2load alone read ~2,700 req/s here: 200 "succeeded", each a grpc-status 12.
    with pytest.raises(RuntimeError, match="Complete on .* answered UNIMPLEMENTED"):
        throughput_rps(bare, tmp_path, [], 200, COMPLETE, REALISTIC.SerializeToString())


def test_a_method_that_answers_gets_its_rate_and_a_path_may_expect_its_error(
    bare: Peer, tmp_path: Path
) -> None:
    import grpc

    rps, tool = throughput_rps(bare, tmp_path, [], 200, METHOD)
    assert rps > 0 and tool in ("h2load", "ghz", "python")
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    body = REALISTIC.SerializeToString()
    assert throughput_rps(bare, tmp_path, [], 200, COMPLETE, body, expect=unimplemented)[0] > 0
    with pytest.raises(RuntimeError, match="answered OK, expected UNIMPLEMENTED"):
        throughput_rps(bare, tmp_path, [], 200, METHOD, expect=unimplemented)


def test_h2load_output_must_show_every_call_answered_with_a_reply() -> None:
    from bench.edge import LoadFailed, h2load_rps

    assert h2load_rps(H2LOAD_OK, 100, b"") == 3829.07
    # A trailers-only error has no DATA frame: most calls failing shows. (Sampled
    # answers vary in size, so a few short replies must not fail a healthy run.)
    assert h2load_rps(H2LOAD_OK.replace("500B (500) data", "440B (440) data"), 100, b"")
    short = H2LOAD_OK.replace("500B (500) data", "240B (240) data")
    with pytest.raises(LoadFailed, match="240 bytes of DATA for 100 replies of 5 bytes"):
        h2load_rps(short, 100, b"")
    assert h2load_rps(short, 100, None) == 3829.07  # a path expected to fail has no DATA
    failed = H2LOAD_OK.replace("100 succeeded, 0 failed", "90 succeeded, 10 failed")
    with pytest.raises(LoadFailed, match="90 of 100 requests succeeded"):
        h2load_rps(failed, 100, b"")


def test_ghz_counts_only_when_every_call_ended_with_the_expected_status() -> None:
    import grpc

    from bench.edge import LoadFailed, ghz_rps

    assert ghz_rps({"rps": 900.5, "statusCodeDistribution": {"OK": 300}}, 300) == 900.5
    with pytest.raises(LoadFailed, match="'PermissionDenied': 3"):
        ghz_rps({"rps": 950.0, "statusCodeDistribution": {"OK": 297, "PermissionDenied": 3}}, 300)
    direct = {"rps": 2000.0, "statusCodeDistribution": {"Unimplemented": 300}}
    assert ghz_rps(direct, 300, grpc.StatusCode.UNIMPLEMENTED) == 2000.0


def test_an_envoy_started_after_the_mesh_was_pinned_moves_to_the_sut_core(tmp_path: Path) -> None:
    import os
    import sys

    from bench.edge import pin_child
    from bench.pinning import Layout, Placement, pinned_self
    from bench.rows import Context
    from services.launcher.mesh import Mesh, MeshConfig
    from services.launcher.processes import Child, clean_env

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    lay = Layout(frozenset(cores[:1]), frozenset(cores[1:2]))
    ctx = Context(tmp_path, True, Placement(lay))
    mesh = Mesh(MeshConfig(state_dir=tmp_path / "mesh"))
    with pinned_self(lay.load):  # as edge_overhead runs: what it spawns inherits the load core
        child = Child(
            "edge-unrouted",
            [sys.executable, "-c", "import time; time.sleep(60)"],
            clean_env(os.environ),
            tmp_path / "child.log",
        )
    mesh.children.append(child)
    try:
        assert os.sched_getaffinity(child.pid) == lay.load
        assert pin_child(mesh, ctx, "edge-unrouted", "extra Envoy") == child.pid
        assert os.sched_getaffinity(child.pid) == lay.sut
        placed = ctx.placement.to_json()["processes"]
        assert placed == [
            {
                "name": "extra Envoy",
                "pid": child.pid,
                "role": "system under test",
                "cores": str(cores[1]),
                "threads": "",
            }
        ]
    finally:
        child.terminate()
        child.wait(10)
