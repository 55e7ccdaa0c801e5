"""What counts as our fault, and the tally of what the fuzzer saw.

Our fault, for any hostile request:

- gRPC: INTERNAL, UNKNOWN or DATA_LOSS (a bug in a service or the edge),
  UNAVAILABLE (no healthy upstream: the request broke something), or
  UNIMPLEMENTED (a public RPC the edge no longer routes); DEADLINE_EXCEEDED
  for an RPC that runs no model (a hang).
- HTTP: any 5xx status (500 bug, 502/503 upstream broken or gone, 504 hang).
- A leak: a stack trace or an internal name (`Traceback`, `File "`, `.py`,
  `services.`, `redis`, `Exception`, a Python `<class ...>`) in what the
  client receives, unless the request itself contained that text (echoed
  input is not a leak).
- A bypass: a non-public RPC that answers OK (2xx) to a caller without
  valid credentials.

Everything else (4xx, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, a
closed connection for a malformed request, a client deadline on a model
call) is a correct refusal and only counted.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

OURS_GRPC = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE", "UNIMPLEMENTED"})
# Matched case-sensitively, except the ones in LEAK_NEEDLES_ANY_CASE.
LEAK_NEEDLES = (
    "Traceback",
    'File "',
    ".py",
    "services.",
    "Exception",
    "<class ",
    "grpc._cython",
    "google.protobuf.message",  # the Python module (google.protobuf.Timestamp is API)
)
# JSON escapes that Envoy and json.dumps put in bodies (`<` is `\u003c`).
_UNESCAPE = {"\\u003c": "<", "\\u003e": ">", "\\u0027": "'", '\\"': '"'}
LEAK_NEEDLES_ANY_CASE = ("redis",)


def leaks(answer: str | bytes, request: str | bytes) -> list[str]:
    """Returns the internal names in `answer` that the request did not contain."""
    text = answer.decode("latin-1") if isinstance(answer, bytes) else answer
    for escaped, plain in _UNESCAPE.items():
        text = text.replace(escaped, plain)
    sent = request.decode("latin-1") if isinstance(request, bytes) else request
    found = [n for n in LEAK_NEEDLES if n in text and n not in sent]
    found += [n for n in LEAK_NEEDLES_ANY_CASE if n in text.lower() and n not in sent.lower()]
    return found


@dataclass(frozen=True)
class Outcome:
    """Outcome is what one hostile request got back."""

    status: str  # "OK", "INVALID_ARGUMENT", "HTTP 400", "closed", "timeout"
    text: str = ""  # what the client can read: error message, details, body
    elapsed_s: float = 0.0

    @property
    def http_status(self) -> int | None:
        """Returns the HTTP status, for REST outcomes."""
        if self.status.startswith("HTTP "):
            return int(self.status.split()[1])
        return None

    @property
    def ok(self) -> bool:
        """Tells whether the request was served (gRPC OK or HTTP 2xx)."""
        code = self.http_status
        served = code is not None and 200 <= code < 300 and "grpc-status" not in self.status
        return self.status == "OK" or served


def problems(
    outcome: Outcome,
    request: str | bytes,
    *,
    authenticated: bool,
    public: bool,
    may_take_long: bool,
) -> list[str]:
    """Returns why `outcome` is our fault (empty when it is a correct answer)."""
    found = []
    code = outcome.http_status
    if outcome.status in OURS_GRPC or (code is not None and code >= 500):
        found.append(f"server error {outcome.status}")
    if outcome.status in ("DEADLINE_EXCEEDED", "timeout") and not may_take_long:
        found.append(f"no answer in {outcome.elapsed_s:.1f} s")
    leaked = leaks(outcome.text, request)
    if leaked:
        found.append(f"leaks {leaked}")
    if outcome.ok and not authenticated and not public:
        found.append("served without valid credentials")
    return found


# Faults of ours that are reported but not fixed yet, by name: the outcomes
# they explain are counted apart instead of failing the run. Each has a
# strict xfail regression test in tests/e2e/test_hostile_input.py, which
# starts passing (and so fails) once the fault is fixed: then delete both.
@dataclass(frozen=True)
class KnownIssue:
    """KnownIssue is a reported fault: what is wrong, and which outcomes it explains."""

    description: str
    explains: Callable[[Outcome], bool]


# None open (edge-413-as-grpc-unknown was fixed: a gRPC request over the edge's
# buffer is RESOURCE_EXHAUSTED now).
KNOWN_ISSUES: dict[str, KnownIssue] = {}


def known_issue(outcome: Outcome) -> str | None:
    """Returns the name of the known, reported fault that explains `outcome`, if any."""
    return next((name for name, issue in KNOWN_ISSUES.items() if issue.explains(outcome)), None)


@dataclass
class Tally:
    """Tally counts cases and statuses per target (an RPC or a REST route)."""

    statuses: dict[str, collections.Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    known: collections.Counter[str] = field(default_factory=collections.Counter)
    retried: int = 0  # retryable UNAVAILABLE answers sent once more (and judged on that)

    def add(
        self, target: str, outcome: Outcome, found: Iterable[str] = (), known: str | None = None
    ) -> None:
        """Counts one case; `found` are its problems (see `problems`), `known` its known issue."""
        self.statuses.setdefault(target, collections.Counter())[outcome.status] += 1
        self.failures.extend(f"{target}: {p}" for p in found)
        if known is not None:
            self.known[known] += 1

    def cases(self) -> int:
        """Returns how many cases were tried in all."""
        return sum(sum(c.values()) for c in self.statuses.values())

    def table(self) -> str:
        """Returns a Markdown table: target, cases, statuses seen (most frequent first)."""
        lines = ["| target | cases | statuses |", "|---|---:|---|"]
        for target, counts in self.statuses.items():
            seen = ", ".join(f"{s} {n}" for s, n in counts.most_common())
            lines.append(f"| {target} | {sum(counts.values())} | {seen} |")
        totals: collections.Counter[str] = collections.Counter()
        for counts in self.statuses.values():
            totals.update(counts)
        seen = ", ".join(f"{s} {n}" for s, n in totals.most_common())
        lines.append(f"| **all** | {self.cases()} | {seen} |")
        return "\n".join(lines)

    def summary(self) -> str:
        """Returns one line: cases, targets, and how many were our fault."""
        known = sum(self.known.values())
        return (
            f"hostile input: {self.cases()} cases against {len(self.statuses)} targets, "
            f"{len(self.failures)} of our fault (+{known} explained by known, reported issues;"
            f" {self.retried} retried once after a retryable UNAVAILABLE)"
        )

    def known_issues(self) -> str:
        """Returns a Markdown list of the known issues seen, with counts."""
        return (
            "\n".join(
                f"- {name} ({count} cases): {KNOWN_ISSUES[name].description}"
                for name, count in self.known.items()
            )
            or "none seen"
        )
