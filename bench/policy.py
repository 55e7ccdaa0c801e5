"""Content-policy costs (rows C1, C2): detector throughput and the stage's added latency.

C1: MB/s of text through every PII detector (services.inference.pipeline.pii),
on mixed text: prose with a PII item every ~400 characters, and pure prose.
C2: the time a typical policy adds to one request, in process (the stage is
pure Python on the request's task; nothing else on the path changes): the
input check of a 2 KiB prompt (redact email/phone/card, block secrets, two
deny patterns), plus the output filter fed a 1 KiB answer in 4-character
deltas (two output patterns). The disabled path (no policy attached) is two
dict lookups and is not measured.

Run alone: `python -m bench --only C1`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from bench.rows import Context, Row
from services.inference.pipeline import pii
from services.inference.pipeline.policy import OutputFilter, PatternRule, Policy, check_input

_WORDS = (
    "the model answered within budget and the operator moved the canary to half of the "
    "traffic after the error rate held steady for ten minutes while tokens streamed"
).split()
_ITEMS = (
    "jane.doe@example.com",
    "+44 20 7946 0958",
    "4111 1111 1111 1111",
    "GB82 WEST 1234 5698 7654 32",
    "123-45-6789",
    "192.168.1.10",
    "2001:db8::8a2e:370:7334",
    "AKIAIOSFODNN7EXAMPLE",
    "version 1.2.3.4",
    "order 12345678",
)
TYPICAL = Policy(
    "typical",
    1,
    pii={"email": "redact", "phone": "redact", "card": "redact", "secret": "block"},
    block_patterns=(PatternRule(r"(?i)internal\s+only"), PatternRule(r"project\s+[A-Z]{4}\d+")),
    output_block_patterns=(PatternRule(r"(?i)password\s*[:=]"), PatternRule(r"BEGIN PRIVATE")),
)


def prose(chars: int, pii_every: int, seed: int = 19) -> str:
    """Returns about `chars` of text, with a PII-like item every `pii_every` chars (0: none)."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = since = 0
    while size < chars:
        word = rng.choice(_WORDS)
        if pii_every and since >= pii_every:
            word, since = rng.choice(_ITEMS), 0
        parts.append(word)
        size += len(word) + 1
        since += len(word) + 1
    return " ".join(parts)


def _best_of(rounds: int, work: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def _output_filter_pass(answer: str) -> None:
    flt: OutputFilter[int] = OutputFilter([TYPICAL])
    for index in range(0, len(answer), 4):
        flt.feed(answer[index : index + 4], index)
    flt.flush()


def measure(ctx: Context) -> dict[str, Any]:
    """Measures detector throughput and the typical policy's per-request cost."""
    size = 256 * 1024 if ctx.quick else 2 * 1024 * 1024
    rounds = 2 if ctx.quick else 5
    mixed, plain = prose(size, 400), prose(size, 0)
    results: dict[str, Any] = {"bytes": size}
    for name, text in (("mixed", mixed), ("plain", plain)):
        seconds = _best_of(rounds, lambda t=text: pii.find(t))  # type: ignore[misc]
        results[f"{name}_mb_per_s"] = len(text.encode()) / seconds / 1e6
    # A prompt the typical policy lets through (redacting), not one it blocks.
    prompt = prose(2048, 400, seed=7).replace("AKIAIOSFODNN7EXAMPLE", "an access key")
    answer = prose(1024, 0, seed=8)
    requests = 50 if ctx.quick else 400

    def inputs() -> None:
        for _ in range(requests):
            check_input([TYPICAL], [prompt])

    def outputs() -> None:
        for _ in range(requests):
            _output_filter_pass(answer)

    input_s, output_s = _best_of(3, inputs), _best_of(3, outputs)
    results["input_us"] = input_s / requests * 1e6
    results["output_us"] = output_s / requests * 1e6
    results["deltas"] = len(range(0, len(answer), 4))
    return results


def judge(results: dict[str, Any]) -> list[Row]:
    """C1 (detector throughput) and C2 (added latency): reported, no target of the issue."""
    mixed, plain = results["mixed_mb_per_s"], results["plain_mb_per_s"]
    added_ms = (results["input_us"] + results["output_us"]) / 1000
    return [
        Row(
            "C1",
            "content policy: PII detector throughput, all 7 detectors, mixed text"
            " (a PII item every ~400 chars)",
            "reported",
            f"{mixed:.1f} MB/s",
            f"plain prose {plain:.1f} MB/s",
            passed=None,
        ),
        Row(
            "C2",
            "content policy: added latency per request, typical policy (2 KiB prompt checked"
            f" and redacted; 1 KiB answer in {results['deltas']} deltas filtered)",
            "reported",
            f"{added_ms:.2f} ms",
            f"input {results['input_us']:.0f} us + output {results['output_us']:.0f} us"
            f" ({results['output_us'] / results['deltas']:.1f} us a delta); no policy: 2 dict"
            " lookups",
            passed=None,
        ),
    ]
