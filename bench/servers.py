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


#: PACE_KEY: metadata that makes the bare streamer send a message every this many µs.
PACE_KEY = "x-bench-pace-us"
#: TOKENS_KEY: metadata that makes the bare streamer send this many tokens a message on
#: average (a fraction spreads over the messages, as a worker's batching does); default 1.
TOKENS_KEY = "x-bench-tokens-per-message"


def message_sizes(max_tokens: int, per_message: float) -> list[int]:
    """Returns the tokens of each message of a `max_tokens` stream at `per_message`
    tokens a message on average (at least one a message)."""
    per = max(per_message, 1.0)
    sizes: list[int] = []
    sent = 0
    while sent < max_tokens:
        upto = min(max_tokens, max(sent + 1, int((len(sizes) + 1) * per)))
        sizes.append(upto - sent)
        sent = upto
    return sizes


class BareStreamer(rpc.InferenceServiceServicer):
    """BareStreamer is the baseline: a grpc.aio server that streams canned messages
    (as fast as it can, or one every PACE_KEY µs when the call asks; TOKENS_KEY
    tokens a message)."""

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        metadata = dict(context.invocation_metadata() or ())
        pace_s = float(metadata.get(PACE_KEY, 0)) / 1e6
        sizes = message_sizes(request.max_tokens, float(metadata.get(TOKENS_KEY, 1)))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, size in enumerate(sizes):
            # Each message is due at a fixed time from the first: the loop's timers
            # round to the millisecond, so sleeping `pace_s` after each send fell ~30%
            # short of a 2.35 ms pace; a schedule keeps the mean rate exact.
            wait = started + index * pace_s - loop.time() if pace_s else 0.0
            if wait > 0:
                await asyncio.sleep(wait)
            yield pb.GenerateResponse(
                index=index, text=" tok" * size, token_ids=[7] * size, request_id="bare"
            )

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
