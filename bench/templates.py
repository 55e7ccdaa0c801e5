"""Prompt templates: what a shared template head saves in TTFT, through the whole mesh.

A mesh of two demo-lm workers behind the edge. Calls named by one template
(a long head, then the request's own question) meet the prefix-affinity
routing (the edge hashes the template reference, so they reach one worker)
and that worker's prefix cache (the head's KV is computed once). The
baseline is the same calls, each named by a template of its own with a head
of the same size that differs from its first token, so every prefill
computes the whole head. Both kinds of call are interleaved one at a time
(this VM's speed drifts), and each template is resolved once beforehand by a
call that fails validation (a required variable left out): TTFT then
compares prefills, not first reads of a template from Redis.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import grpc

from bench.peer import pin_mesh
from bench.pinning import LOAD, pinned_self
from bench.rows import Context
from bench.stats import percentile
from services.launcher.mesh import Mesh, MeshConfig
from tokenmesh.inference.v2 import inference_pb2 as resources
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

CALLS = 20  # per kind, measured (one warm-up call of the shared template is left out)
BUDGET_S = 120.0
# ~380 demo-lm tokens, as the system-prompt benchmark (bench.inference.SYSTEM_PROMPT).
HEAD = (
    "You are a careful assistant. Answer in the words of the King James Bible, "
    "cite the book and the verse, and keep to one short paragraph. "
) * 9
BODY = "{% for m in messages %}{{ m.content }}{% endfor %} ({{ tag }})"


def _source(case: str) -> str:
    # The case comes first: distinct heads differ from their first token (and 16-token
    # block), so the prefix cache has nothing of one for another.
    return f"Case {case}. {HEAD}{BODY}"


def _create(catalogue: router_rpc.RouterServiceStub, name: str, source: str) -> None:
    variables = [router_pb2.PromptVariable(name="tag", required=True, max_length=16)]
    request = router_pb.CreatePromptTemplateRequest(name=name, template=source, variables=variables)
    catalogue.CreatePromptTemplate(request, timeout=30)


def _resolve(stub: rpc.InferenceServiceStub, reference: str) -> None:
    """Makes the worker that serves `reference` cache it, without a prefill."""
    request = pb.CompleteRequest(model="demo-lm", template=reference, prompt="?")
    try:
        stub.Complete(request, timeout=30)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:  # "variables.tag is required"
            raise
    else:
        raise AssertionError(f"{reference}: a call without its required variable succeeded")


def _ttft_ms(stub: rpc.InferenceServiceStub, reference: str, n: int) -> tuple[float, int, int]:
    """Returns one call's client-side TTFT, prompt tokens and cached prompt tokens."""
    request = pb.GenerateRequest(
        model="demo-lm",
        template=reference,
        variables={"tag": str(n)},
        prompt=f"Question {n}: who begat whom?",
        max_output_tokens=1,
        sampling=resources.SamplingParams(seed=n),
    )
    started = time.perf_counter()
    first = 0.0
    usage = resources.Usage()
    for message in stub.Generate(request, timeout=30):
        first = first or time.perf_counter() - started
        if message.HasField("usage"):
            usage = message.usage
    return first * 1000, usage.prompt_tokens, usage.cached_prompt_tokens


def _summary(samples: list[tuple[float, int, int]]) -> dict[str, float]:
    ttfts = [s[0] for s in samples]
    return {
        "calls": len(samples),
        "prompt_tokens": statistics.median(s[1] for s in samples) if samples else 0,
        "cached_prompt_tokens": statistics.median(s[2] for s in samples) if samples else 0,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "ttft_ms": ttfts,  # type: ignore[dict-item]  # raw samples for results.json
    }


def template_heads(ctx: Context, calls: int = CALLS, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Measures TTFT of calls sharing one template head vs calls with distinct heads
    (pinned: this process, the client, on the load core; the mesh on the other)."""
    state = ctx.state
    ctx.placement.record("bench + T1 client", os.getpid(), LOAD, 1)
    config = MeshConfig(
        state_dir=state / "mesh-templates",
        workers=2,
        envoy_concurrency=1,
        service_env={
            "TOKENMESH_MODELS": "demo-lm:1",
            "TOKENMESH_TEST_MODELS": "",
            "TOKENMESH_LOG_LEVEL": "WARNING",
            "TOKENMESH_RATELIMIT_DEFAULT_RPM": "1000000",
        },
    )
    with (
        pinned_self(ctx.placement.layout.load),
        Mesh(config) as mesh,
        grpc.insecure_channel(mesh.edge_address) as raw,
    ):
        pin_mesh(mesh, ctx, "tokenmesh, 2 demo-lm workers (T1)")
        key = (("x-api-key", mesh.dev_api_key()),)
        channel = grpc.intercept_channel(raw, _Metadata(key))
        catalogue = router_rpc.RouterServiceStub(channel)
        stub = rpc.InferenceServiceStub(channel)
        shared = "bench-shared"
        distinct = [f"bench-distinct-{n}" for n in range(calls)]
        _create(catalogue, shared, _source("shared"))
        for n, name in enumerate(distinct):
            _create(catalogue, name, _source(str(n)))
        for name in (shared, *distinct):
            _resolve(stub, f"{name}@1")
        _ttft_ms(stub, f"{shared}@1", calls)  # computes the shared head once (left out)
        samples: dict[str, list[tuple[float, int, int]]] = {"shared": [], "distinct": []}
        deadline = time.monotonic() + budget_s
        for n in range(calls):
            if time.monotonic() > deadline:
                break
            samples["shared"].append(_ttft_ms(stub, f"{shared}@1", n))
            samples["distinct"].append(_ttft_ms(stub, f"{distinct[n]}@1", n))
    out = {name: _summary(values) for name, values in samples.items()}
    for name, s in out.items():
        print(
            f"  {name:>8} template heads ({s['prompt_tokens']:.0f} prompt tokens,"
            f" {s['cached_prompt_tokens']:.0f} cached): TTFT p50 {s['ttft_p50_ms']:.1f}"
            f" p99 {s['ttft_p99_ms']:.1f} ms over {s['calls']} calls",
            flush=True,
        )
    return out


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the API key to every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = list(metadata)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)
