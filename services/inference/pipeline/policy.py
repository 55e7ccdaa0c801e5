"""Content policies: what they say, how a request's input and its output stream are checked.

A `Policy` is one immutable version of a named policy (the router stores it,
services.router.policies; workers cache it, services.inference.policy_cache).
Its rules:

- `max_input_chars`: a larger input is blocked (rule "max_input_chars");
- `block_patterns` / `block_keywords`: input deny rules, each with an
  optional reason (rules "block_pattern:N", "block_keyword:N");
- `pii`: detector -> action (rule "pii:<detector>"): `block` refuses the
  request, `redact` replaces the span with its placeholder (services.
  inference.pipeline.pii) before the model sees it, `flag` lets it through;
- `output_block_patterns`: checked on the generated text as it streams
  (rule "output_block_pattern:N"), see `OutputFilter`.

Every rule that fires is a `Hit` (policy "name@version", rule, action,
direction); hits are counted and audited by the caller, never with the
matched text. A block raises `ContentPolicyViolation`: INVALID_ARGUMENT with
ErrorInfo reason CONTENT_POLICY and metadata {policy, rule}.

Regexes come from admins but run on every request, so they are compiled
with the `regex` package and every search has a time limit
(`REGEX_TIMEOUT_S`): a catastrophic pattern costs at most that, and then
counts as a match (fail closed: the text is not let through unchecked).
Patterns are also bounded in length and number when a policy is created.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import regex

from services.core.errors import FieldViolation, InvalidArgument
from services.inference.pipeline import pii

BLOCK = "block"
REDACT = "redact"
FLAG = "flag"
ACTIONS = (BLOCK, REDACT, FLAG)
INPUT = "input"
OUTPUT = "output"
REASON = "CONTENT_POLICY"
MAX_PATTERN_CHARS = 256
MAX_PATTERNS = 32  # per list (block patterns, keywords, output patterns)
MAX_REASON_CHARS = 256
#: The longest one search of one admin pattern may take, in seconds.
REGEX_TIMEOUT_S = 0.05
#: Output text held back from the client, in characters: a match of up to this
#: many characters is caught before any of it is sent.
HOLD_BACK_CHARS = 64
MAX_INPUT_CHARS_LIMIT = 10_000_000


class ContentPolicyViolation(InvalidArgument):
    """ContentPolicyViolation is a request a policy blocked (never echoing the text)."""

    def __init__(self, hit: Hit, field_name: str, why: str = "") -> None:
        description = f"blocked by content policy {hit.policy} rule {hit.rule}"
        if why:
            description += f": {why}"
        super().__init__([FieldViolation(field_name, description)], reason=REASON)
        self.hit = hit
        self.metadata = {"policy": hit.policy, "rule": hit.rule}


@dataclass(frozen=True)
class Hit:
    """Hit is one rule that fired on one request (no matched text, ever)."""

    policy: str  # "name@version"
    rule: str  # "pii:email", "block_pattern:0", ...
    action: str  # block, redact, flag
    direction: str  # input, output

    @property
    def label(self) -> str:
        """Returns "policy rule action direction", as audit entries list it."""
        return f"{self.policy} {self.rule} {self.action} {self.direction}"


@dataclass(frozen=True)
class PatternRule:
    """PatternRule is one admin regex (or keyword) with the reason shown when it blocks."""

    pattern: str
    reason: str = ""


def _compile(pattern: str, *, keyword: bool = False) -> Any:
    if keyword:
        return regex.compile(rf"(?<!\w){regex.escape(pattern)}(?!\w)", regex.IGNORECASE)
    return regex.compile(pattern)


def check_rules(field_name: str, rules: Sequence[PatternRule], *, keyword: bool = False) -> None:
    """Raises InvalidArgument naming `field_name[i]` for a rule that cannot be used."""
    if len(rules) > MAX_PATTERNS:
        raise InvalidArgument([FieldViolation(field_name, f"at most {MAX_PATTERNS} entries")])
    for index, rule in enumerate(rules):
        where = f"{field_name}[{index}]"
        if not 1 <= len(rule.pattern) <= MAX_PATTERN_CHARS:
            raise InvalidArgument([FieldViolation(where, f"must be 1-{MAX_PATTERN_CHARS} chars")])
        if len(rule.reason) > MAX_REASON_CHARS:
            raise InvalidArgument(
                [FieldViolation(f"{where}.reason", f"at most {MAX_REASON_CHARS} characters")]
            )
        try:
            compiled = _compile(rule.pattern, keyword=keyword)
        except regex.error as error:
            raise InvalidArgument(
                [FieldViolation(where, f"is not a valid regex: {error}")]
            ) from None
        if compiled.search("", timeout=REGEX_TIMEOUT_S) is not None:
            raise InvalidArgument([FieldViolation(where, "matches the empty string")])


@dataclass(frozen=True)
class Policy:
    """Policy is one immutable version of a content policy (see the module docstring)."""

    name: str
    version: int
    pii: Mapping[str, str] = field(default_factory=dict)  # detector -> action
    block_patterns: tuple[PatternRule, ...] = ()
    block_keywords: tuple[PatternRule, ...] = ()
    output_block_patterns: tuple[PatternRule, ...] = ()
    max_input_chars: int = 0  # 0: no limit of its own
    created_at: float = 0.0  # unix seconds
    created_by: str = ""  # the admin key (or operator) that created it

    @property
    def label(self) -> str:
        """Returns "name@version", as errors, metrics and audit entries name it."""
        return f"{self.name}@{self.version}"

    def check(self) -> None:
        """Raises InvalidArgument (naming the field) unless every rule is usable."""
        for detector, action in self.pii.items():
            if pii.check_detectors([detector]):
                known = ", ".join(pii.DETECTORS)
                raise InvalidArgument(
                    [FieldViolation("pii", f"unknown detector {detector!r} (known: {known})")]
                )
            if action not in ACTIONS:
                raise InvalidArgument(
                    [FieldViolation(f"pii.{detector}", f"action must be one of {ACTIONS}")]
                )
        check_rules("block_patterns", self.block_patterns)
        check_rules("block_keywords", self.block_keywords, keyword=True)
        check_rules("output_block_patterns", self.output_block_patterns)
        if not 0 <= self.max_input_chars <= MAX_INPUT_CHARS_LIMIT:
            raise InvalidArgument(
                [FieldViolation("max_input_chars", f"must be 0-{MAX_INPUT_CHARS_LIMIT}")]
            )

    @functools.cached_property
    def input_rules(self) -> list[tuple[str, Any, str]]:
        """(rule name, compiled pattern, reason) of every input deny rule."""
        rules = [
            (f"block_pattern:{i}", _compile(r.pattern), r.reason)
            for i, r in enumerate(self.block_patterns)
        ]
        rules += [
            (f"block_keyword:{i}", _compile(r.pattern, keyword=True), r.reason)
            for i, r in enumerate(self.block_keywords)
        ]
        return rules

    @functools.cached_property
    def output_rules(self) -> list[tuple[str, Any, str]]:
        """(rule name, compiled pattern, reason) of every output block rule."""
        return [
            (f"output_block_pattern:{i}", _compile(r.pattern), r.reason)
            for i, r in enumerate(self.output_block_patterns)
        ]

    def hit(self, rule: str, action: str, direction: str) -> Hit:
        """Returns a hit of one of this policy's rules."""
        return Hit(self.label, rule, action, direction)

    def to_json(self) -> str:
        """Serialises the version for Redis."""
        return json.dumps(
            {
                "pii": dict(self.pii),
                "block_patterns": [r.__dict__ for r in self.block_patterns],
                "block_keywords": [r.__dict__ for r in self.block_keywords],
                "output_block_patterns": [r.__dict__ for r in self.output_block_patterns],
                "max_input_chars": self.max_input_chars,
                "created_at": self.created_at,
                "created_by": self.created_by,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, name: str, version: int, raw: str | bytes) -> Policy:
        """Parses a version stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)

        def rules(key: str) -> tuple[PatternRule, ...]:
            return tuple(PatternRule(**r) for r in data.get(key, []))

        return cls(
            name=name,
            version=version,
            pii={str(k): str(v) for k, v in data.get("pii", {}).items()},
            block_patterns=rules("block_patterns"),
            block_keywords=rules("block_keywords"),
            output_block_patterns=rules("output_block_patterns"),
            max_input_chars=int(data.get("max_input_chars", 0)),
            created_at=float(data.get("created_at", 0.0)),
            created_by=str(data.get("created_by", "")),
        )


def _search(pattern: Any, text: str) -> bool:
    """Tells whether `pattern` occurs in `text`; a search out of time counts as found."""
    try:
        return pattern.search(text, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        return True  # fail closed: an admin pattern too slow to decide blocks


@dataclass
class InputCheck:
    """InputCheck is the outcome of checking one request's input texts.

    `texts` are the (possibly redacted) texts, in the order given; `hits` every
    rule that fired (flags and redactions; a block raises instead).
    """

    texts: list[str]
    hits: list[Hit] = field(default_factory=list)


def check_input(
    policies: Sequence[Policy], texts: Sequence[str], field_name: str = "input"
) -> InputCheck:
    """Checks (and redacts) a request's input texts against every policy, in order.

    Args:
        policies: the policies that apply (the tenant's, then the key's).
        texts: the request's own texts (prompt, message contents, variables).
        field_name: the request field errors name.

    Raises:
        ContentPolicyViolation: a rule with action block fired.
    """
    result = InputCheck(list(texts))
    for policy in policies:
        total = sum(len(t) for t in result.texts)
        if policy.max_input_chars and total > policy.max_input_chars:
            hit = policy.hit("max_input_chars", BLOCK, INPUT)
            raise ContentPolicyViolation(
                hit, field_name, f"input over {policy.max_input_chars} characters"
            )
        for rule, pattern, reason in policy.input_rules:
            if any(_search(pattern, t) for t in result.texts):
                raise ContentPolicyViolation(policy.hit(rule, BLOCK, INPUT), field_name, reason)
        result.texts = [_apply_pii(policy, t, result.hits, field_name) for t in result.texts]
    return result


def _apply_pii(policy: Policy, text: str, hits: list[Hit], field_name: str) -> str:
    if not policy.pii or not text:
        return text
    # Each action's detectors on their own: where spans overlap one detector names
    # them (pii.find), and a flagged detector's span that outranked a blocked or
    # redacted one's let that text through.
    found = {
        action: pii.find(text, [d for d, a in policy.pii.items() if a == action])
        for action in (BLOCK, REDACT, FLAG)
    }
    if found[BLOCK]:
        detector = min(s.detector for s in found[BLOCK])
        hit = policy.hit(f"pii:{detector}", BLOCK, INPUT)
        raise ContentPolicyViolation(hit, field_name, f"the input contains {detector} data")
    acted = {(span.detector, action) for action in (REDACT, FLAG) for span in found[action]}
    hits += [policy.hit(f"pii:{detector}", action, INPUT) for detector, action in sorted(acted)]
    return pii.redact(text, found[REDACT])


T = TypeVar("T")


@dataclass
class OutputMatch:
    """OutputMatch is the output rule that stopped a choice."""

    hit: Hit
    reason: str

    def message(self) -> str:
        """Returns the in-band explanation a client gets (never the matched text)."""
        text = f"stopped by content policy {self.hit.policy} rule {self.hit.rule}"
        return f"{text}: {self.reason}" if self.reason else text


class OutputFilter(Generic[T]):
    """OutputFilter holds a choice's deltas back until no output rule can match them.

    Fed each delta's text with the item that carries it (a delta, a message),
    it releases whole items once `hold_back` characters have been generated
    after them, and reports a match of any output rule before releasing any
    item that holds part of it: a match of up to `hold_back` characters is
    never sent, not even its first character (a longer one may have had its
    start released).

    NOTE(speed): a time-limited search costs ~11 us whatever its input, so the
    filter scans only when it is about to release, at most once per `step`
    characters, with one search for all the rules (their alternation) over the
    held text plus `hold_back` characters already released: ~1 us per delta.

    Args:
        policies: the policies whose output rules apply (none: everything passes).
        hold_back: characters held back (see HOLD_BACK_CHARS).
        step: characters generated between scans (and releases).
    """

    def __init__(
        self, policies: Sequence[Policy], hold_back: int = HOLD_BACK_CHARS, step: int = 16
    ) -> None:
        self.rules = [(p, r, pattern, why) for p in policies for r, pattern, why in p.output_rules]
        # Without rules (a sampled request only records the text) nothing is held back.
        self.hold_back = hold_back if self.rules else 0
        self.step = step if self.rules else 0
        self.combined = _alternation([p for _, _, p, _ in self.rules])
        self._released_tail = ""  # the last hold_back released characters (context)
        self._held: list[tuple[str, T]] = []
        self._held_chars = 0
        self.released_text: list[str] = []  # everything released (samples read it)
        self.match: OutputMatch | None = None

    @property
    def active(self) -> bool:
        """Tells whether any output rule applies."""
        return bool(self.rules)

    def feed(self, text: str, item: T) -> list[T]:
        """Adds one delta; returns the items now safe to send (in order).

        After a match (`self.match` set) it returns nothing more: the held
        items are dropped, the caller ends the choice.
        """
        if self.match is not None:
            return []
        self._held.append((text, item))
        self._held_chars += len(text)
        if self._held_chars - self.hold_back < self.step:
            return []  # nothing would be released yet: no need to scan
        self.match = self._scan()
        if self.match is not None:
            return []
        released: list[T] = []
        while self._held and self._held_chars - len(self._held[0][0]) >= self.hold_back:
            released.append(self._release())
        return released

    def flush(self) -> list[T]:
        """Returns every held item once a last scan finds nothing (the choice ended)."""
        if self.match is None and self._held:
            self.match = self._scan()
        if self.match is not None:
            return []
        return [self._release() for _ in range(len(self._held))]

    @property
    def held_items(self) -> list[T]:
        """Returns the items held back (after a match: never to be sent)."""
        return [item for _, item in self._held]

    def _release(self) -> T:
        text, item = self._held.pop(0)
        self._held_chars -= len(text)
        self._released_tail = (self._released_tail + text)[-self.hold_back :]
        self.released_text.append(text)
        return item

    def _scan(self) -> OutputMatch | None:
        if not self.rules:
            return None
        window = self._released_tail + "".join(t for t, _ in self._held)
        if self.combined is not None and not _search(self.combined, window):
            return None
        for policy, rule, pattern, reason in self.rules:
            if _search(pattern, window):
                return OutputMatch(policy.hit(rule, BLOCK, OUTPUT), reason)
        return None


def _alternation(patterns: Sequence[Any]) -> Any:
    """Returns one pattern matching where any of `patterns` does (None: keep them apart).

    Patterns with backreferences are kept apart: the alternation renumbers groups.
    """
    if len(patterns) < 2 or any(regex.search(r"\\[1-9]|\(\?P=", p.pattern) for p in patterns):
        return None
    try:
        return regex.compile("|".join(f"(?:{p.pattern})" for p in patterns))
    except regex.error:
        return None


def policy_labels(hits: Iterable[Hit]) -> list[str]:
    """Returns each hit's label, in order, once (for usage events and audit entries)."""
    return list(dict.fromkeys(hit.label for hit in hits))
