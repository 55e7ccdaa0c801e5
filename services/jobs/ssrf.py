"""Where webhooks may go: https URLs whose every resolved address is public.

A webhook URL is checked when a job is submitted and again before every
delivery attempt (DNS may answer differently by then: rebinding). The
delivery then connects to an address this check vetted, never to a fresh
lookup. Refused: userinfo in the URL, schemes other than https (http only for
allow-listed hosts), and any address that is not globally routable (private,
loopback, link-local, CGNAT, reserved, unspecified), multicast, or a cloud
metadata endpoint. Hosts in TOKENMESH_WEBHOOK_ALLOW_HOSTS skip the address
check and may use http (a receiver on the operator's own network, tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Looks a host name up: (host, port) -> its addresses as text, in the resolver's
#: order (the system's resolver by default; tests give their own names).
Lookup = Callable[[str, int], Awaitable[Sequence[str]]]
MAX_URL_CHARS = 2048
# Metadata endpoints that a global-address check alone would not catch.
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)


class RefusedUrl(ValueError):
    """RefusedUrl says why a webhook URL may not be used (client-safe text)."""


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
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedUrl("is not a valid URL") from None
    host = _ascii_host((parts.hostname or "").lower())
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


def _ascii_host(host: str) -> str:
    """Returns `host` as it goes on the wire (IDNA: "bücher.example" is
    "xn--bcher-kva.example"); raises RefusedUrl for a name that has no such form (an
    empty or over-long label). A non-ASCII name passed the lookup (which encodes it
    itself) and then failed every delivery in the HTTP client's Host header."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise RefusedUrl("does not name a valid host") from None


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


async def system_lookup(host: str, port: int) -> list[str]:
    """Returns the addresses the system's resolver gives `host` (getaddrinfo, TCP)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for *_, sockaddr in infos]


async def resolve(
    target: WebhookTarget, timeout_s: float = 5.0, lookup: Lookup = system_lookup
) -> list[IpAddress]:
    """Returns the addresses a webhook may connect to, in the resolver's order; raises
    RefusedUrl when any is forbidden.

    Every address the name resolves to must be allowed: a name that answers
    with one public and one private address is refused (an attacker picks
    which one a later lookup returns). The caller connects to these addresses
    only, never to a fresh lookup of the name.
    """
    try:
        literal: IpAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    addresses = [literal] if literal is not None else await _lookup(target, timeout_s, lookup)
    if not target.allowed:
        for address in addresses:
            if is_forbidden(address):
                # A name's address stays unsaid: the answer would map the mesh's
                # internal names (search domains apply) for whoever asks.
                named = f"is {address}" if literal is not None else "resolves to"
                raise RefusedUrl(
                    f"{named} a private, loopback, link-local, multicast or metadata address"
                )
    return addresses


async def _lookup(target: WebhookTarget, timeout_s: float, lookup: Lookup) -> list[IpAddress]:
    try:
        found = await asyncio.wait_for(lookup(target.host, target.port), timeout_s)
        parsed = [ipaddress.ip_address(str(a).split("%", 1)[0]) for a in found]
    except (OSError, TimeoutError, ValueError):
        raise RefusedUrl(f"host {target.host!r} does not resolve") from None
    addresses: list[IpAddress] = []
    for address in parsed:
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise RefusedUrl(f"host {target.host!r} does not resolve")
    return addresses
