"""Where webhooks may go: https URLs whose every resolved address is public.

A webhook URL is checked when a job is submitted and again before every
delivery attempt (DNS may answer differently by then: rebinding). The
delivery then connects to an address this check vetted, never to a fresh
lookup. Refused: userinfo in the URL, schemes other than https (http only for
allow-listed hosts), and any address that is not globally routable (private,
loopback, link-local, CGNAT, reserved, unspecified), multicast, or a cloud
metadata endpoint. Hosts in TOKENMESH_WEBHOOK_ALLOW_HOSTS may use http and
private or loopback addresses (a receiver on the operator's own network,
tests), never a metadata endpoint, a link-local, multicast or unspecified
address (`is_never_allowed`): the name's DNS answers for it at each attempt,
and a listed name in a zone someone else controls reached 169.254.169.254.

A name that resolves to a forbidden address and one that does not resolve
get the same answer (the difference would map the mesh's internal names for
whoever asks); the detail is logged here. International names are converted
per IDNA 2008 (UTS #46, non-transitional), as browsers and registries do:
"faß.de" is "xn--fa-hia.de", never "fass.de" (IDNA 2003, a different domain).

Names are looked up on threads of this module's own (`SystemResolver`), never
the event loop's default executor: `getaddrinfo` cannot be cancelled, so a
name whose DNS never answers holds its thread until the system's resolver
gives up, whatever the caller's timeout. A bounded pool, a bound per owner
(API key) of lookups in flight, and a caller that stops waiting at its
timeout keep one key's slow names from stalling other keys' checks and
deliveries, or the process's other threaded work (`asyncio.to_thread`,
Redis connections by name). Those threads do not hold up the process's exit:
a lookup still running when it ends is abandoned.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ipaddress
import logging
import queue
import socket
import threading
import urllib.parse
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import idna

from services.core.errors import Unavailable

logger = logging.getLogger(__name__)
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_CHARS = 2048
#: Names looked up at once on this replica (the resolver's threads), all owners.
LOOKUP_THREADS = 16
#: Names one owner (API key) may have looked up at once; its others wait.
LOOKUPS_PER_OWNER = 4
# Metadata endpoints that a global-address check alone would not catch.
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("168.63.129.16"),  # Azure's platform endpoint (public)
    }
)


class RefusedUrl(ValueError):
    """RefusedUrl says why a webhook URL may not be used (client-safe text)."""


class ResolverBusy(Unavailable):
    """ResolverBusy: no lookup slot came free within the timeout (other lookups of
    the same owner, or of every owner, wait on slow names). Retryable: nothing was
    said about the URL itself."""

    reason = "WEBHOOK_RESOLVER_BUSY"


class Lookup(Protocol):
    """Lookup looks a host name up for an owner: its addresses as text, in the
    resolver's order (the system's resolver by default; tests give their own names).

    It returns or raises within `timeout_s`: OSError (no such name), TimeoutError
    (no answer in time) or ResolverBusy (no slot to look it up in).
    """

    def __call__(
        self, host: str, port: int, owner: str, timeout_s: float
    ) -> Awaitable[Sequence[str]]: ...


@dataclass(frozen=True)
class WebhookTarget:
    """WebhookTarget is a parsed webhook URL.

    Attributes:
        url: the URL as given.
        scheme: "https" or "http".
        host: the host name or IP literal, lower-case, without brackets.
        port: the port (443/80 when the URL names none).
        target: the path and query sent in the request line.
        allowed: whether the host is in the allow list (no address check).
    """

    url: str
    scheme: str
    host: str
    port: int
    target: str
    allowed: bool


def parse(url: str, allow_hosts: Collection[str]) -> WebhookTarget:
    """Returns the parsed URL; raises RefusedUrl for a scheme or shape that is not allowed."""
    if len(url) > MAX_URL_CHARS:
        raise RefusedUrl(f"must be at most {MAX_URL_CHARS} characters")
    # A control character or a space: urlsplit drops CR, LF and tab (the URL sent
    # was not the one stored) and keeps the others, which no request can carry
    # (every attempt failed, to the dead letter).
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise RefusedUrl("must not hold spaces or control characters (percent-encode them)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedUrl("is not a valid URL") from None
    host = _ascii_host((parts.hostname or "").lower(), parts.netloc)
    if not host:
        raise RefusedUrl("must name a host")
    if parts.username is not None or parts.password is not None:
        raise RefusedUrl("must not carry credentials")
    allowed = host in {h.lower() for h in allow_hosts}
    if parts.scheme != "https" and not (parts.scheme == "http" and allowed):
        raise RefusedUrl("must be https (http only for hosts in TOKENMESH_WEBHOOK_ALLOW_HOSTS)")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if port == 0:
        raise RefusedUrl("must name a valid port (1-65535)")  # it was sent to 443 instead
    default_port = 443 if parts.scheme == "https" else 80
    return WebhookTarget(
        url, parts.scheme, host, default_port if port is None else port, target, allowed
    )


def _ascii_host(host: str, netloc: str) -> str:
    """Returns `host` as it goes on the wire (IDNA: "bücher.example" is
    "xn--bcher-kva.example"); raises RefusedUrl for a name that has no such form (an
    empty or over-long label, a character IDNA 2008 does not allow). A non-ASCII
    name passed the lookup (which encodes it itself) and then failed every delivery
    in the HTTP client's Host header.

    An ASCII name keeps the checks it had (label lengths: "a_b" stays allowed). A
    non-ASCII one is converted per UTS #46, non-transitional, from the URL's own
    text (`netloc`): Python's "idna" codec is IDNA 2003, which maps "ß" to "ss" and
    "ς" to "σ", and sent "faß.de"'s events to "fass.de", another registrant; and
    lower-casing first made a final "Σ" a "ς", which UTS #46 maps to "σ".
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        if host.isascii():
            return host.encode("idna").decode("ascii")
        return idna.encode(_raw_host(netloc), uts46=True, transitional=False).decode("ascii")
    except UnicodeError:  # idna.IDNAError is one
        raise RefusedUrl("does not name a valid host") from None


def _raw_host(netloc: str) -> str:
    """Returns the host of a URL's netloc as written (urlsplit's `hostname` is
    lower-cased; a non-ASCII host is never an IPv6 literal)."""
    return netloc.rpartition("@")[2].partition(":")[0]


def is_never_allowed(address: IpAddress) -> bool:
    """Tells whether no webhook may connect to `address`, its host allow-listed or not:
    a cloud metadata endpoint, a link-local, multicast or unspecified address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address in METADATA_ADDRESSES
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
    )


def is_forbidden(address: IpAddress) -> bool:
    """Tells whether a webhook may not connect to `address`."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.is_site_local:
            return True  # fec0::/10: deprecated, yet routed inside some sites; "global" here
        elif address.sixtofour is not None and is_forbidden(address.sixtofour):
            # 6to4 (2002::/16) carries an IPv4 address that a host with a 6to4 route
            # reaches: 2002:7f00:1:: was "global" but is 127.0.0.1. (Teredo's 2001::/32
            # is not global already.)
            return True
    return (
        address in METADATA_ADDRESSES
        or address.is_multicast
        or address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


class _LookupThreads:
    """Daemon threads that look names up: at most `count`, started as lookups come.

    A ThreadPoolExecutor's threads are joined at the interpreter's exit (the
    pool's shutdown cannot leave one out), so a lookup whose DNS never answered
    held a stopped jobs process until the system's resolver gave up: tens of
    seconds with search domains, past a pod's grace period into SIGKILL. A
    lookup leaves nothing half done, so these threads are daemons.
    """

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future[list[str]], str, int]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._started = 0

    def submit(self, host: str, port: int) -> concurrent.futures.Future[list[str]]:
        """Looks `host` up on one of the threads; the future has its addresses."""
        work: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        self._work.put((work, host, port))
        with self._lock:
            if self._started < self._count:
                self._started += 1
                name = f"{self._name}_{self._started}"
                threading.Thread(target=self._serve, name=name, daemon=True).start()
        return work

    def _serve(self) -> None:
        while True:
            work, host, port = self._work.get()
            if not work.set_running_or_notify_cancel():
                continue
            try:
                work.set_result(_getaddrinfo(host, port))
            except BaseException as exc:
                # The caller's to see, as an executor hands it on: anything escaping would
                # end this thread and leave the future (and the lookup slot its callback
                # gives back) pending for good.
                work.set_exception(exc)


class SystemResolver:
    """SystemResolver looks names up with the system's resolver (getaddrinfo, TCP) on
    threads of its own: at most `threads` at once, and `per_owner` for one owner.

    A lookup holds its slot until its thread returns, not until its caller stops
    waiting: `getaddrinfo` cannot be cancelled, and a name whose DNS never answers
    held a thread of the loop's default executor (6 on a 2-CPU pod) for as long
    as the system's resolver tried, after `wait_for` had given up. A handful of
    such names from one key made every other key's CreateJob check and delivery
    fail ("does not resolve"), and stalled `asyncio.to_thread` and new Redis
    connections. Now that key's lookups wait for its own slots, and a caller
    stops waiting at its timeout. Owner "" (not named) is bounded by the pool only.
    Thread-safe: a slot is given back on the thread that looked the name up. A
    lookup still running does not hold up the process's exit (daemon threads).

    Args:
        threads: lookups in flight on this replica, all owners together.
        per_owner: lookups in flight for one owner.
    """

    def __init__(self, threads: int = LOOKUP_THREADS, per_owner: int = LOOKUPS_PER_OWNER) -> None:
        self._threads = threads
        self._per_owner = per_owner
        self._lookups = _LookupThreads(threads, "webhook-dns")
        self._lock = threading.Lock()
        self._busy = 0
        self._by_owner: collections.Counter[str] = collections.Counter()
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def in_flight(self) -> int:
        """Lookups whose threads have not returned yet."""
        return self._busy

    async def __call__(self, host: str, port: int, owner: str, timeout_s: float) -> list[str]:
        """Returns the addresses of `host` as text, in the resolver's order.

        Raises:
            ResolverBusy: no slot came free within `timeout_s`.
            TimeoutError: the name did not answer within `timeout_s` (the lookup
                goes on, on its thread, holding its slot).
            OSError: the name does not resolve.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._take(owner)
        except TimeoutError:
            logger.warning("webhook lookup of %r: no free slot (owner %r)", host, owner)
            raise ResolverBusy(
                "webhook_url: its host could not be looked up now; retry", retry_after_s=1.0
            ) from None
        try:
            work = self._lookups.submit(host, port)
        except BaseException:
            self._give(owner)
            raise
        work.add_done_callback(lambda _: self._give(owner))
        async with asyncio.timeout_at(deadline):
            # Cancelled, the wrapper leaves a running lookup alone: it gives its
            # slot back when its thread returns.
            return await asyncio.wrap_future(work)

    async def _take(self, owner: str) -> None:
        """Takes a slot for `owner`, waiting until one is free."""
        loop = asyncio.get_running_loop()
        while (waiter := self._take_or_queue(owner, loop)) is not None:
            try:
                await waiter
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def _take_or_queue(
        self, owner: str, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[None] | None:
        """Takes a slot (None), or returns a future that a slot given back completes
        (checked and queued under one lock: a slot given back in between is seen)."""
        with self._lock:
            owner_full = bool(owner) and self._by_owner[owner] >= self._per_owner
            if self._busy < self._threads and not owner_full:
                self._busy += 1
                self._by_owner[owner] += 1
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            return waiter

    def _give(self, owner: str) -> None:
        """Gives a slot back (on any thread) and wakes every waiter to try again."""
        with self._lock:
            self._busy -= 1
            self._by_owner[owner] -= 1
            if self._by_owner[owner] <= 0:
                del self._by_owner[owner]
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            try:
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)
            except RuntimeError:
                pass  # its loop is closed: nobody waits on it any more


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _getaddrinfo(host: str, port: int) -> list[str]:
    # socket.getaddrinfo looked up at each call: tests stand a slow resolver in for it.
    infos: list[Any] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for *_, sockaddr in infos]


#: The system's resolver, shared by the replica's URL checks and deliveries.
system_lookup = SystemResolver()


async def resolve(
    target: WebhookTarget,
    timeout_s: float = 5.0,
    lookup: Lookup = system_lookup,
    owner: str = "",
) -> list[IpAddress]:
    """Returns the addresses a webhook may connect to, in the resolver's order; raises
    RefusedUrl when any is forbidden.

    Every address the name resolves to must be allowed: a name that answers
    with one public and one private address is refused (an attacker picks
    which one a later lookup returns). The caller connects to these addresses
    only, never to a fresh lookup of the name.

    Args:
        target: the parsed URL.
        timeout_s: how long the caller waits for the name's addresses.
        lookup: the resolver.
        owner: the API key the URL is for: its lookups in flight are bounded.

    Raises:
        RefusedUrl: an address is forbidden, or the name has none (one message
            for both).
        ResolverBusy: no lookup slot came free in time (retryable).
    """
    try:
        literal: IpAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    refused = is_never_allowed if target.allowed else is_forbidden
    if literal is not None:
        if refused(literal):
            raise RefusedUrl(
                f"is {literal} a private, loopback, link-local, multicast or metadata address"
            )
        return [literal]
    addresses = await _lookup(target, timeout_s, lookup, owner)
    for address in addresses:
        if refused(address):
            logger.info("webhook host %r refused: it resolves to %s", target.host, address)
            raise _name_refused(target)
    return addresses


def _name_refused(target: WebhookTarget) -> RefusedUrl:
    """The one answer for a name with a forbidden address and a name with none: the
    two told apart which internal names exist (search domains apply: "redis")."""
    return RefusedUrl(f"host {target.host!r} does not resolve to public addresses only")


async def _lookup(
    target: WebhookTarget, timeout_s: float, lookup: Lookup, owner: str
) -> list[IpAddress]:
    try:
        found = await lookup(target.host, target.port, owner, timeout_s)
        parsed = [ipaddress.ip_address(str(a).split("%", 1)[0]) for a in found]
    except (OSError, TimeoutError, ValueError) as exc:
        logger.info("webhook host %r refused: no address (%s)", target.host, repr(exc))
        raise _name_refused(target) from None
    addresses: list[IpAddress] = []
    for address in parsed:
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        logger.info("webhook host %r refused: no address", target.host)
        raise _name_refused(target)
    return addresses
