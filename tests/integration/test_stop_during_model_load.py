"""A worker told to stop while it builds a model version stops without waiting for it.

The build ran on a thread of the loop's default executor, which the process's exit
joins: a worker stopped during a load (at start, or a LoadModel call) stayed up
until the build ended (a TensorRT engine: minutes), its port bound, into SIGKILL.

The slow version here is a real ONNX Runtime build, not a stand-in: a graph whose
constant subgraph (a chain of convolutions) the session folds while it is
created, on one thread (TOKENMESH_ENGINE_THREADS=1), about a minute on a CPU core
of the CI machines, with the GIL released as in any engine build. Stopped within
seconds, it burns that core only until the worker exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import onnx
import pytest
from onnx import TensorProto, helper

from services.core import tasks
from tests import mtls
from tests.integration.conftest import MODEL_REPOSITORY, inference_settings, start_inference
from tests.integration.test_inference_model_lifecycle import _reason, _until
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.inference.v2 import inference_service_pb2_grpc as v2_rpc

GRACE_S = 1.0
# What a stop may take here (nothing in flight but the load): the grace period, and
# the shutdown's few steps. The slow build takes about 60 s: the old worker exited
# only once it had ended.
STOP_BOUND_S = GRACE_S + 5
# Convolutions of 256 channels, 16x16, 15x15 kernels: ~0.15 s each on one core.
FOLDED_CONVOLUTIONS = 400
CHANNELS, SIDE, KERNEL = 256, 16, 15
LOADING = inference_pb2.ModelVersionState.MODEL_VERSION_STATE_LOADING


def _slow_repository(tmp_path: Path) -> Path:
    """A repository with slow/1: an embedding version whose ONNX Runtime session takes
    about a minute to create (the build never ends in these tests)."""
    repo = tmp_path / "repo"
    version = repo / "slow" / "1"
    version.mkdir(parents=True)
    minilm = MODEL_REPOSITORY / "all-minilm-l6-v2" / "1"
    (version / "tokenizer.json").symlink_to(minilm / "tokenizer.json")
    card = json.loads((minilm / "config.json").read_text())
    (version / "config.json").write_text(json.dumps({**card, "weights": "."}))
    onnx.save(_constant_folding_graph(), version / "model.onnx")
    return repo


def _constant_folding_graph() -> onnx.ModelProto:
    """y = x + sum(conv^n(ones)): the convolutions' inputs are all constants, so the
    session computes them while it is created (its constant folding)."""

    def filled(name: str, shape: list[int], value: float) -> onnx.NodeProto:
        return helper.make_node(
            "ConstantOfShape",
            [f"{name}_shape"],
            [name],
            value=helper.make_tensor("value", TensorProto.FLOAT, [1], [value]),
        )

    shapes = {"w": [CHANNELS, CHANNELS, KERNEL, KERNEL], "a0": [1, CHANNELS, SIDE, SIDE]}
    nodes = [filled("w", shapes["w"], 0.001), filled("a0", shapes["a0"], 1.0)]
    for i in range(FOLDED_CONVOLUTIONS):
        nodes.append(
            helper.make_node("Conv", [f"a{i}", "w"], [f"a{i + 1}"], pads=[KERNEL // 2] * 4)
        )
    nodes.append(helper.make_node("ReduceSum", [f"a{FOLDED_CONVOLUTIONS}"], ["s"], keepdims=0))
    nodes.append(helper.make_node("Add", ["x", "s"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow-to-build",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor(f"{name}_shape", TensorProto.INT64, [len(shape)], shape)
            for name, shape in shapes.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(tmp_path: Path, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.inference"],
            env={
                **os.environ,
                "TOKENMESH_GRPC_PORT": "0",
                "TOKENMESH_METRICS_PORT": "-1",
                "TOKENMESH_GRACE_SECONDS": str(GRACE_S),
                "TOKENMESH_PKI_DIR": str(mtls.pki_dir()),
                "TOKENMESH_MODEL_REPOSITORY": str(_slow_repository(tmp_path)),
                "TOKENMESH_MODELS": "",
                "TOKENMESH_TEST_MODELS": "deterministic-test:1",
                "TOKENMESH_ENGINE": "onnxruntime",
                "TOKENMESH_ENGINE_THREADS": "1",
                "TOKENMESH_USAGE_SPOOL_DIR": str(tmp_path / "spool"),
                "TOKENMESH_LEASE_TOKEN_DIR": str(tmp_path / "lease-tokens"),
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for(process: subprocess.Popen[bytes], log_path: Path, ready: Callable[[], bool]) -> None:
    """Waits until `ready()` holds (the process still running), at most 30 s."""
    deadline = time.monotonic() + 30
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def _wait_until_loading(process: subprocess.Popen[bytes], log_path: Path, port: int) -> None:
    """Waits until GetModel shows slow/1 LOADING (it answers while the worker starts)."""

    def loading() -> bool:
        try:
            answer = lookups.GetModel(v2.GetModelRequest(model="slow"), timeout=5)
        except grpc.RpcError as error:  # not bound yet, or the load not begun
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
            return False
        return [(v.version, v.state) for v in answer.model.versions] == [("1", LOADING)]

    with mtls.channel(port, peer="worker") as channel:
        lookups = v2_rpc.InferenceServiceStub(channel)
        _wait_for(process, log_path, loading)


def _assert_stops_promptly(process: subprocess.Popen[bytes], log_path: Path, why: str) -> None:
    """Sends SIGTERM during the load: the worker exits 0 within STOP_BOUND_S, the load
    abandoned, nothing of it registered."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_BOUND_S:.0f} s after SIGTERM:\n{log_path.read_text()}")
    log = log_path.read_text()
    assert code == 0, log
    assert f"model slow version 1: load abandoned ({why})" in log
    assert "inference stopped" in log
    assert "model slow version 1 ready" not in log
    assert "Traceback" not in log


def test_sigterm_while_a_worker_loads_its_models_at_start_stops_it(tmp_path):
    log_path, port = tmp_path / "inference.log", _unused_port()
    process = _spawn(
        tmp_path,
        log_path,
        TOKENMESH_GRPC_PORT=str(port),
        TOKENMESH_MODELS="slow:1",
        REDIS_URL=f"redis://127.0.0.1:{_unused_port()}/0",  # start never gets past the load
    )
    try:
        _wait_until_loading(process, log_path, port)
        _assert_stops_promptly(process, log_path, "cancelled")
    finally:
        process.kill()
        process.wait()


def test_sigterm_during_a_load_model_call_ends_the_call_and_the_worker(tmp_path, redis_url):
    log_path, ready = tmp_path / "inference.log", tmp_path / "ready.json"
    process = _spawn(tmp_path, log_path, TOKENMESH_READY_FILE=str(ready), REDIS_URL=redis_url)
    try:
        _wait_for(process, log_path, ready.exists)
        port = json.loads(ready.read_text())["grpc_port"]
        with mtls.channel(port, peer="worker", caller="operator") as channel:
            load = v1_rpc.InferenceAdminServiceStub(channel).LoadModel.future(
                v1.LoadModelRequest(model="slow", version="1"), timeout=120
            )
            _wait_until_loading(process, log_path, port)
            _assert_stops_promptly(process, log_path, "the worker is stopping")
            error = load.exception(timeout=5)
        assert isinstance(error, grpc.RpcError)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    finally:
        process.kill()
        process.wait()


async def test_a_load_the_stop_abandoned_never_registers_its_version(tmp_path, redis_url):
    """In process, with demo-lm (built in about a second): the stop ends the LoadModel
    call at once, and the build that ends later registers nothing."""
    settings = inference_settings(tmp_path, redis_url, test_models=("t:1",))
    async with await start_inference(settings) as (service, _):
        port = service._running.port
        async with mtls.aio_channel(port, peer="worker", caller="operator") as admin_channel:
            admin = v1_rpc.InferenceAdminServiceStub(admin_channel)
            load = asyncio.ensure_future(
                admin.LoadModel(v1.LoadModelRequest(model="demo-lm", version="1"))
            )

            async def loading() -> bool:
                return service.registry.status("demo-lm", "1") is not None

            await _until(loading)
            # LOADING: not registered yet (building, or warming up). No await between
            # the check and the stop: drain sets the stop before its first await.
            await service.drain()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await load
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert _reason(refused.value) == "WORKER_STOPPING"

            async def build_ended() -> bool:
                return not tasks.abandoned_threads()

            await _until(build_ended, timeout_s=60)
            await asyncio.sleep(0)  # one turn of the loop: what its end scheduled has run
            assert not service.registry.has("demo-lm", "1")
            assert service.registry.status("demo-lm", "1") is None  # not LOADING, not FAILED
