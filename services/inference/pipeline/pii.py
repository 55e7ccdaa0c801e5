"""PII and secret detectors: spans of text, checked beyond their shape, and redaction.

Each detector is a compiled pattern for the candidate's shape plus a check
of what the shape cannot tell (Luhn for cards, mod-97 for IBANs, octet
ranges for IPv4, `ipaddress` for IPv6, the JOSE header of a JWT, SSA rules
for SSNs). `find(text, detectors)` returns non-overlapping spans; `redact`
replaces each with its typed placeholder (`[EMAIL]`, `[CARD]`, ...).

Scope and decisions (tests/data/pii_corpus.jsonl holds the labelled cases):

- email: local@domain.tld, letters of any script in the local part and the
  labels (müller@bücher.de, RFC 6531); a "domain" whose last label is an
  image file extension (icon@2x.png) is a file name, not an address.
- phone: international numbers written with a leading "+" (8-15 digits),
  and North-American numbers with separators ("(555) 123-4567",
  "555-123-4567", "555.123.4567"). Bare digit runs are not phones: they are
  order numbers, ids and amounts far more often.
- card: 13-19 digits (single spaces or dashes between groups allowed) that
  pass the Luhn check and start like a payment card (2-6). A run of digit
  groups that fails as a whole is tried without up to two groups at either
  end: "4111 1111 1111 1111 12/26" (expiry) and "... 1111 123" (CVV) are a
  card followed by another number.
- iban: country code, check digits and 11-30 characters (groups of four may
  be separated by one space) whose mod-97 is 1.
- ssn: AAA-GG-SSSS with the SSA's never-issued areas (000, 666, 9xx), group
  00 and serial 0000 excluded; undashed nine-digit numbers are not SSNs.
- ip: IPv4 dotted quads with octets 0-255 and no leading zeros, except
  right after "version"/"release"/"v" (1.2.3.4 is then a version); IPv6
  that `ipaddress` accepts with at least three groups (not "a::b", C++ "::").
- secret: our own API keys (`tm_` + 43 URL-safe base64 characters), AWS
  access key ids (AKIA/ASIA...) and `aws_secret_access_key = ...`,
  PEM private-key blocks, JWTs (a header that decodes to JSON with "alg"),
  GitHub tokens (ghp_...), webhook signing secrets (`whsec_` + base64, ours
  and the Standard Webhooks ones).

Cost is linear in the text's length (tests/unit/test_pii.py holds crafted
inputs to that): every repetition is bounded, a pattern that could split
digits several ways (international phones) is possessive, so a failed
candidate is given up rather than re-split, and a PEM block's END marker is
found once per text (`str.find`), not searched for again after each header.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

EMAIL = "email"
PHONE = "phone"
CARD = "card"
IBAN = "iban"
SSN = "ssn"
IP = "ip"
SECRET = "secret"
#: Detector names, as policies and the CLI name them.
DETECTORS: tuple[str, ...] = (EMAIL, PHONE, CARD, IBAN, SSN, IP, SECRET)
#: The placeholder each detector's spans are replaced with.
PLACEHOLDERS: dict[str, str] = {name: f"[{name.upper()}]" for name in DETECTORS}
# When two detectors claim overlapping text the more specific wins (a card
# number also looks like a phone number; a JWT may contain an email).
_PRIORITY = {SECRET: 0, CARD: 1, IBAN: 2, SSN: 3, EMAIL: 4, IP: 5, PHONE: 6}


@dataclass(frozen=True, order=True)
class Span:
    """Span is text one detector found: `text[start:end]`."""

    start: int
    end: int
    detector: str


def luhn_valid(digits: str) -> bool:
    """Tells whether a digit string passes the Luhn check."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    """Tells whether an IBAN without spaces has mod-97 == 1 (ISO 13616)."""
    if not 15 <= len(compact) <= 34:
        return False
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


# IBAN lengths of common countries (others: 15-34 and mod-97).
_IBAN_LENGTHS = {
    "AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18,
    "FR": 27, "GB": 22, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28,
    "PT": 25, "SE": 24,
}  # fmt: skip

# NOTE(speed): every pattern starts with a character class or a literal, and a
# look-behind comes after that first character (`\d(?<![\d-]\d)` rather than
# `(?<![\d-])\d`): sre then skips to candidate characters in C instead of trying
# the look-behind at every position (5-10x faster on prose). Email and IPv6 are
# searched in windows around their "@" and ":" only.
# `[^\W_]` is a letter or digit of any script: an ASCII-only local part left
# "müller@firma.de" whole (no start inside a word is allowed).
_EMAIL = re.compile(
    r"[^\W_](?<![\w.%+-][^\W_])[\w.%+-]{0,63}@"
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.){1,8}([^\W\d_]{2,24})(?![\w-])"
)
_EMAIL_WINDOW = (65, 600)  # characters before and after an "@" an address can span
_FILE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp"})
# Possessive (`\d{1,4}+`, `{2,6}+`): "+1" and 18 digits followed by a letter was
# re-split into 2-6 groups of 1-4 digits thousands of ways before failing (0.6 s
# per 100 K characters); a number is written one way, so one split is tried.
_PHONE_INTL = re.compile(r"\+(?<![\w+]\+)[1-9](?:[ .-]?(?:\(\d{1,4}+\)|\d{1,4}+)){2,6}+(?![\w])")
_PHONE_NANP = re.compile(
    r"[(\d](?<![\w.+-][(\d])(?:(?<=\()\d{3}\) ?|(?<=\d)\d{2}[-. ])\d{3}[-. ]\d{4}(?![\w-]|\.\d)"
)
# Up to 25 digits: a card with an expiry or CVV group written next to it is one
# candidate, split by `_card_within`.
_CARD = re.compile(r"\d(?<![\d-]\d)(?:[ -]?\d){12,24}(?![\d]|-\d)")
_DIGIT_GROUP = re.compile(r"\d+")
_CARD_EXTRA_GROUPS = 2  # groups a card candidate may lose at either end
_IBAN = re.compile(
    r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
    r"(?![A-Za-z0-9])"
)
_SSN = re.compile(r"(\d(?<![\d-]\d)\d{2})-(\d{2})-(\d{4})(?![\d-])")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![\w]|\.\d)")
_VERSION_CONTEXT = re.compile(r"(?:\bversion|\brelease|\bver\.?|\bv)\s*$", re.IGNORECASE)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:.])"
)
_IPV6_HINT = re.compile(r"::|:[0-9A-Fa-f]{1,4}:")
_IPV6_WINDOW = 48  # characters either side of a hint an address can span
_SECRETS = (
    re.compile(r"tm_(?<![\w-]tm_)[A-Za-z0-9_-]{40,61}(?![\w-])"),
    re.compile(r"A(?<![A-Z0-9]A)(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
    re.compile(
        r"(?i:aws_secret_access_key)[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"
    ),
    re.compile(r"gh[pousr]_(?<![\w-]gh[pousr]_)[A-Za-z0-9]{36}(?![\w])"),
    re.compile(r"whsec_(?<![\w-]whsec_)[A-Za-z0-9+/]{24,88}={0,2}(?![A-Za-z0-9+/=])"),
)
# A PEM private key: its header, then up to _PEM_BODY_CHARS to its END marker, or
# (no END in reach) the base64 body that follows. `_pem_blocks` finds the END
# markers once: a lazy scan for one after every header cost 16 K steps per header.
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----")
_PEM_BODY = re.compile(r"[A-Za-z0-9+/=\s]{0,16384}")
_PEM_BODY_CHARS = 16384
_JWT = re.compile(
    r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]{5,2048}\.[A-Za-z0-9_-]{2,8192}\.[A-Za-z0-9_-]{0,2048}(?![\w-])"
)


def _windows(text: str, hints: Iterable[int], before: int, after: int) -> Iterable[tuple[int, int]]:
    """Returns merged [start, end) windows around hint positions."""
    current: tuple[int, int] | None = None
    for at in hints:
        start, end = max(0, at - before), min(len(text), at + after)
        if current is not None and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current is not None:
            yield current
        current = (start, end)
    if current is not None:
        yield current


def _positions(text: str, needle: str) -> Iterable[int]:
    at = text.find(needle)
    while at >= 0:
        yield at
        at = text.find(needle, at + 1)


def _emails(text: str) -> Iterable[tuple[int, int]]:
    if "@" not in text:
        return
    for start, end in _windows(text, _positions(text, "@"), *_EMAIL_WINDOW):
        # Look-behinds see the text before `start`; `end` lies past the longest address.
        for match in _EMAIL.finditer(text, start, end):
            if match.group(1).lower() not in _FILE_EXTENSIONS:
                yield match.span()


def _phones(text: str) -> Iterable[tuple[int, int]]:
    for match in _PHONE_INTL.finditer(text):
        if 8 <= sum(c.isdigit() for c in match.group()) <= 15:
            yield match.span()
    for match in _PHONE_NANP.finditer(text):
        yield match.span()


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for match in _CARD.finditer(text):
        raw = match.group()
        if raw.isdigit():  # one group: nothing to split
            if _is_card(raw):
                yield match.span()
            continue
        found = _card_within(raw)
        if found is not None:
            yield match.start() + found[0], match.start() + found[1]


def _card_grouping(sizes: Sequence[int]) -> bool:
    """Tells whether digit groups of these sizes are printed like a card number."""
    return len(sizes) == 1 or tuple(sizes) in _CARD_GROUPINGS


# 4-4-4-1 (13 digits), 4-4-4-4, 4-4-4-4-3 (19), 4-6-5 (Amex), 4-6-4 (Diners).
_CARD_GROUPINGS = frozenset({(4, 4, 4, 1), (4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4)})


def _is_card(digits: str) -> bool:
    return digits[0] in "23456" and 13 <= len(digits) <= 19 and luhn_valid(digits)


def _card_within(raw: str) -> tuple[int, int] | None:
    """Returns the span of the card in a candidate run of digit groups, if any.

    The whole run first; then runs without up to _CARD_EXTRA_GROUPS groups at
    either end, grouped the way cards are printed, the most digits first (then
    the leftmost): greedy, the run took the expiry after a card ("4111 1111
    1111 1111 12/26"), failed Luhn, and the card itself was never tried. At
    most 8 more Luhn checks per run; each is a 1-in-10 chance of taking random
    digits for a card, hence the grouping rule (random groups of three are
    tried whole only, as before).
    """
    groups = [m.span() for m in _DIGIT_GROUP.finditer(raw)]
    runs = [
        (start, len(groups) - end)
        for start in range(min(_CARD_EXTRA_GROUPS, len(groups) - 1) + 1)
        for end in range(min(_CARD_EXTRA_GROUPS, len(groups) - 1 - start) + 1)
    ]
    candidates = []
    for first, last in runs:
        sizes = [end - start for start, end in groups[first:last]]
        if (first, last) != (0, len(groups)) and not _card_grouping(sizes):
            continue
        span = (groups[first][0], groups[last - 1][1])
        digits = raw[span[0] : span[1]].replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19:
            candidates.append((-len(digits), span[0], span, digits))
    for _, _, span, digits in sorted(candidates):
        if _is_card(digits):
            return span
    return None


def _ibans(text: str) -> Iterable[tuple[int, int]]:
    for match in _IBAN.finditer(text):
        if iban_valid(match.group().replace(" ", "")):
            yield match.span()


def _ssns(text: str) -> Iterable[tuple[int, int]]:
    if "-" not in text:
        return
    for match in _SSN.finditer(text):
        area, group, serial = match.groups()
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        yield match.span()


def _ipv4_valid(candidate: str) -> bool:
    return all(
        int(octet) <= 255 and (octet == "0" or not octet.startswith("0"))
        for octet in candidate.split(".")
    )


def _ips(text: str) -> Iterable[tuple[int, int]]:
    if "." in text:
        for match in _IPV4.finditer(text):
            before = text[max(0, match.start() - 12) : match.start()]
            if _ipv4_valid(match.group()) and not _VERSION_CONTEXT.search(before):
                yield match.span()
    hints = (m.start() for m in _IPV6_HINT.finditer(text)) if ":" in text else ()
    seen: set[tuple[int, int]] = set()
    for start, end in _windows(text, hints, _IPV6_WINDOW, _IPV6_WINDOW):
        for match in _IPV6.finditer(text, start, end):
            if match.span() in seen:
                continue
            seen.add(match.span())
            candidate = match.group()
            groups = [g for g in candidate.split(":") if g]
            if len(groups) < 3 and "." not in candidate:
                continue
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            yield match.span()


def _jwt_header_valid(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError, RecursionError):  # too deep: no JWT header
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _pem_blocks(text: str) -> Iterable[tuple[int, int]]:
    """Yields each PEM private-key block: header to END marker, or header and body."""
    ends = [(m.start(), m.end()) for m in _PEM_END.finditer(text)]
    position, next_end = 0, 0
    for header in _PEM_BEGIN.finditer(text):
        if header.start() < position:
            continue  # inside the block before it
        while next_end < len(ends) and ends[next_end][0] < header.end():
            next_end += 1
        if next_end < len(ends) and ends[next_end][0] - header.end() <= _PEM_BODY_CHARS:
            position = ends[next_end][1]
        else:
            body = _PEM_BODY.match(text, header.end())
            position = body.end() if body is not None else header.end()
        yield header.start(), position


def _secrets(text: str) -> Iterable[tuple[int, int]]:
    if "-----BEGIN " in text:
        yield from _pem_blocks(text)
    for needles, pattern in _GATED_SECRETS:
        if any(n in text for n in needles):
            for match in pattern.finditer(text):
                yield match.span()
    if "_access_key" in text or "_ACCESS_KEY" in text:
        for match in _AWS_SECRET.finditer(text):
            yield match.span()
    if "eyJ" in text:
        for match in _JWT.finditer(text):
            if _jwt_header_valid(match.group()):
                yield match.span()


# Each secret pattern runs only on text holding one of its literal parts.
_GATED_SECRETS = (
    (("tm_",), _SECRETS[0]),
    (("AKIA", "ASIA", "ABIA", "ACCA"), _SECRETS[1]),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), _SECRETS[3]),
    (("whsec_",), _SECRETS[4]),
)
_AWS_SECRET = _SECRETS[2]


_FINDERS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    EMAIL: _emails,
    PHONE: _phones,
    CARD: _cards,
    IBAN: _ibans,
    SSN: _ssns,
    IP: _ips,
    SECRET: _secrets,
}


def check_detectors(names: Iterable[str]) -> list[str]:
    """Returns the names that are not detectors (empty: all known)."""
    return [name for name in names if name not in _FINDERS]


def find(text: str, detectors: Sequence[str] = DETECTORS) -> list[Span]:
    """Returns the non-overlapping spans `detectors` find in `text`, in order.

    Overlapping spans become one span over both: the more specific detector
    names it (secret, card, iban, ssn, email, ip, phone), then the longer
    span's. The union, not the winner's own extent: a secret key used as an
    email's local part was redacted as "[SECRET]@example.com".
    """
    candidates = [
        Span(start, end, name) for name in detectors for start, end in _FINDERS[name](text)
    ]
    # One sweep by start: a span overlapping the last kept one replaces it when it
    # ranks higher (more specific detector, then longer); O(n log n).
    candidates.sort(key=lambda s: (s.start, _PRIORITY[s.detector], s.start - s.end))
    chosen: list[Span] = []
    for span in candidates:
        if chosen and span.start < chosen[-1].end:
            last = chosen[-1]
            wins = (_PRIORITY[span.detector], span.start - span.end) < (
                _PRIORITY[last.detector],
                last.start - last.end,
            )
            detector = span.detector if wins else last.detector
            chosen[-1] = Span(last.start, max(last.end, span.end), detector)
            continue
        chosen.append(span)
    return chosen


def redact(text: str, spans: Sequence[Span]) -> str:
    """Returns `text` with every span replaced by its detector's placeholder."""
    if not spans:
        return text
    parts: list[str] = []
    position = 0
    for span in sorted(spans):
        parts.append(text[position : span.start])
        parts.append(PLACEHOLDERS[span.detector])
        position = span.end
    parts.append(text[position:])
    return "".join(parts)
