"""mTLS credentials and authorization by component identity.

Servers require a client certificate from the mesh CA and learn the caller's
identity from its SPIFFE id (`services.core.pki`). `Authorizer` enforces
`services.core.contract.CALLER_RULES` on every RPC, inside the server's one
boundary interceptor:

- an RPC with no rule, or a caller the rule does not name: PERMISSION_DENIED
  naming the rule;
- edge-only headers (`x-tokenmesh-*`) from any caller but the edge:
  PERMISSION_DENIED, so nobody inside can forge a tenant, key or scope;
- registry RPCs: a worker may only name its own IP address (the connection's
  source; never a name from the certificate every worker shares).

Clients verify the server's identity too: each leaf carries the DNS name
`<identity>.tokenmesh.local`, and `secure_channel` checks it through the
TLS target name, whatever address the channel dials.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from collections.abc import Collection, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pool

from services.core import contract, pki, telemetry
from services.core.errors import PermissionDenied
from services.core.metadata import request_metadata
from services.core.pki import IdentityFiles

logger = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


def server_credentials(files: IdentityFiles) -> grpc.ServerCredentials:
    """Returns server credentials that require a mesh client certificate.

    The certificate and key are re-read whenever their files change (checked
    at each new connection), so a rotated leaf is served without a restart.
    """
    loaded = [files.version()]

    def configuration() -> Any:
        ca, cert, key = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> Any:
        try:
            version = files.version()
            if version == loaded[0]:
                return None  # unchanged: keep the current configuration
            config = configuration()
        except (OSError, ValueError):
            logger.exception("could not reload the certificate in %s", files.cert)
            return None
        loaded[0] = version
        logger.info("reloaded the certificate %s", files.cert)
        return config

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=True
    )


def server_name(identity: str) -> str:
    """Returns the DNS name a component's certificate carries: `<identity>.tokenmesh.local`."""
    return f"{identity}.{pki.TRUST_DOMAIN}"


def channel_credentials(files: IdentityFiles) -> grpc.ChannelCredentials:
    """Returns client credentials presenting `files`' certificate, trusting the mesh CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(ca, key, cert)


def channel_options(peer: str) -> list[tuple[str, Any]]:
    """Returns the option that makes a channel verify it reached `peer`'s identity."""
    return [("grpc.ssl_target_name_override", server_name(peer))]


def secure_channel(
    target: str, files: IdentityFiles, peer: str, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """Returns an mTLS grpc.aio channel to the component `peer` at `target`."""
    return grpc.aio.secure_channel(
        target,
        channel_credentials(files),
        options=[*channel_options(peer), *options],
        interceptors=telemetry.client_interceptors(),
    )


def blocking_channel(target: str, files: IdentityFiles, peer: str) -> grpc.Channel:
    """Returns a blocking mTLS channel to the component `peer` (CLI, launcher, tests)."""
    return grpc.secure_channel(target, channel_credentials(files), channel_options(peer))


def peer_identity(context: Context) -> str | None:
    """Returns the caller's component identity from its verified certificate, else None."""
    for name in context.peer_identities() or ():
        identity = pki.identity_of(name.decode(errors="replace"))
        if identity is not None:
            return identity
    return None


def peer_hosts(context: Context) -> frozenset[str]:
    """Returns the hosts the caller may act for: the connection's source IP address alone.

    Not its certificate's names: every worker shares one certificate, whose
    DNS names (the workers' Service name, `localhost`, ...) and SPIFFE id say
    nothing about which pod is calling; a worker vouching for one could speak
    for the address the router resolves it to, another pod's. Empty when the
    peer is not an IP connection (then no host is the caller's).
    """
    host = _ip(_peer_host(context.peer()))
    return frozenset() if host is None else frozenset({host})


def _peer_host(peer: str) -> str:
    """Returns the host of a gRPC peer string: "ipv4:10.0.0.5:5000" -> "10.0.0.5";
    "ipv6:%5B::1%5D:5000" (grpc percent-encodes the brackets) -> "::1"."""
    address = urllib.parse.unquote(peer.split(":", 1)[-1])
    return address.rsplit(":", 1)[0].strip("[]")


def _ip(host: str) -> str | None:
    """Returns `host` as a canonical IP address string (an IPv4-mapped IPv6 address as
    its IPv4 one), or None when it is not an IP address (a DNS name)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class Authorizer:
    """Authorizer enforces the contract's caller rules on one server.

    Args:
        plaintext_identity: the identity a caller on a plaintext connection is
            given (a server without a PKI: benchmarks and development only).
            None: such callers have no identity, and only `anyone` rules admit them.
    """

    def __init__(self, plaintext_identity: str | None = None) -> None:
        self.plaintext_identity = plaintext_identity

    def check_registered(self, services: Sequence[str]) -> None:
        """Raises ValueError naming any method of `services` the contract has no rule for."""
        missing = [m for m in service_methods(services) if contract.caller_rule(m) is None]
        if missing:
            raise ValueError(f"no caller rule in services.core.contract for {', '.join(missing)}")

    def authorize(self, method: str, context: Context, request: Any = None) -> None:
        """Raises PermissionDenied unless the caller may make this call."""
        rule = contract.caller_rule(method)
        rpc = method.lstrip("/")
        if rule is None:
            raise PermissionDenied(f"{rpc} is not open to any caller", reason="NO_CALLER_RULE")
        identity = self._identity(context)
        headers = _edge_headers(context)
        delegated = identity in rule.delegates and identity != contract.EDGE
        if identity != contract.EDGE and headers and not delegated:
            raise PermissionDenied(
                f"x-tokenmesh-* headers are accepted only from the edge (got {headers[0]})",
                reason="EDGE_HEADERS_FROM_NON_EDGE",
            )
        if not self._allowed(rule, identity, context):
            raise PermissionDenied(f"{rpc} {rule.describe()}", reason="CALLER_NOT_ALLOWED")
        if delegated:
            check_delegated(rpc, rule, headers, context, request)
        if rule.own_address and request is not None:
            self._check_own_address(rpc, request, context)

    def _identity(self, context: Context) -> str | None:
        if context.peer_identities() is None:  # no TLS on this connection
            return self.plaintext_identity
        return peer_identity(context)

    @staticmethod
    def _allowed(rule: contract.CallerRule, identity: str | None, context: Context) -> bool:
        # A worker pool's identity (worker-<pool>) acts as a worker.
        if rule.anyone or contract.role_of(identity) in rule.identities:
            return True
        if identity == contract.EDGE and rule.edge_for_admin:
            return contract.ADMIN_SCOPE in _header(context, contract.SCOPES_HEADER).split()
        return False

    @staticmethod
    def _check_own_address(rpc: str, request: Any, context: Context) -> None:
        address = str(getattr(request, "address", "") or "")
        if address:  # RenewLease names a worker id; the registry checks it is registered
            require_own_host(rpc, address, context)


def check_delegated(
    rpc: str, rule: contract.CallerRule, headers: Sequence[str], context: Context, request: Any
) -> None:
    """Raises PermissionDenied unless a delegate's call (the jobs service acting for a
    job's owner) stays within what the owner's key may do (see CallerRule.delegates).

    It must name the key (x-tokenmesh-key-id), send only identity headers and
    its item's replay bound (contract.DELEGATED_HEADERS: no routing or other
    edge-only ones), hold the RPC's scope among the vouched scopes, and ask for
    the rule's priority.
    """
    allowed = set(contract.DELEGATED_HEADERS)
    extra = [name for name in headers if name.lower() not in allowed]
    if extra:
        raise PermissionDenied(
            f"{rpc}: a delegated call may carry only identity headers (got {extra[0]})",
            reason="DELEGATED_HEADER_NOT_ALLOWED",
        )
    if not _header(context, contract.KEY_ID_HEADER):
        raise PermissionDenied(
            f"{rpc}: a delegated call must name the key it acts for",
            reason="DELEGATED_CALL_WITHOUT_KEY",
        )
    scopes = _header(context, contract.SCOPES_HEADER).split()
    if rule.delegated_scope not in scopes and contract.ADMIN_SCOPE not in scopes:
        raise PermissionDenied(
            f"{rpc}: the key lacks the scope {rule.delegated_scope!r}",
            reason="MISSING_SCOPE",
            metadata={"scope": rule.delegated_scope},
        )
    if rule.delegated_priority and _priority_name(request) not in (None, rule.delegated_priority):
        raise PermissionDenied(
            f"{rpc}: a delegated call must ask for {rule.delegated_priority}",
            reason="DELEGATED_PRIORITY",
        )


def _priority_name(request: Any) -> str | None:
    """Returns the name of a request's `priority` enum value (None: it has no such field)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    field = descriptor.fields_by_name.get("priority") if descriptor is not None else None
    if field is None or field.enum_type is None:
        return None
    value = field.enum_type.values_by_number.get(request.priority)
    return value.name if value is not None else ""


def require_own_host(rpc: str, address: str, context: Context) -> None:
    """Raises PermissionDenied unless `address` (host:port) is on the caller's own host."""
    require_host_among(rpc, address, peer_hosts(context))


def require_host_among(rpc: str, address: str, hosts: Collection[str]) -> None:
    """Raises PermissionDenied unless the host of `address` (host:port) is an IP address
    among `hosts` (the caller's, from `peer_hosts`).

    A DNS name is refused even when it would resolve to the caller: a shared
    name (a headless Service) resolves to other pods as well, and the router
    routes to whichever address it resolves first. Workers register an IP
    (`TOKENMESH_ADVERTISE_HOST`: the pod IP, `auto`, or 127.0.0.1).
    """
    host = _ip(address.rsplit(":", 1)[0].strip("[]"))
    if host is None or host not in {_ip(h) for h in hosts}:
        raise PermissionDenied(
            f"{rpc}: a worker may act only for its own IP address (the connection's source)",
            reason="NOT_OWN_ADDRESS",
        )


def service_methods(services: Sequence[str]) -> list[str]:
    """Returns the full method paths of gRPC services, from the default descriptor pool."""
    pool = descriptor_pool.Default()
    return [
        f"/{service}/{method.name}"
        for service in services
        for method in pool.FindServiceByName(service).methods
    ]


def _edge_headers(context: Context) -> tuple[str, ...]:
    return request_metadata(context).edge_keys


def _header(context: Context, name: str) -> str:
    return request_metadata(context).headers.get(name, "")


class ClientChannel:
    """ClientChannel is a long-lived channel to one component that follows certificate rotation.

    `get()` returns the current channel; once this component's certificate
    files change, it opens a new channel with them (in-flight calls finish on
    the old one, which is closed on `close()`). Without `files`: plaintext.
    `options` are gRPC channel arguments for every channel it opens.
    """

    def __init__(
        self,
        target: str,
        files: IdentityFiles | None,
        peer: str,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.files = files
        self.peer = peer
        self.options = tuple(options)
        self._version = files.version() if files is not None else None
        self._channel = self._open()
        self._old: list[grpc.aio.Channel] = []

    def _open(self) -> grpc.aio.Channel:
        if self.files is None:
            return grpc.aio.insecure_channel(
                self.target, options=self.options, interceptors=telemetry.client_interceptors()
            )
        return secure_channel(self.target, self.files, self.peer, self.options)

    def get(self) -> grpc.aio.Channel:
        """Returns the channel to use now (a new one after a certificate rotation)."""
        if self.files is not None:
            try:
                version = self.files.version()
            except OSError:
                return self._channel  # mid-rotation or gone: keep the current one
            if version != self._version:
                self._version = version
                self._old.append(self._channel)
                self._channel = self._open()
                logger.info("reconnecting to %s with a renewed certificate", self.peer)
        return self._channel

    async def close(self) -> None:
        """Closes the current channel and any replaced ones."""
        for channel in (*self._old, self._channel):
            await channel.close()
        self._old.clear()
