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
(`REGEX_TIMEOUT_S`): a catastrophic pattern costs about that, and then
counts as a match (fail closed: the text is not let through unchecked). On
input the limit is the checking thread's own CPU time (the package counts the
whole process's, which other threads use up: `_Budget.search`).
Patterns are also bounded in length and number when a policy is created.
Checking one request's input has a budget of its own (`CHECK_BUDGET_S` of
CPU time for every policy, rule, detector and text together): the limit per
search let 256 texts cost 256 times the limit. A request whose check runs
out of it is blocked (rule "check_time", fail closed).
"""

from __future__ import annotations

import functools
import importlib
import json
import time
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

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
#: The most CPU time checking one request's input may take, in seconds (every
#: policy, rule, detector and text together); then it is blocked (fail closed).
CHECK_BUDGET_S = 2.0
#: The rule a request whose input check ran out of CHECK_BUDGET_S is blocked by.
CHECK_TIME_RULE = "check_time"
#: Output text held back from the client, in characters: a match of up to this
#: many characters is caught before any of it is sent.
HOLD_BACK_CHARS = 64
#: The longest output match caught at all, in characters: a longer one is caught
#: late (its start may have been sent), one longer than this may be missed.
MAX_MATCH_CHARS = 1024
#: Characters generated between scans for output matches longer than HOLD_BACK_CHARS
#: (every scan looks for the shorter ones): such a match is caught within this many
#: characters of its end.
LONG_SCAN_CHARS = 128
#: Output text before a match that look-behinds, \b and \B may read, in characters.
LOOKBEHIND_CHARS = 32
#: Output text after a match that a rule's look-aheads may read, in characters: a
#: rule with a look-ahead is judged once this many characters follow its match.
LOOKAHEAD_CHARS = 8
MAX_INPUT_CHARS_LIMIT = 10_000_000


class ContentPolicyViolation(InvalidArgument):
    """ContentPolicyViolation is a request a policy blocked (never echoing the text)."""

    def __init__(self, hit: Hit, field_name: str, why: str = "") -> None:
        description = f"blocked by content policy {hit.policy} rule {hit.rule}"
        if why:
            description += f": {why}"
        metadata = {"policy": hit.policy, "rule": hit.rule}
        super().__init__(
            [FieldViolation(field_name, description)], reason=REASON, metadata=metadata
        )
        self.hit = hit


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


# What a reader does not see and a tokenizer may drop (BERT's, all-minilm-l6-v2's,
# drops every one): format characters (Unicode Cf: zero-width space and joiners,
# soft hyphen, word joiner, bidi marks, tag characters), control characters but tab,
# newline and carriage return (Cc), variation selectors and the combining grapheme
# joiner (marks of combining class 0). "for\u200bbidden" reached the model as the
# "forbidden" a rule blocked.
_INVISIBLE = regex.compile(
    r"[\p{Cf}\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u034f\ufe00-\ufe0f\U000e0100-\U000e01ef]+"
)
# Plain text: nothing to fold (printable ASCII, tab, newline, carriage return).
_PLAIN = regex.compile(r"[\t\n\r\x20-\x7e]*")
# Marks a fold drops once decomposed: accents ("í" is "i" and U+0301), the marks
# that combine (class > 0). Not vowel signs of class 0: every mark dropped, "है"
# read as "ह", and a Hindi keyword blocked ordinary sentences.
_MARKS = regex.compile(r"(?V1)[[\p{Mn}\p{Me}]--\p{ccc=0}]+")


def folded(text: str) -> str:
    """Returns `text` as input rules also read it: compatibility forms unified (NFKC:
    fullwidth letters, ligatures), invisible characters removed and accents dropped
    ("forbíddén" is "forbidden"). Plain ASCII text is returned as it is."""
    if _PLAIN.fullmatch(text):
        return text
    plain = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return unicodedata.normalize("NFC", _MARKS.sub("", unicodedata.normalize("NFD", plain)))


def readable(text: str) -> str:
    """Returns `text` as PII detectors also read it: NFKC, invisible characters removed,
    accents kept (an address may have letters of any script). Plain ASCII as it is."""
    if _PLAIN.fullmatch(text):
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def _compile(pattern: str, *, keyword: bool = False) -> Any:
    if keyword:
        return regex.compile(rf"(?<!\w){regex.escape(pattern)}(?!\w)", regex.IGNORECASE)
    return regex.compile(pattern)


def widths(pattern: str) -> tuple[int, int]:
    """Returns the fewest and most characters `pattern` matches (unknown: 0, unbounded).

    Read by the standard library's parser: the `regex` package does not tell.
    A pattern only `regex` reads (`\\p{L}`, `(?V1)`, fuzzy matching) is unknown.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "possible nested set" and the like
        try:
            low, high = _RE_PARSER.parse(pattern).getwidth()
        except (_RE_PARSER.error, OverflowError, RecursionError, ValueError):
            return 0, UNBOUNDED
    return int(low), min(int(high), UNBOUNDED)


# The standard library's pattern parser (re._parser: `sre_parse` warns when imported).
_RE_PARSER: Any = importlib.import_module("re._parser")
UNBOUNDED = 1 << 31


def check_rules(
    field_name: str, rules: Sequence[PatternRule], *, keyword: bool = False, output: bool = False
) -> None:
    """Raises InvalidArgument naming `field_name[i]` for a rule that cannot be used.

    An output rule whose shortest match is longer than MAX_MATCH_CHARS could never
    stop anything (the filter sees no longer match) and is refused.
    """
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
        if output and widths(rule.pattern)[0] > MAX_MATCH_CHARS:
            raise InvalidArgument(
                [FieldViolation(where, f"never matches {MAX_MATCH_CHARS} characters or fewer")]
            )


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
        check_rules("output_block_patterns", self.output_block_patterns, output=True)
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
    def folded_input_rules(self) -> list[Any]:
        """The pattern of each of `input_rules` (same order) that reads a `folded` text:
        a keyword folded too ("café" is looked for as "cafe"), a pattern as it is."""
        rules = [rule for _, rule, _ in self.input_rules]
        for i, keyword in enumerate(self.block_keywords, start=len(self.block_patterns)):
            bare = folded(keyword.pattern)
            # A keyword of invisible characters only ("\u202e") folds to nothing, which
            # matched at every non-word boundary: read as written, it matches itself.
            if bare and bare != keyword.pattern:
                rules[i] = _compile(bare, keyword=True)
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


class _OutOfTime(Exception):
    """_OutOfTime is a request's input check that spent its budget (`policy`: the one
    being checked then)."""

    policy: Policy | None = None


# A search whose time limit ran out is tried again when this thread had less than
# this share of the limit (the rest was other threads' CPU time), up to _SEARCH_TRIES
# times in all; each retry's limit is scaled by how little of the process's CPU time
# the thread had, and _RETRY_MARGIN more for load that grows meanwhile.
_OWN_SHARE = 0.9
_SEARCH_TRIES = 4
_RETRY_MARGIN = 2.0
# The least own CPU time a retry's scale is computed from (a thread that barely ran).
_MIN_OWN_S = 0.0005


class _Budget:
    """_Budget is the CPU time left to check one request's input.

    CPU time of the checking thread, not wall time: a check waiting for the
    GIL or a core (others' checks, the event loop) is not charged for it.
    """

    def __init__(self, seconds: float) -> None:
        self.deadline = time.thread_time() + seconds

    def left(self) -> float:
        """Returns the seconds left; raises _OutOfTime when none are."""
        left = self.deadline - time.thread_time()
        if left <= 0:
            raise _OutOfTime
        return left

    def search(self, pattern: Any, text: str) -> bool:
        """Tells whether `pattern` occurs in `text` (out of time: found, fail closed).

        A search may take REGEX_TIMEOUT_S of this thread's CPU time (less when
        the budget has less left: then the request is out of time, not the rule).

        NOTE(clock): the `regex` package's `timeout` counts the whole process's
        CPU time, not this thread's. Its limit ran out after a fraction of that
        whenever other threads ran (the other check thread, the engine's BLAS
        threads, tokenizers), and a harmless text was blocked by a rule it does
        not match (19 of 20 long prompts, two checks at once, the engine busy).
        So a try is timed with this thread's clock: one that ran out before the
        thread itself spent the limit is tried again with a limit scaled to the
        share of the process's CPU time the thread had; only a try in which the
        thread spent its limit fails closed. The budget bounds the retries: a
        catastrophic pattern still costs about the limit (a few times it under
        load), never more than the budget.

        `concurrent`: the GIL is released while it runs, so a check on a worker
        thread leaves the event loop running.
        """
        scale = 1.0
        for _ in range(_SEARCH_TRIES):
            left = self.left()
            limit = min(REGEX_TIMEOUT_S, left)  # this thread's CPU time for the search
            own, process = time.thread_time(), time.process_time()
            try:
                found = pattern.search(text, timeout=min(limit * scale, left), concurrent=True)
            except TimeoutError:
                own, process = time.thread_time() - own, time.process_time() - process
            else:
                return found is not None
            if own >= _OWN_SHARE * limit:  # this thread spent the limit itself
                if limit < REGEX_TIMEOUT_S:
                    raise _OutOfTime  # the request's budget ran out, not the rule's
                return True
            scale = _RETRY_MARGIN * process / max(own, _MIN_OWN_S)
        raise _OutOfTime  # other threads' CPU time used up every try: fail closed


@dataclass
class InputCheck:
    """InputCheck is the outcome of checking one request's input texts.

    `texts` are the (possibly redacted) texts, in the order given; `hits` every
    rule that fired (flags and redactions; a block raises instead).
    """

    texts: list[str]
    hits: list[Hit] = field(default_factory=list)


def check_input(
    policies: Sequence[Policy],
    texts: Sequence[str],
    field_name: str = "input",
    budget_s: float = CHECK_BUDGET_S,
) -> InputCheck:
    """Checks (and redacts) a request's input texts against every policy, in order.

    Args:
        policies: the policies that apply (the tenant's, then the key's).
        texts: the request's own texts (prompt, message contents, variables).
        field_name: the request field errors name.
        budget_s: CPU seconds the whole check may take (see CHECK_BUDGET_S).

    Raises:
        ContentPolicyViolation: a rule with action block fired, or the check ran
            out of its budget (rule "check_time" of the policy being checked).
    """
    try:
        return _check_all(policies, texts, field_name, _Budget(budget_s))
    except _OutOfTime as out:
        assert out.policy is not None
        hit = out.policy.hit(CHECK_TIME_RULE, BLOCK, INPUT)
        why = f"the input took over {budget_s:g} s to check"
        raise ContentPolicyViolation(hit, field_name, why) from None


def try_check_input(
    policies: Sequence[Policy], texts: Sequence[str], field_name: str, budget_s: float
) -> InputCheck | None:
    """Checks like `check_input`, but decides nothing when `budget_s` runs out.

    For a first try within a small budget (on the event loop): out of it, the
    text is neither let through nor blocked, and returns None (check it again,
    with the whole budget, elsewhere). Its hits are not counted anywhere.

    Raises:
        ContentPolicyViolation: a rule with action block fired.
    """
    try:
        return _check_all(policies, texts, field_name, _Budget(budget_s))
    except _OutOfTime:
        return None


def _check_all(
    policies: Sequence[Policy], texts: Sequence[str], field_name: str, budget: _Budget
) -> InputCheck:
    result = InputCheck(list(texts))
    folds: dict[str, str] = {}  # each text folded once, whatever the policies
    for policy in policies:
        try:
            _check_policy(policy, result, field_name, budget, folds)
        except _OutOfTime as out:
            out.policy = policy
            raise
    return result


def _fold(text: str, folds: dict[str, str]) -> str:
    """Returns `folded(text)`, computed once per check."""
    bare = folds.get(text)
    if bare is None:
        bare = folds[text] = folded(text)
    return bare


def _check_policy(
    policy: Policy, result: InputCheck, field_name: str, budget: _Budget, folds: dict[str, str]
) -> None:
    total = sum(len(t) for t in result.texts)
    if policy.max_input_chars and total > policy.max_input_chars:
        hit = policy.hit("max_input_chars", BLOCK, INPUT)
        raise ContentPolicyViolation(
            hit, field_name, f"input over {policy.max_input_chars} characters"
        )
    # Each text is also read folded (see `folded`): an invisible character, an accent
    # or a fullwidth letter inside a keyword passed every rule.
    if policy.input_rules:
        budget.left()
    views = [(text, _fold(text, folds)) for text in result.texts] if policy.input_rules else []
    for (rule, pattern, reason), folded_pattern in zip(
        policy.input_rules, policy.folded_input_rules, strict=True
    ):
        refolds = folded_pattern is not pattern  # a keyword with accents: "cafe" too
        if any(
            budget.search(pattern, text)
            or ((refolds or bare != text) and budget.search(folded_pattern, bare))
            for text, bare in views
        ):
            raise ContentPolicyViolation(policy.hit(rule, BLOCK, INPUT), field_name, reason)
    result.texts = [
        _apply_pii(policy, t, result.hits, field_name, budget, folds) for t in result.texts
    ]


def _covered(found: Mapping[str, Sequence[pii.Span]]) -> int:
    """Returns how many characters the detectors found, all actions together."""
    return sum(span.end - span.start for spans in found.values() for span in spans)


def _apply_pii(
    policy: Policy,
    text: str,
    hits: list[Hit],
    field_name: str,
    budget: _Budget,
    folds: dict[str, str],
) -> str:
    if not policy.pii or not text:
        return text
    budget.left()  # the detectors are linear: one text (at most 100 K chars) costs < 0.1 s
    detectors = {action: [d for d, a in policy.pii.items() if a == action] for action in ACTIONS}

    # Each action's detectors on their own: where spans overlap one detector names
    # them (pii.find), and a flagged detector's span that outranked a blocked or
    # redacted one's let that text through.
    def find_each(text: str) -> dict[str, list[pii.Span]]:
        return {action: pii.find(text, detectors[action]) for action in (BLOCK, REDACT, FLAG)}

    found = find_each(text)
    blocked = found[BLOCK]
    seen = readable(text)
    if seen != text:
        # "jane.doe@exa\u200bmple.com" or fullwidth letters hid an address from the
        # detectors, not from the model: read without invisible characters (NFKC),
        # and sent so, redacted, where that shows more (else the text is sent as it
        # came: a ZWJ joins emoji, a ZWNJ spells Persian).
        unhidden = find_each(seen)
        blocked = blocked or unhidden[BLOCK]  # either reading's block stands
        if _covered(unhidden) > _covered(found):
            text, found = seen, unhidden
    bare = _fold(text, folds)
    if not blocked and bare != text:  # an accented spelling
        blocked = pii.find(bare, detectors[BLOCK])
    if blocked:
        detector = min(s.detector for s in blocked)
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
    never sent, not even its first character (for a rule with a look-ahead,
    LOOKAHEAD_CHARS fewer: it is judged once that many characters follow its
    match). A longer match, up to MAX_MATCH_CHARS, is caught late: within
    LONG_SCAN_CHARS of its end, when its start may have been sent. A longer
    one may be missed.

    Each scan reads a window: the held text and, before it, as much released
    text as the rule's longest match (its `reach`: at most MAX_MATCH_CHARS and
    two LONG_SCAN_CHARS of slack) plus LOOKBEHIND_CHARS; every scan but one per
    LONG_SCAN_CHARS reads only `hold_back` released characters (the shorter
    matches). The window's edges are not the text's:

    - its start: a match must begin LOOKBEHIND_CHARS into it (unless the
      window starts where the output does), so \\b, ^ and look-behinds read
      the text before ("kill" cut out of "skills" is no word of its own);
    - its end, while the stream runs: a match ending within two characters of
      it counts only if it still matches with a letter, a space or a newline
      next (\\b or $ judged at the end of the text generated so far: "kill" of
      "killer" cut after "kill"); a rule with a look-ahead waits until
      LOOKAHEAD_CHARS follow the match. At `flush` the end is the text's.

    NOTE(speed): the filter scans only when it is about to release, at most
    once per `step` characters. Rules that can be searched as one alternation
    without changing what they match are (`_units`), in two groups: rules
    whose matches fit in `hold_back` read a window of ~170 characters, longer
    or unbounded ones (`\\S+`, `.{0,150}`) the same and, once per
    LONG_SCAN_CHARS, one of up to ~1.3 K. A scan costs O(window) whatever the
    output's length: no scan reads the whole output.

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
        self.units = _units(tuple(pattern.pattern for _, _, pattern, _ in self.rules), hold_back)
        self._short_reach = LOOKBEHIND_CHARS + hold_back
        self._context_chars = max((unit.reach for unit in self.units), default=0)
        self._released_tail = ""  # the last _context_chars released characters
        self._released_chars = 0
        self._long_scan_at = 0  # characters generated at the last scan with every reach
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
        self.match = self._scan(final=False)
        if self.match is not None:
            return []
        released: list[T] = []
        while self._held and self._held_chars - len(self._held[0][0]) >= self.hold_back:
            released.append(self._release())
        return released

    def flush(self, unsent: str = "") -> list[T]:
        """Returns every held item once a last scan finds nothing (the choice ended).

        `unsent`: text past the answer's end that the last item's tokens carry (a stop
        sequence cut it off; generation.Delta.unsent): judged with the rest, never
        released. (A stop sequence that was a banned word's start let the rest of it
        out in the token's id and log-prob.)
        """
        if self.match is None and (self._held or unsent):
            self._held_chars += len(unsent)
            self._held.append((unsent, cast(T, None)))
            try:
                self.match = self._scan(final=True)
            finally:
                self._held.pop()
                self._held_chars -= len(unsent)
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
        self._released_chars += len(text)
        if self._context_chars:  # [-0:] would keep everything
            self._released_tail = (self._released_tail + text)[-self._context_chars :]
        self.released_text.append(text)
        return item

    def _scan(self, *, final: bool) -> OutputMatch | None:
        if not self.rules:
            return None
        held = "".join(t for t, _ in self._held)
        generated = self._released_chars + self._held_chars
        every_reach = final or generated - self._long_scan_at >= LONG_SCAN_CHARS
        if every_reach:
            self._long_scan_at = generated
        for unit in self.units:
            reach = unit.reach if every_reach else min(unit.reach, self._short_reach)
            context = self._released_tail[-reach:]
            # Cut out of a longer output: the first characters are only read (\b, ^).
            start = LOOKBEHIND_CHARS if self._released_chars > len(context) else 0
            found = self._search(unit, context + held, start, final)
            if found is not None:
                policy, rule, _, reason = self.rules[found]
                return OutputMatch(policy.hit(rule, BLOCK, OUTPUT), reason)
        return None

    def _search(self, unit: _Unit, window: str, start: int, final: bool) -> int | None:
        """Returns the index of the rule with a match in `window` that counts, if any."""
        try:
            match = unit.pattern.search(window, start, timeout=REGEX_TIMEOUT_S)
            for _ in range(_UNSETTLED_TRIES):
                if match is None:
                    return None
                rule = self._rule_at(unit, window, match.start())
                if final or self._settled(rule, unit.looks_ahead, window, match):
                    return rule
                # This one waits for more text; another (starting later) may count now.
                match = unit.pattern.search(window, match.start() + 1, timeout=REGEX_TIMEOUT_S)
            return None
        except TimeoutError:
            return self._slow(unit, window, start)

    def _rule_at(self, unit: _Unit, window: str, at: int) -> int:
        """Returns the rule of `unit` whose match starts at `at` (the alternative taken)."""
        for rule in unit.rules[:-1]:
            if self.rules[rule][2].match(window, at, timeout=REGEX_TIMEOUT_S) is not None:
                return rule
        return unit.rules[-1]

    def _settled(self, rule: int, looks_ahead: bool, window: str, match: Any) -> bool:
        """Tells whether a match mid-stream stands whatever is generated next."""
        if match.end() + (LOOKAHEAD_CHARS if looks_ahead else _END_READ_CHARS) <= len(window):
            return True  # what it read past its end is real text
        if looks_ahead:
            return False
        pattern = self.rules[rule][2]
        return all(
            pattern.match(window + probe, match.start(), timeout=REGEX_TIMEOUT_S) is not None
            for probe in _PROBES
        )

    def _slow(self, unit: _Unit, window: str, start: int) -> int | None:
        """A search out of time: each rule alone; one too slow to decide stops (fail closed)."""
        if len(unit.rules) == 1:
            return unit.rules[0]
        for rule in unit.rules:
            if _search_from(self.rules[rule][2], window, start):
                return rule
        return None


# Without a look-ahead, a match reads at most two characters past its end ($ before a
# final newline); within that of the window's end it is tried with each probe next.
_END_READ_CHARS = 2
_PROBES = ("a", " ", "\n")
# Matches waiting for more text, tried per search, before the scan gives up until the next.
_UNSETTLED_TRIES = 4
# A look-ahead or a conditional (which may hold one) reads text after the match.
_LOOKS_AHEAD = regex.compile(r"\(\?(?:[=!(])")
# Leading global flags that mean the same scoped over the whole rule ("(?i)x" is "(?i:x)").
_LEADING_FLAGS = regex.compile(r"\(\?([ims]+)\)")
# What an alternation of several rules can change the meaning of: group numbers
# (back-references \\1 \\g<1> \\k<n> (?P=n), subroutine calls (?1) (?R) (?&n) (?P>n),
# branch resets) and flags that are not scoped ((?x), (?a), (?V1)...). Conservative:
# every "(?" but a plain, look-around, atomic, named or scoped-flags group.
_NOT_COMBINABLE = regex.compile(r"\\[1-9gk]|\(\?(?![:=!>]|<[=!]|P?<\w+>|[ims]+(?:-[ims]+)?:)")


def _search_from(pattern: Any, text: str, start: int) -> bool:
    try:
        return pattern.search(text, start, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        return True  # fail closed


@dataclass(frozen=True)
class _Unit:
    """_Unit is one search of a scan: one output rule, or several as one alternation."""

    pattern: Any
    rules: tuple[int, ...]  # indexes into OutputFilter.rules, in order
    reach: int  # released characters read before the held ones
    looks_ahead: bool


def _combinable(pattern: str) -> str | None:
    """Returns `pattern` as one branch of an alternation (None: it must stay alone)."""
    flags = _LEADING_FLAGS.match(pattern)
    body = pattern[flags.end() :] if flags else pattern
    if _NOT_COMBINABLE.search(body):
        return None
    return f"(?{flags.group(1)}:{body})" if flags else body


@functools.lru_cache(maxsize=1024)
def _units(patterns: tuple[str, ...], short: int) -> tuple[_Unit, ...]:
    """Returns the searches that cover `patterns`, in rule order.

    Rules that can share an alternation do, one per (fits in `short`, has a
    look-ahead); the others (a back-reference, a subroutine call: the
    alternation renumbers groups; a global flag) are searched alone. A rule
    that cannot be combined still applies: it was skipped when the shared
    search found nothing. Cached: one filter per choice of every request asks
    (~1 ms for 32 rules).
    """
    units: list[_Unit] = []
    groups: dict[tuple[bool, bool], list[tuple[int, str, int]]] = {}
    for index, text in enumerate(patterns):
        pattern = _compile(text)
        longest = min(widths(text)[1], MAX_MATCH_CHARS)
        looks_ahead = _LOOKS_AHEAD.search(text) is not None
        # A long match is looked for once per LONG_SCAN_CHARS, and may wait one more
        # scan to settle: the slack keeps its start in the window meanwhile.
        reach = LOOKBEHIND_CHARS + longest + (2 * LONG_SCAN_CHARS if longest > short else 0)
        branch = _combinable(text)
        if branch is None:
            units.append(_Unit(pattern, (index,), reach, looks_ahead))
            continue
        groups.setdefault((longest <= short, looks_ahead), []).append((index, branch, reach))
    for (_, looks_ahead), members in groups.items():
        combined = None
        if len(members) > 1:
            try:
                combined = regex.compile("|".join(f"(?:{branch})" for _, branch, _ in members))
            except regex.error:
                combined = None  # e.g. two rules naming a group alike: each alone
        if combined is None:
            units += [
                _Unit(_compile(patterns[i]), (i,), reach, looks_ahead) for i, _, reach in members
            ]
            continue
        reach = max(r for _, _, r in members)
        units.append(_Unit(combined, tuple(i for i, _, _ in members), reach, looks_ahead))
    return tuple(sorted(units, key=lambda unit: unit.rules[0]))


def refuses_alone(policies: Sequence[Policy], text: str) -> bool:
    """Tells whether an output rule matches `text` on its own (a top_logprobs
    alternative: a token the answer did not take, sent beside it unfiltered); a
    search out of time refuses (fail closed)."""
    return any(
        _search_from(pattern, text, 0)
        for policy in policies
        for _, pattern, _ in policy.output_rules
    )


def policy_labels(hits: Iterable[Hit]) -> list[str]:
    """Returns each hit's label, in order, once (for usage events and audit entries)."""
    return list(dict.fromkeys(hit.label for hit in hits))
