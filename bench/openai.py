"""What the OpenAI-compatible surface adds over our own /v2 SSE, through the whole mesh.

The same chat (system + user message, 16 tokens of the deterministic test
engine, so the model's own time is small and fixed) streamed over REST as
`POST /v2/models/deterministic-test:generate` and as
`POST /openai/v1/chat/completions` with `stream: true`. Client-side time to
the first token event and to the end of the stream, at 1 stream (calls
alternate one at a time) and at 32 concurrent streams (rounds of 32 alternate);
this VM's speed drifts, hence the interleaving.

The difference is the surface's cost: the worker parses the JSON itself and
writes OpenAI's chunks (one HttpBody per event) instead of the transcoder
printing v2 messages, and the Lua filter scans JSON instead of protobuf.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from bench.rows import Context, Row
from bench.stats import percentile
from services.launcher.mesh import Mesh, MeshConfig

TOKENS = 16
CALLS = 40  # per surface, one stream at a time
ROUNDS = 6  # per surface, of CONCURRENCY streams each
CONCURRENCY = 32
BUDGET_S = 150.0
MESSAGES = [
    {"role": "system", "content": "You answer in the style of the King James Bible."},
    {"role": "user", "content": "Who made the heavens?"},
]
SURFACES: dict[str, tuple[str, dict[str, Any]]] = {
    "v2": (
        "/v2/models/deterministic-test:generate",
        {"messages": MESSAGES, "max_output_tokens": TOKENS},
    ),
    "openai": (
        "/openai/v1/chat/completions",
        {"model": "deterministic-test", "messages": MESSAGES, "max_tokens": TOKENS, "stream": True},
    ),
}


async def _stream(http: httpx.AsyncClient, surface: str, n: int) -> tuple[float, float]:
    """Returns one stream's (time to its first token event, time to its end) in ms."""
    path, body = SURFACES[surface]
    started = time.perf_counter()
    first = 0.0
    async with http.stream("POST", path, json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{surface}: HTTP {reply.status_code}: {await reply.aread()!r}")
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and not first:
                first = time.perf_counter() - started
    return first * 1000, (time.perf_counter() - started) * 1000


def _summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    ttft = [s[0] for s in samples]
    total = [s[1] for s in samples]
    return {
        "streams": len(samples),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "total_p50_ms": percentile(total, 50),
        "total_p99_ms": percentile(total, 99),
    }


async def _measure(url: str, key: str, calls: int, rounds: int, budget_s: float) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:
        for surface in SURFACES:  # warm-up (connections, first requests), left out
            await asyncio.gather(*(_stream(http, surface, i) for i in range(4)))
        halfway = time.monotonic() + budget_s / 2
        deadline = halfway + budget_s / 2
        one: dict[str, list[tuple[float, float]]] = {s: [] for s in SURFACES}
        for n in range(calls):
            if time.monotonic() > halfway:
                break
            for surface in SURFACES:
                one[surface].append(await _stream(http, surface, n))
        many: dict[str, list[tuple[float, float]]] = {s: [] for s in SURFACES}
        rates: dict[str, list[float]] = {s: [] for s in SURFACES}
        for n in range(rounds):
            if time.monotonic() > deadline:
                break
            for surface in SURFACES:
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(_stream(http, surface, n * CONCURRENCY + i) for i in range(CONCURRENCY))
                )
                rates[surface].append(CONCURRENCY / (time.perf_counter() - started))
                many[surface].extend(results)
    out: dict[str, Any] = {}
    for surface in SURFACES:
        out[f"{surface}_1_stream"] = _summary(one[surface])
        out[f"{surface}_{CONCURRENCY}_streams"] = {
            **_summary(many[surface]),
            "streams_per_s": sorted(rates[surface])[len(rates[surface]) // 2]
            if rates[surface]
            else 0.0,
        }
    return out


def openai_overhead(
    state: Path, calls: int = CALLS, rounds: int = ROUNDS, budget_s: float = BUDGET_S
) -> dict[str, Any]:
    """Measures /openai/v1 chat streams against /v2 SSE streams of the same chat."""
    config = MeshConfig(
        state_dir=state / "mesh-openai",
        workers=1,
        envoy_concurrency=1,
        service_env={
            "TOKENMESH_MODELS": "",
            "TOKENMESH_TEST_MODELS": "deterministic-test:1",
            # A short fixed step: the surfaces' own costs are not lost in the model's.
            "TOKENMESH_TEST_ENGINE_STEP_MS": "2",
            "TOKENMESH_LOG_LEVEL": "WARNING",
            "TOKENMESH_RATELIMIT_DEFAULT_RPM": "1000000",
        },
    )
    with Mesh(config) as mesh:
        out = asyncio.run(_measure(mesh.edge_url, mesh.dev_api_key(), calls, rounds, budget_s))
    for name, s in out.items():
        rate = f", {s['streams_per_s']:.1f} streams/s" if "streams_per_s" in s else ""
        print(
            f"  {name:>18}: TTFT p50 {s['ttft_p50_ms']:.1f} p99 {s['ttft_p99_ms']:.1f} ms,"
            f" total p50 {s['total_p50_ms']:.1f} p99 {s['total_p99_ms']:.1f} ms"
            f" over {s['streams']} streams{rate}",
            flush=True,
        )
    return out


def measure(ctx: Context) -> dict[str, Any]:
    """The registry's entry (bench.registry): a shorter run with --quick."""
    calls, rounds = (8, 2) if ctx.quick else (CALLS, ROUNDS)
    return openai_overhead(ctx.state, calls, rounds)


def judge(results: dict[str, Any]) -> list[Row]:
    """Rows O1 (one stream) and O2 (32 streams): what /openai/v1 adds over /v2 SSE."""
    rows = []
    for row_id, key in (("O1", "1_stream"), ("O2", f"{CONCURRENCY}_streams")):
        ours, v2 = results[f"openai_{key}"], results[f"v2_{key}"]
        rate = ""
        if "streams_per_s" in ours:
            rate = f", {ours['streams_per_s']:.1f} vs {v2['streams_per_s']:.1f} streams/s"
        rows.append(
            Row(
                row_id,
                f"OpenAI chat stream vs /v2 SSE, same chat ({TOKENS} test-engine tokens),"
                f" {key.replace('_', ' ')}: added TTFT and total p50/p99",
                "reported",
                f"TTFT p50 {ours['ttft_p50_ms'] - v2['ttft_p50_ms']:+.1f} ms,"
                f" p99 {ours['ttft_p99_ms'] - v2['ttft_p99_ms']:+.1f} ms;"
                f" total p50 {ours['total_p50_ms'] - v2['total_p50_ms']:+.1f} ms,"
                f" p99 {ours['total_p99_ms'] - v2['total_p99_ms']:+.1f} ms{rate}",
                f"/v2 TTFT p50 {v2['ttft_p50_ms']:.1f} ms, total p50 {v2['total_p50_ms']:.1f} ms",
            )
        )
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        openai_overhead(Path(tmp))
