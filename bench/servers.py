"""Processes the benchmarks measure: a worker, a bare grpc.aio baseline, Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import grpc.aio

from bench.peers import Peer, bare_server_credentials, server_env
from bench.pinning import pin
from services.core import contract
from services.core.interceptors import Context
from services.launcher.mesh import REPO_ROOT, spawn_redis
from services.launcher.processes import Child, clean_env, wait_for
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


@contextlib.contextmanager
def redis_server(
    state: Path, durable: bool = True, name: str = "redis", cores: frozenset[int] | None = None
) -> Iterator[str]:
    """Runs the bundled redis-server (durable: the workers' usage events; volatile:
    rate-limit windows, as the local mesh runs them), pinned to `cores` if given."""
    child, url = spawn_redis(state / name, state / f"{name}.log", durable=durable, name=name)
    if cores is not None:
        pin(child.pid, cores)
    try:
        yield url
    finally:
        child.terminate()
        child.wait(10)


@contextlib.contextmanager
def service(
    state: Path,
    name: str,
    module: str,
    timeout_s: float,
    *,
    pki_dir: Path | None,
    identity: str,
    prefix: Sequence[str] = (),
    **env: str,
) -> Iterator[Peer]:
    """Runs `python -m <module>` until it wrote its ready file; yields how to call it.

    Args:
        pki_dir: the run's PKI (the service requires mTLS); None: plaintext,
            every caller taken for the edge (the mTLS-cost baseline only).
        identity: the service's identity (its certificate's name).
        prefix: argv before the interpreter (e.g. `taskset -c 1`, bench.pinning).
    """
    ready = ready_file(state, name)
    ready.unlink(missing_ok=True)
    settings = {
        "TOKENMESH_READY_FILE": str(ready),
        "TOKENMESH_METRICS_PORT": "-1",
        "TOKENMESH_LOG_LEVEL": "WARNING",
        **server_env(pki_dir),
        **env,
    }
    child = Child(
        name,
        [*prefix, sys.executable, "-m", module],
        clean_env(os.environ, **settings),
        state / f"{name}.log",
    )
    try:
        wait_for(ready.exists, timeout_s, f"{name} to serve", child)
        port = json.loads(ready.read_text())["grpc_port"]
        yield Peer(f"127.0.0.1:{port}", identity, pki_dir)
    finally:
        child.terminate()
        child.wait(30)


def ready_file(state: Path, name: str) -> Path:
    """Returns where service `name` writes its ports and pid once serving."""
    return state / f"{name}.json"


def service_pid(state: Path, name: str) -> int:
    """Returns the pid of the running service `name` (from its ready file)."""
    return int(json.loads(ready_file(state, name).read_text())["pid"])


@contextlib.contextmanager
def worker(
    state: Path,
    redis_url: str,
    name: str,
    *,
    pki_dir: Path | None,
    prefix: Sequence[str] = (),
    **env: str,
) -> Iterator[Peer]:
    """Runs one inference worker process; yields how to call it (see `service`)."""
    with service(
        state,
        name,
        "services.inference",
        120,
        pki_dir=pki_dir,
        identity=contract.WORKER,
        prefix=prefix,
        REDIS_URL=redis_url,
        TOKENMESH_WORKER_ID=name,
        TOKENMESH_USAGE_SPOOL_DIR=str(state / "spool"),
        TOKENMESH_LEASE_TOKEN_DIR=str(state / "lease-tokens"),
        TOKENMESH_MODEL_REPOSITORY=str(REPO_ROOT / "models"),
        TOKENMESH_ENGINE="onnxruntime",
        **env,
    ) as target:
        yield target


#: PACE_KEY: metadata that makes the bare streamer wait this many µs between messages.
PACE_KEY = "x-bench-pace-us"


class BareStreamer(rpc.InferenceServiceServicer):
    """BareStreamer is the baseline: a grpc.aio server that streams canned messages
    (as fast as it can, or one every PACE_KEY µs when the call asks)."""

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        metadata = dict(context.invocation_metadata() or ())
        pace_s = float(metadata.get(PACE_KEY, 0)) / 1e6
        for index in range(request.max_tokens):
            if pace_s and index:
                await asyncio.sleep(pace_s)
            yield pb.GenerateResponse(index=index, text=" tok", token_ids=[7], request_id="bare")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse()


async def _serve_bare(port_file: str, pki_dir: str) -> None:
    server = grpc.aio.server()
    # The other RPCs stay abstract: grpc answers them UNIMPLEMENTED.
    rpc.add_InferenceServiceServicer_to_server(BareStreamer(), server)  # type: ignore[abstract]
    if pki_dir:
        port = server.add_secure_port("127.0.0.1:0", bare_server_credentials(Path(pki_dir)))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


@contextlib.contextmanager
def bare_server(state: Path, pki_dir: Path | None) -> Iterator[Peer]:
    """Runs the bare grpc.aio baseline in its own process; yields how to call it.

    With `pki_dir` it serves the mTLS the services serve (a worker's
    certificate, a client certificate required), so the baseline pays the
    same transport as the service it is compared with.
    """
    with bare_server_process(state, pki_dir) as (target, _):
        yield target


@contextlib.contextmanager
def bare_server_process(
    state: Path, pki_dir: Path | None, prefix: Sequence[str] = ()
) -> Iterator[tuple[Peer, int]]:
    """Runs the bare grpc.aio baseline (see `bare_server`); yields it and its pid.

    prefix: argv before the interpreter (e.g. `taskset -c 1`, bench.pinning).
    """
    port_file = state / "bare.port"
    port_file.unlink(missing_ok=True)
    child = Child(
        "bare",
        [*prefix, sys.executable, "-m", "bench.servers", str(port_file), str(pki_dir or "")],
        clean_env(os.environ),
        state / "bare.log",
    )
    try:
        wait_for(port_file.exists, 30, "the bare server", child)
        time.sleep(0.1)
        peer = Peer(f"127.0.0.1:{port_file.read_text().strip()}", contract.WORKER, pki_dir)
        yield peer, child.pid
    finally:
        child.terminate()
        child.wait(10)


def state_dir() -> Path:
    """Returns a fresh scratch directory for one benchmark run."""
    return Path(tempfile.mkdtemp(prefix="tokenmesh-bench-"))


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve_bare(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
