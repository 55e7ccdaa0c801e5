"""PII and secret detectors: spans of text, checked beyond their shape, and redaction.

Each detector is a compiled pattern for the candidate's shape plus a check
of what the shape cannot tell (Luhn for cards, mod-97 for IBANs, octet
ranges for IPv4, `ipaddress` for IPv6, the JOSE header of a JWT, SSA rules
for SSNs). `find(text, detectors)` returns non-overlapping spans; `redact`
replaces each with its typed placeholder (`[EMAIL]`, `[CARD]`, ...).

Scope and decisions (tests/data/pii_corpus.jsonl holds the labelled cases):

- email: local@domain.tld; a "domain" whose last label is an image file
  extension (icon@2x.png) is a file name, not an address.
- phone: international numbers written with a leading "+" (8-15 digits),
  and North-American numbers with separators ("(555) 123-4567",
  "555-123-4567", "555.123.4567"). Bare digit runs are not phones: they are
  order numbers, ids and amounts far more often.
- card: 13-19 digits (single spaces or dashes between groups allowed) that
  pass the Luhn check and start like a payment card (2-6).
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
  GitHub tokens (ghp_...).

Patterns are linear in practice: every repetition is bounded and anchored
by look-arounds, so a candidate is tried at most a few dozen ways.
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
_EMAIL = re.compile(
    r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}([A-Za-z]{2,24})(?![\w-])"
)
_EMAIL_WINDOW = (65, 600)  # characters before and after an "@" an address can span
_FILE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp"})
_PHONE_INTL = re.compile(r"\+(?<![\w+]\+)[1-9](?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}(?![\w])")
_PHONE_NANP = re.compile(
    r"[(\d](?<![\w.+-][(\d])(?:(?<=\()\d{3}\) ?|(?<=\d)\d{2}[-. ])\d{3}[-. ]\d{4}(?![\w-]|\.\d)"
)
_CARD = re.compile(r"\d(?<![\d-]\d)(?:[ -]?\d){12,18}(?![\d]|-\d)")
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
    re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----"
        r"(?:[\s\S]{0,16384}?-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----"
        r"|[A-Za-z0-9+/=\s]{0,16384})"
    ),
    re.compile(r"gh[pousr]_(?<![\w-]gh[pousr]_)[A-Za-z0-9]{36}(?![\w])"),
)
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
        digits = raw.replace(" ", "").replace("-", "")
        if "  " in raw or not 13 <= len(digits) <= 19 or digits[0] not in "23456":
            continue
        if luhn_valid(digits):
            yield match.span()


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


def _secrets(text: str) -> Iterable[tuple[int, int]]:
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
    (("-----BEGIN ",), _SECRETS[3]),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), _SECRETS[4]),
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
