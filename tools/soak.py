"""Soak: a bounded mixed load on a local mesh, with every process's RSS and fds before and after.

Usage: `python -m tools.soak [--seconds 180] [--clients 4] [--max-requests 200000]`
(`make soak`). It starts a mesh of its own (bundled Redis, the services, two
workers, Envoy) on 127.0.0.1, warms every path, samples each process, runs
streams, unary calls and embeddings through the edge over gRPC and REST
until the time or the request budget is spent, lets the mesh settle, samples
again, and prints (and writes to `<state dir>/soak-report.md`) the requests
by kind and outcome and the process table. It exits 1 when any request
failed, any process died or restarted, or one grew past the limits.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from services.launcher.mesh import Mesh, MeshConfig
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.usage.v1 import usage_service_pb2 as usage_pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc as usage_rpc
from tools import procstat

logger = logging.getLogger("tools.soak")

MODEL = "deterministic-test"
EMBEDDER = "all-minilm-l6-v2"
# Fast settings, as tests/conftest.py's TEST_SERVICE_ENV (the code paths `make run` uses).
SOAK_ENV = {
    "TOKENMESH_TEST_MODELS": f"{MODEL}:1",
    "TOKENMESH_MODELS": f"demo-lm:1,{EMBEDDER}:1",
    "TOKENMESH_ENGINE": "onnxruntime",
    "TOKENMESH_ENGINE_THREADS": "1",
    "TOKENMESH_TEST_ENGINE_STEP_MS": "5",
    "TOKENMESH_AUTH_MAX_FAILURES_PER_MINUTE": "100000",
    "TOKENMESH_RATELIMIT_DEFAULT_RPM": "10000000",
    "TOKENMESH_GRACE_SECONDS": "5",
    "TOKENMESH_LOG_LEVEL": "WARNING",
}
# Growth a process may show after minutes of load (warm caches, allocator arenas).
LIMITS = procstat.Limits(rss_mib=64.0, rss_ratio=0.25, fds=16)
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Client:
    """Client holds one load thread's connections to the edge."""

    inference: rpc.InferenceServiceStub
    usage: usage_rpc.UsageServiceStub
    http: httpx.Client
    metadata: tuple[tuple[str, str], ...]


def _grpc_stream(client: Client, i: int) -> None:
    request = pb.GenerateRequest(model=MODEL, prompt=f"soak stream {i}", max_tokens=8, seed=i)
    stream = client.inference.Generate(request, metadata=client.metadata, timeout=CALL_TIMEOUT_S)
    messages = list(stream)
    last = messages[-1] if messages else None
    if last is None or last.finish_reason != "length" or last.HasField("error"):
        raise RuntimeError(f"stream ended without its final message: {last}")


def _grpc_complete(client: Client, i: int) -> None:
    request = pb.CompleteRequest(model=MODEL, prompt=f"soak unary {i}", max_tokens=4, seed=i)
    reply = client.inference.Complete(request, metadata=client.metadata, timeout=CALL_TIMEOUT_S)
    if reply.usage.completion_tokens != 4:
        raise RuntimeError(f"Complete returned {reply.usage.completion_tokens} tokens")


def _grpc_embed(client: Client, i: int) -> None:
    request = pb.EmbedRequest(model=EMBEDDER, inputs=[f"soak {i}", "embedding"])
    reply = client.inference.Embed(request, metadata=client.metadata, timeout=CALL_TIMEOUT_S)
    if len(reply.embeddings) != 2:
        raise RuntimeError(f"Embed returned {len(reply.embeddings)} vectors")


def _rest_stream(client: Client, i: int) -> None:
    body = {"prompt": f"soak sse {i}", "max_tokens": 6, "seed": i}
    with client.http.stream("POST", f"/v1/models/{MODEL}:generate", json=body) as response:
        response.raise_for_status()
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    if not events or json.loads(events[-1][6:]).get("finish_reason") != "length":
        raise RuntimeError("SSE stream ended without its final event")


def _rest_embed(client: Client, i: int) -> None:
    reply = client.http.post(f"/v1/models/{EMBEDDER}:embed", json={"inputs": [f"rest {i}"]})
    reply.raise_for_status()


def _rest_models(client: Client, i: int) -> None:
    client.http.get("/v1/models").raise_for_status()


def _grpc_usage(client: Client, i: int) -> None:
    client.usage.GetUsage(
        usage_pb.GetUsageRequest(), metadata=client.metadata, timeout=CALL_TIMEOUT_S
    )


# The mix: streams, unary calls and embeddings over both protocols, plus reads.
MIX: tuple[tuple[str, Callable[[Client, int], None]], ...] = (
    ("gRPC Generate (stream)", _grpc_stream),
    ("gRPC Complete", _grpc_complete),
    ("REST generate (SSE)", _rest_stream),
    ("gRPC Embed", _grpc_embed),
    ("gRPC Complete", _grpc_complete),
    ("REST embed", _rest_embed),
    ("gRPC Generate (stream)", _grpc_stream),
    ("REST GET /v1/models", _rest_models),
    ("gRPC GetUsage", _grpc_usage),
)


class Load:
    """Load runs the mix from several threads until a deadline or a request budget."""

    def __init__(self, mesh: Mesh, api_key: str, max_requests: int) -> None:
        self.mesh = mesh
        self.api_key = api_key
        self.max_requests = max_requests
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.errors: list[str] = []
        self._issued = 0
        self._lock = threading.Lock()

    def _next(self) -> int | None:
        with self._lock:
            if self._issued >= self.max_requests:
                return None
            self._issued += 1
            return self._issued

    def _record(self, kind: str, outcome: str, error: str | None) -> None:
        with self._lock:
            self.counts[(kind, outcome)] += 1
            if error is not None and len(self.errors) < 50:
                self.errors.append(f"{kind}: {error}")

    def _worker(self, deadline: float) -> None:
        metadata = (("x-api-key", self.api_key),)
        with (
            grpc.insecure_channel(self.mesh.edge_address) as channel,
            httpx.Client(
                base_url=self.mesh.edge_url,
                headers={"x-api-key": self.api_key},
                timeout=CALL_TIMEOUT_S,
            ) as http,
        ):
            client = Client(
                rpc.InferenceServiceStub(channel),
                usage_rpc.UsageServiceStub(channel),
                http,
                metadata,
            )
            while time.monotonic() < deadline:
                i = self._next()
                if i is None:
                    return
                kind, call = MIX[i % len(MIX)]
                try:
                    call(client, i)
                    self._record(kind, "ok", None)
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    self._record(kind, code.name if code else "RpcError", repr(exc)[:300])
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    self._record(kind, type(exc).__name__, repr(exc)[:300])

    def run(self, seconds: float, clients: int) -> None:
        """Runs `clients` threads for at most `seconds` (and at most max_requests in all)."""
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._worker, args=(deadline,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 2 * CALL_TIMEOUT_S)

    def table(self) -> str:
        """Returns a Markdown table of requests by kind and outcome."""
        kinds = sorted({kind for kind, _ in self.counts})
        lines = ["| requests | ok | failed |", "|---|---:|---:|"]
        for kind in kinds:
            ok = self.counts[(kind, "ok")]
            failed = {o: n for (k, o), n in self.counts.items() if k == kind and o != "ok"}
            lines.append(f"| {kind} | {ok} | {sum(failed.values())} {failed or ''} |")
        total_ok = sum(n for (_, o), n in self.counts.items() if o == "ok")
        lines.append(f"| **all** | {total_ok} | {self.failed()} |")
        return "\n".join(lines)

    def failed(self) -> int:
        """Returns how many requests failed."""
        return sum(n for (_, o), n in self.counts.items() if o != "ok")


def _warm(load: Load) -> None:
    """Serves each kind of request once, so that the first sample sees warm processes."""
    saved = load.max_requests
    load.max_requests = len(MIX)
    load.run(60.0, 1)
    load.max_requests = saved + len(MIX)
    load.counts.clear()


def soak(state_dir: Path, seconds: float, clients: int, max_requests: int) -> int:
    """Runs the soak on a mesh of its own in `state_dir`; returns the exit status."""
    config = MeshConfig(
        state_dir=state_dir,
        workers=2,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=SOAK_ENV,
    )
    with Mesh(config) as mesh:
        load = Load(mesh, mesh.dev_api_key(), max_requests)
        _warm(load)
        before = procstat.sample_all((c.name, c.pid) for c in mesh.children)
        started = time.monotonic()
        load.run(seconds, clients)
        elapsed = time.monotonic() - started
        threading.Event().wait(2.0)  # streams close, spools flush: then the last sample
        after = procstat.sample_all((name, s.pid) for name, s in before.items())
    problems = procstat.problems(before, after, LIMITS)
    requests = sum(load.counts.values())
    report = "\n\n".join(
        [
            "# Soak",
            f"{requests} requests in {elapsed:.0f} s ({requests / max(elapsed, 1e-9):.0f}/s) "
            f"from {clients} clients; {load.failed()} failed",
            load.table(),
            "## Processes (after warm-up -> end)",
            procstat.table(before, after),
            "## Problems",
            "\n".join(f"- {p}" for p in [*problems, *load.errors]) or "none",
        ]
    )
    (state_dir / "soak-report.md").write_text(report + "\n")
    print(report)
    return 1 if problems or load.failed() else 0


def main(argv: list[str] | None = None) -> int:
    """Parses the arguments and runs the soak."""
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--max-requests", type=int, default=200_000, help="request budget")
    parser.add_argument("--state-dir", type=Path, help="where the mesh keeps its state (temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.seconds <= 0 or args.clients < 1 or args.max_requests < 1:
        parser.error("--seconds, --clients and --max-requests must be positive")
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        return soak(args.state_dir.resolve(), args.seconds, args.clients, args.max_requests)
    with tempfile.TemporaryDirectory(prefix="tokenmesh-soak-") as state:
        return soak(Path(state), args.seconds, args.clients, args.max_requests)


if __name__ == "__main__":
    sys.exit(main())
