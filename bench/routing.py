"""K1, K2: prefix-affinity routing vs round robin, through the full edge, on the same workers.

One mesh of two demo-lm workers (one engine thread each, both on the
system-under-test core) and two edges on the same control plane, differing
only in how they pick a worker for a model version: the mesh's edge hashes
the head of each request's prompt (bounded-load Maglev, the default), the
other was started with `EdgeConfig(prefix_affinity=False)` and gets round-
robin clusters from the router (the same per-edge switch any operator has;
TOKENMESH_ROUTER_PREFIX_AFFINITY=false turns it off mesh-wide).

K1, prefix-heavy: 8 system prompts of ~400 demo-lm tokens, each request one
of them (seeded, uniform) with a question of its own: OpenAI chat streams of
8 tokens. With affinity each prompt meets one worker (the router pins hot
heads, balanced: services/router/prefix_pins.py); with round robin each
worker sees all 8. Each worker's prefix cache holds about half the prompts
(PREFIX_CACHE_TOKENS): the regime prefix-aware routing exists for, where the
prefixes in use fit in the workers' caches together but not in one. At the
default (4096 tokens) each worker holds all 8 and both modes hit alike (see
docs/perf/summary.md). K2, the control: every request has a system prompt
of its own (nothing to reuse), so routing can only cost.

Measured at the client: completed requests/s from CONCURRENCY clients back
to back (closed loop: the most each mode serves), and time to the first
content chunk (TTFT). K1's TTFT row compares the modes at one offered load,
Poisson arrivals at PACED_LOAD of round robin's mean closed-loop requests/s
over rounds 1 and 2 (the same schedule for both, in rounds 2 and 3 after each
closed-loop window): a closed loop saturates the core, so its TTFT mostly
measures the queue the clients build (reported beside it). From the
usage chunk, the share of prompt tokens the workers took from their prefix
caches; every mesh process's CPU per request; the pinned heads per worker.
Rounds alternate the modes (order flipped each round); every phase uses a
set of prompts no earlier phase sent, so neither mode inherits the other's
cache, starts once the mesh is idle, and measures the steady state: the
phase's own traffic runs WARM_UP_S first (left out). K2's prompts have nothing
to warm: it opens instead with each edge's traffic once (left out: K1's
leftovers fade there), and runs an even number of rounds, so each mode runs
first as often.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer

from bench.peer import pin_mesh, settle
from bench.pinning import LOAD, CpuMeter, pinned_self
from bench.rows import Context, Row, row
from bench.stats import median_each, percentile, percentile_ratio_interval
from gateway.model_routing import LUA_FILTER_NAME
from services.launcher.mesh import REPO_ROOT, Mesh, MeshConfig
from services.launcher.processes import wait_for

MODEL = "demo-lm"
MODES = ("affinity", "round_robin")
PROMPTS = 8
PROMPT_TOKENS = 400
CONCURRENCY = 8
OUTPUT_TOKENS = 8
#: K1's TTFT is compared at the same offered load: Poisson arrivals at this share
#: of round robin's closed-loop requests/s (same run), which both modes sustain.
PACED_LOAD = 0.75
PACED_MAX_IN_FLIGHT = 64
#: Each worker's prefix cache holds about half the shared prompts (4 of 8 at ~440
#: tokens): the regime prefix-aware routing is for, where the prefixes in use fit
#: in the workers' caches together but not in one. (At the default, 4096, each
#: worker holds all 8 and round robin hits as often as affinity.)
PREFIX_CACHE_TOKENS = 2048
#: Each phase first runs its own traffic this long (left out of the figures).
WARM_UP_S = 4.0
TOKENIZER = REPO_ROOT / "models" / MODEL / "1" / "tokenizer.json"
SENTENCES = (
    "You are a careful assistant to the scribes of the temple.",
    "Answer in the words of the King James Bible, and cite the book and the verse.",
    "Keep to one short paragraph, and never invent a verse that is not written.",
    "When the question names a king, say who reigned before him and who after.",
    "When it names a prophet, say to whom he spoke and in which city.",
    "When it names a place, say which tribe dwelt there and what befell it.",
    "If the scripture is silent, say that it is silent, and say no more.",
    "Speak plainly to the simple, and gently to the grieving.",
    "Count the generations from Adam when a genealogy is asked for.",
    "Prefer the law and the prophets to the writings when they disagree.",
    "Name the judges of Israel in their order when the question is of judges.",
    "Do not answer questions of the calendar without the feasts of the Lord.",
)
QUESTIONS = (
    "who begat {}?",
    "where did {} dwell?",
    "what did {} say unto the people?",
    "whom did {} serve?",
    "how long did {} live?",
)
NAMES = ("Enoch", "Seth", "Jared", "Lamech", "Noah", "Shem", "Eber", "Terah", "Nahor", "Caleb")


@dataclass(frozen=True)
class Plan:
    """Plan bounds the scenario: rounds and window per case, and time."""

    rounds: int
    window_s: float
    control_rounds: int
    control_window_s: float
    budget_s: float
    paced_window_s: float
    control_opening_s: float

    @classmethod
    def of(cls, quick: bool) -> Plan:
        # K2 at 4 rounds of 4.5 s (~210 requests a mode, as 3 of 6 s were), an even
        # count so that each mode runs first in as many rounds (see _case).
        if quick:
            return cls(2, 5.0, 2, 3.0, 80.0, 4.0, 2.0)
        return cls(3, 6.0, 4, 4.5, 240.0, 6.0, 3.0)

    def paced(self, scale: float) -> Plan:
        """The plan with its windows at `scale` (bench.rows.Context.scale)."""
        return replace(
            self,
            window_s=self.window_s * scale,
            control_window_s=self.control_window_s * scale,
            paced_window_s=self.paced_window_s * scale,
            control_opening_s=self.control_opening_s * scale,
        )


def system_prompt(tag: str, tokenizer: Tokenizer) -> str:
    """Returns a system prompt of about PROMPT_TOKENS tokens that differs from its first token.

    tag: what makes it unique (its first words: the edge hashes a prompt's head,
    and the prefix cache's first block then differs too).
    """
    rng = random.Random(tag)
    text = f"Desk {tag}."
    while len(tokenizer.encode(text).ids) < PROMPT_TOKENS:
        text += " " + rng.choice(SENTENCES)
    return text


def question(n: int) -> str:
    return f"Question {n}: " + QUESTIONS[n % len(QUESTIONS)].format(NAMES[n % len(NAMES)])


def chat_body(system: str, n: int) -> bytes:
    """Returns request n's bytes: a streamed chat with usage, OUTPUT_TOKENS tokens."""
    return json.dumps(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question(n)},
            ],
            "max_tokens": OUTPUT_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": n,
        }
    ).encode()


@dataclass
class Sample:
    """Sample is one finished request as the client saw it."""

    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int


async def _request(http: httpx.AsyncClient, url: str, body: bytes) -> Sample:
    started = time.perf_counter()
    first = 0.0
    usage: dict[str, Any] = {}
    async with http.stream("POST", url, content=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if not first and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Sample(first * 1000, usage.get("prompt_tokens", 0), details.get("cached_tokens", 0))


async def _phase(
    http: httpx.AsyncClient,
    url: str,
    next_body: Callable[[int], bytes],
    window_s: float,
    failures: list[str],
) -> tuple[list[Sample], float]:
    """CONCURRENCY clients back to back for `window_s`; returns the samples and requests/s
    (of the requests that succeeded; why others failed goes to `failures`)."""
    samples: list[Sample] = []
    counter = iter(range(1_000_000))
    started = time.perf_counter()
    stop = time.monotonic() + window_s

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                samples.append(await _request(http, url, next_body(next(counter))))
            except (RuntimeError, httpx.HTTPError) as error:
                failures.append(f"{type(error).__name__}: {error}"[:300])
                await asyncio.sleep(0.1)  # a failing edge is not polled in a tight loop

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return samples, len(samples) / (time.perf_counter() - started)


async def _paced_phase(
    headers: dict[str, str],
    url: str,
    next_body: Callable[[int], bytes],
    rate: float,
    window_s: float,
    seed: str,
    failures: list[str],
) -> list[Sample]:
    """Requests arriving at `rate` a second for `window_s` (Poisson arrivals from `seed`:
    both modes get the same schedule), whatever pace the answers keep; returns their
    samples once all ended."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=PACED_MAX_IN_FLIGHT)
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as http:

        async def one(n: int) -> None:
            try:
                samples.append(await _request(http, url, next_body(n)))
            except (RuntimeError, httpx.HTTPError) as error:
                failures.append(f"{type(error).__name__}: {error}"[:300])

        started, at = time.monotonic(), 0.0
        for n in itertools.count():
            at += rng.expovariate(rate)
            if at >= window_s:
                break
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            if len(in_flight) >= PACED_MAX_IN_FLIGHT:
                failures.append(f"over {PACED_MAX_IN_FLIGHT} requests in flight: not sent")
                continue
            task = asyncio.create_task(one(n))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=120)
    return samples


def _summary(
    samples: list[Sample], rates: list[float], failures: list[str], cpu: list[dict[str, float]]
) -> dict[str, Any]:
    prompt = sum(s.prompt_tokens for s in samples)
    cpu_us = statistics.median(sum(per.values()) for per in cpu) if cpu else 0.0
    return {
        # Every mesh process's CPU per request (workers, edges, services, Redis), and
        # the requests/s that is with the core to itself: robust on a shared machine.
        "cpu_us_per_request": cpu_us,
        "cpu_us_by_process": {name: round(v) for name, v in median_each(cpu).items()},
        "rps_by_cpu": 1e6 / cpu_us if cpu_us else 0.0,
        **_outcomes(samples, failures),
        "rps": statistics.median(rates) if rates else 0.0,
        "rps_rounds": rates,
        "prompt_tokens_p50": statistics.median(s.prompt_tokens for s in samples) if samples else 0,
        "cached_share": sum(s.cached_tokens for s in samples) / prompt if prompt else 0.0,
    }


@dataclass(frozen=True)
class Edges:
    """Edges are the two edges by mode, the caller's key, and every mesh process (by name)."""

    urls: dict[str, str]
    key: str
    pids: dict[str, int]
    # The affinity edge's Envoy admin API (its routes carry the pins): target -> answer.
    admin: Callable[[str], str]

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", "content-type": "application/json"}


async def _case(
    edges: Edges,
    case: str,
    rounds: int,
    window_s: float,
    deadline: float,
    tokenizer: Tokenizer,
    paced_window_s: float = 0.0,
    opening_s: float = 0.0,
) -> dict[str, Any]:
    """Runs one case (prefix_heavy or distinct) over rounds, modes alternating.

    paced_window_s: from the second round on, each phase also runs a window of
    Poisson arrivals at `_offered` requests/s (the same schedule for both modes
    in a round), on the phase's warm prompts.
    opening_s: before the first round, each mode's edge first runs the case's
    traffic this long (left out), so that what the previous case left behind
    (its heads' heat and pins fading, route updates, caches turning over) is
    not measured against the mode that happens to run first.
    """
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    paced: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    paced_failures: dict[str, list[str]] = {mode: [] for mode in MODES}
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    failures: dict[str, list[str]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}  # µs per request
    pins: dict[int, list[int]] = {}  # per round: the edge's pinned heads per worker
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(timeout=120, headers=edges.headers, limits=limits) as http:
        if opening_s:
            await _opening(http, edges, case, opening_s, tokenizer)
        for n in range(rounds):
            for mode in MODES if n % 2 == 0 else MODES[::-1]:
                if time.monotonic() > deadline:
                    break
                print(f"  {case}: round {n + 1}/{rounds}, {mode}", flush=True)
                next_body, heads = _bodies(case, f"{case[0]}{n}{mode[0]}", tokenizer)
                url = f"{edges.urls[mode]}/openai/v1/chat/completions"
                await settle(edges.pids)  # the last phase's work is done
                # Steady state: the phase's own traffic for a while first (left out):
                # the caches hold what they will hold, the router pinned what it will.
                if heads:  # distinct prompts: nothing to cache or pin
                    await _phase(http, url, next_body, WARM_UP_S, [])
                if mode == "affinity" and heads:
                    pins[n] = _pin_split(edges.admin, heads)
                with CpuMeter(edges.pids) as meter:
                    got, rate = await _phase(http, url, next_body, window_s, failures[mode])
                    await settle(edges.pids)  # deferred work (metering) counts too
                samples[mode] += got
                rates[mode].append(rate)
                per_request = {p: used / max(len(got), 1) * 1e6 for p, used in meter.used.items()}
                cpu[mode].append(per_request)
                if paced_window_s and n > 0:
                    offered = _offered(rates["round_robin"])
                    print(f"  {case}: round {n + 1}/{rounds}, {mode} at {offered:.1f} req/s")
                    paced[mode] += await _paced_phase(
                        edges.headers,
                        url,
                        next_body,
                        offered,
                        paced_window_s,
                        f"paced{n}",
                        paced_failures[mode],
                    )
    summaries = {
        mode: _summary(samples[mode], rates[mode], failures[mode], cpu[mode]) for mode in MODES
    }
    if paced_window_s and rates["round_robin"]:
        for mode in MODES:
            summaries[mode]["paced"] = {
                "offered_rps": _offered(rates["round_robin"]),
                **_outcomes(paced[mode], paced_failures[mode]),
            }
    summaries["affinity"]["pinned_heads_by_worker"] = list(pins.values())
    for mode, summary in summaries.items():
        print(f"  {case} {mode}: CPU µs/request {summary['cpu_us_by_process']}", flush=True)
    if pins:
        print(f"  {case} affinity: pinned heads per worker, by round: {list(pins.values())}")
    return summaries


async def _opening(
    http: httpx.AsyncClient, edges: Edges, case: str, opening_s: float, tokenizer: Tokenizer
) -> None:
    """Runs the case's traffic through each mode's edge for `opening_s` (left out).

    Why: in five full runs in a row, K2's first phase (affinity's, right after
    K1) read the lowest requests/s of its mode's three, 3-13% under the rest.
    """
    for mode in MODES:
        print(f"  {case}: opening, {mode} (left out)", flush=True)
        next_body, _ = _bodies(case, f"{case[0]}open{mode[0]}", tokenizer)
        await settle(edges.pids)
        url = f"{edges.urls[mode]}/openai/v1/chat/completions"
        await _phase(http, url, next_body, opening_s, [])


def _offered(round_robin_rates: list[float]) -> float:
    """Returns the paced phases' requests/s: PACED_LOAD of round robin's mean closed-loop
    rate over its first two rounds (one round when there is one).

    Every paced phase runs after round robin's second window (round 2 runs it
    first), so every phase gets the same rate. One round alone read 19-27 req/s
    between runs of the same code, which put the paced load at 64-97% of round
    robin's later rounds, and K1's TTFT ratio moved with it (2.1-6.6x).
    """
    return PACED_LOAD * statistics.fmean(round_robin_rates[:2])


def _outcomes(samples: list[Sample], failures: list[str]) -> dict[str, Any]:
    """How many requests ended, how many failed (and the first whys), and the TTFTs."""
    ttft = [s.ttft_ms for s in samples]
    return {
        "requests": len(samples),
        "errors": len(failures),
        "first_errors": failures[:3],
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "_ttft_ms": ttft,  # the plot's input
    }


def _pin_split(admin: Callable[[str], str], heads: set[str]) -> list[int]:
    """How many of `heads` the edge's routes pin to each worker (busiest first)."""
    dump = json.loads(admin("/config_dump?resource=dynamic_route_configs"))
    pins: dict[str, str] = {}
    for config in dump.get("configs", []):
        for host in config.get("route_config", {}).get("virtual_hosts", []):
            for route in host.get("routes", []):
                metadata = route.get("metadata", {}).get("filter_metadata", {})
                pins.update(metadata.get(LUA_FILTER_NAME, {}))
    pinned = Counter(address for head, address in pins.items() if head in heads)
    return sorted(pinned.values(), reverse=True)


def _bodies(case: str, tag: str, tokenizer: Tokenizer) -> tuple[Callable[[int], bytes], set[str]]:
    """Returns a phase's requests (request n's body) and the edge's keys of its shared heads.

    prefix_heavy: one of PROMPTS shared system prompts (a seeded choice); distinct:
    a system prompt of its own of the same size (no shared head).
    """
    if case == "prefix_heavy":
        shared = [system_prompt(f"{tag}-{k}", tokenizer) for k in range(PROMPTS)]
        rng = random.Random(tag)
        return (lambda n: chat_body(rng.choice(shared), n)), {_head_key(p) for p in shared}
    template = system_prompt(f"{tag}-x", tokenizer).split(" ", 2)[2]
    return (lambda n: chat_body(f"Desk {tag}-{n}. {template}", n)), set()


def _head_key(system: str) -> str:
    """The edge's prefix key of a chat with this system prompt, sent with the dev key
    (tenant "admin"): the tenant's name, a zero byte and the first 64 bytes of its
    `messages` member as sent, in hex (gateway/model_routing.lua's tenant_prefix)."""
    messages = json.loads(chat_body(system, 0))["messages"]
    return b"admin".hex() + "00" + json.dumps(messages).encode()[:64].hex()


def mesh_config(state: Path) -> MeshConfig:
    """Returns the mesh of the routing comparison: two demo-lm workers, one thread each."""
    return MeshConfig(
        state_dir=state,
        workers=2,
        envoy_concurrency=1,
        edge_tls_port=None,
        service_env={
            "TOKENMESH_MODELS": f"{MODEL}:1",
            "TOKENMESH_TEST_MODELS": "",
            "TOKENMESH_ENGINE_THREADS": "1",
            "TOKENMESH_LOG_LEVEL": "WARNING",
            "TOKENMESH_RATELIMIT_DEFAULT_RPM": "10000000",
            "TOKENMESH_PREFIX_CACHE_TOKENS": str(PREFIX_CACHE_TOKENS),
        },
    )


@contextlib.contextmanager
def _edges(ctx: Context) -> Iterator[Edges]:
    """Runs the mesh and a round-robin edge beside its own; yields both."""
    with Mesh(mesh_config(ctx.state / "mesh-routing")) as mesh:
        address = mesh.start_extra_edge("edge-round-robin", prefix_affinity=False)
        pids = pin_mesh(mesh, ctx, "tokenmesh, 2 demo-lm workers (K1, K2)")
        edges = {"affinity": mesh.edge_url, "round_robin": f"http://{address}"}
        key = mesh.dev_api_key()
        for mode, url in edges.items():  # its routes and workers' health checks, from xDS
            wait_for(lambda url=url: _serves(url, key), 60, f"the {mode} edge to route {MODEL}")
        yield Edges(edges, key, pids, mesh.admin)


def _serves(edge: str, key: str) -> bool:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Amen"}], "max_tokens": 1}
    )
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    try:
        url = f"{edge}/openai/v1/chat/completions"
        return httpx.post(url, content=body, headers=headers, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


async def _measure(edges: Edges, plan: Plan) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    deadline = time.monotonic() + plan.budget_s
    warm, _ = _bodies("distinct", "warm", tokenizer)
    async with httpx.AsyncClient(timeout=120, headers=edges.headers) as http:
        for mode in MODES:  # warm-up of both edges and workers (left out)
            url = f"{edges.urls[mode]}/openai/v1/chat/completions"
            await asyncio.gather(*(_request(http, url, warm(n)) for n in range(4)))
    heavy = await _case(
        edges, "prefix_heavy", plan.rounds, plan.window_s, deadline, tokenizer, plan.paced_window_s
    )
    control = await _case(
        edges,
        "distinct",
        plan.control_rounds,
        plan.control_window_s,
        deadline,
        tokenizer,
        opening_s=plan.control_opening_s,
    )
    return {"prefix_heavy": heavy, "distinct": control}


def measure(ctx: Context) -> dict[str, Any]:
    """Runs K1 and K2; returns per case and mode the TTFT, requests/s and cache share."""
    plan = Plan.of(ctx.quick).paced(ctx.scale)
    ctx.placement.record("bench + K1/K2 client (httpx)", os.getpid(), LOAD, 1)
    with pinned_self(ctx.placement.layout.load), _edges(ctx) as edges:
        import uvloop

        results = uvloop.run(_measure(edges, plan))
    results["load"] = {
        "model": MODEL,
        "system_prompts": PROMPTS,
        "system_prompt_tokens": PROMPT_TOKENS,
        "concurrency": CONCURRENCY,
        "output_tokens": OUTPUT_TOKENS,
        "workers": 2,
        "plan": plan.__dict__,
    }
    return results


def judge(results: dict[str, Any]) -> list[Row]:
    """K1: affinity's TTFT p90 and requests/s against round robin's; K2: the control."""
    heavy, control = results["prefix_heavy"], results["distinct"]
    fast, slow = heavy["affinity"], heavy["round_robin"]
    paced_fast, paced_slow = fast["paced"], slow["paced"]
    lower = paced_slow["ttft_p90_ms"] / max(paced_fast["ttft_p90_ms"], 1e-9)
    low, high = percentile_ratio_interval(
        paced_slow.get("_ttft_ms", ()), paced_fast.get("_ttft_ms", ()), 90
    )
    closed_lower = slow["ttft_p90_ms"] / max(fast["ttft_p90_ms"], 1e-9)
    more = fast["rps"] / max(slow["rps"], 1e-9)
    more_cpu = fast["rps_by_cpu"] / max(slow["rps_by_cpu"], 1e-9)
    c_fast, c_slow = control["affinity"], control["round_robin"]
    c_ttft = c_fast["ttft_p90_ms"] / max(c_slow["ttft_p90_ms"], 1e-9)
    # How far the same code reads between runs: K2 sits near its line, and its
    # p90 moved 0.85-1.14x between identical runs at 2 rounds (~140 requests a
    # mode) and 0.87-1.23x at 3 (~250).
    c_low, c_high = percentile_ratio_interval(
        c_fast.get("_ttft_ms", ()), c_slow.get("_ttft_ms", ()), 90
    )
    c_rps = c_fast["rps"] / max(c_slow["rps"], 1e-9)
    c_rps_cpu = c_fast["rps_by_cpu"] / max(c_slow["rps_by_cpu"], 1e-9)
    errors = _errors(results)
    return [
        row(
            "K1",
            f"TTFT p90 {paced_fast['ttft_p90_ms']:.0f} ms ({lower:.1f}x lower; 95% bootstrap"
            f" interval {low:.1f}-{high:.1f}x) at"
            f" {paced_fast['offered_rps']:.1f} req/s offered ({PACED_LOAD:.0%} of round robin's"
            f" first two rounds; {paced_fast['requests']} requests); {fast['rps']:.1f} req/s at"
            f" {CONCURRENCY} clients ({more:.2f}x; by CPU {more_cpu:.2f}x), TTFT p90 there"
            f" {fast['ttft_p90_ms']:.0f} ms ({closed_lower:.1f}x lower);"
            f" {fast['cached_share']:.0%} of prompt tokens cached"
            f" ({fast['prompt_tokens_p50']:.0f}-token prompts){errors}",
            lower >= 3 and more >= 1.3 and more_cpu >= 1.3 and not errors,
            baseline=f"round robin: TTFT p90 {paced_slow['ttft_p90_ms']:.0f} ms at the same"
            f" load; {slow['rps']:.1f} req/s, TTFT p90 {slow['ttft_p90_ms']:.0f} ms at"
            f" {CONCURRENCY} clients; {slow['cached_share']:.0%} cached",
            cpu=f"mesh µs/request: affinity {fast['cpu_us_per_request']:.0f}, round robin"
            f" {slow['cpu_us_per_request']:.0f}",
        ),
        row(
            "K2",
            f"TTFT p90 {c_fast['ttft_p90_ms']:.0f} ms ({c_ttft:.2f}x; 95% bootstrap interval"
            f" {c_low:.2f}-{c_high:.2f}x over {c_fast['requests']} and {c_slow['requests']}"
            f" requests), {c_fast['rps']:.1f} req/s"
            f" ({c_rps:.2f}x; by CPU {c_rps_cpu:.2f}x)",
            c_ttft <= 1.05 and c_rps >= 0.95 and c_rps_cpu >= 0.95 and not errors,
            baseline=f"round robin: TTFT p90 {c_slow['ttft_p90_ms']:.0f} ms,"
            f" {c_slow['rps']:.1f} req/s",
            cpu=f"mesh µs/request: affinity {c_fast['cpu_us_per_request']:.0f}, round robin"
            f" {c_slow['cpu_us_per_request']:.0f}",
        ),
    ]


def _errors(results: dict[str, Any]) -> str:
    """Returns "; failed requests: ..." naming each case and mode that had some, else ""."""
    failed = [
        f"{case} {mode} {results[case][mode]['errors']}"
        for case in ("prefix_heavy", "distinct")
        for mode in MODES
        if results[case][mode]["errors"]
    ] + [
        f"prefix_heavy paced {mode} {paced['errors']}"
        for mode in MODES
        if (paced := results["prefix_heavy"][mode].get("paced", {})).get("errors")
    ]
    return f"; failed requests: {', '.join(failed)}" if failed else ""


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """routing.png: TTFT CDFs and requests/s of both modes, prefix-heavy and control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bench.report import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = {"affinity": "#1f77b4", "round_robin": "#ff7f0e"}
    for axis, case, title in (
        (axes[0], "prefix_heavy", f"K1: {PROMPTS} shared system prompts"),
        (axes[1], "distinct", "K2: every system prompt distinct"),
    ):
        for mode in MODES:
            values = np.sort(results[case][mode].get("_ttft_ms") or [0.0])
            share = np.arange(1, len(values) + 1) / len(values)
            axis.plot(values, share, label=mode.replace("_", " "), color=colors[mode])
            paced = results[case][mode].get("paced")
            if paced:  # K1's TTFT row: the same offered load for both modes
                values = np.sort(paced.get("_ttft_ms") or [0.0])
                share = np.arange(1, len(values) + 1) / len(values)
                label = f"{mode.replace('_', ' ')}, {paced['offered_rps']:.0f} req/s offered"
                axis.plot(values, share, "--", label=label, color=colors[mode])
        axis.axhline(0.9, color="#cccccc", linewidth=0.8)
        axis.set(title=title, xlabel="TTFT (ms)", ylabel="share of requests")
        axis.legend()
    cases = ("prefix_heavy", "distinct")
    for m, mode in enumerate(MODES):
        axes[2].bar(
            [c + m * 0.4 for c in range(len(cases))],
            [results[case][mode]["rps"] for case in cases],
            width=0.4,
            color=colors[mode],
            label=mode.replace("_", " "),
        )
    axes[2].set_xticks([0.2, 1.2], ["K1 prefix-heavy", "K2 distinct"])
    axes[2].set(title=f"requests/s, {CONCURRENCY} concurrent")
    axes[2].legend()
    return [save_figure(fig, out / "routing.png")]
