"""Slows down credential guessing: too many failures from one source -> 429."""

from __future__ import annotations

import ipaddress
import time
from collections import deque

#: How much of an IPv6 address names one source: a /64 is one subnet, the least an
#: ISP or a cloud hands a customer (who then holds 2^64 addresses to rotate through).
IPV6_SOURCE_PREFIX = 64


def source_of(address: str) -> str:
    """Returns the source whose failures an address counts against: an IPv4 address,
    an IPv6 address's /64 (an IPv4-mapped one is its IPv4 address), or anything else
    as it is (a gRPC peer of an internal caller).

    Counted per exact address, a client with an IPv6 /64 had 2^64 fresh budgets,
    and rotating through them also pushed real offenders out of the table."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


class FailureLimiter:
    """FailureLimiter counts authentication failures per source in a sliding window
    (a source: `source_of` the client's address).

    Args:
        max_failures: failures allowed per source within `window_s`.
        window_s: the window length.
        max_sources: sources tracked at once (oldest are forgotten first).
    """

    def __init__(
        self, max_failures: int = 20, window_s: float = 60.0, max_sources: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_sources = max_sources
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, source: str, now: float) -> deque[float]:
        window = self._failures.get(source)
        if window is None:
            if len(self._failures) >= self.max_sources:
                self._failures.pop(next(iter(self._failures)))
            # Only the last max_failures count (whether they fit in the window): a
            # flood of failures from one source kept every one (200,000 entries).
            window = self._failures[source] = deque(maxlen=self.max_failures)
        while window and now - window[0] > self.window_s:
            window.popleft()
        return window

    def retry_after(self, source: str) -> float | None:
        """Returns seconds to wait when `source` is over the limit, else None."""
        now = time.monotonic()
        window = self._recent(source_of(source), now)
        if len(window) < self.max_failures:
            return None
        return max(0.0, self.window_s - (now - window[0]))

    def record(self, source: str) -> None:
        """Counts one failure from `source`."""
        self._recent(source_of(source), time.monotonic()).append(time.monotonic())
