"""A gRPC health probe that speaks the mesh's mTLS, for Kubernetes exec probes.

Kubernetes' built-in `grpc:` probes cannot present a client certificate, and
every tokenmesh server requires one. This probe runs inside the container,
presents the pod's own identity (the files under `TOKENMESH_PKI_DIR`, picked
like the server picks them) and verifies that the server is that identity::

    python -m services.core.probe inference --grpc-service tokenmesh.inference.v1.InferenceService

Exit status: 0 SERVING; 1 anything else (NOT_SERVING, unreachable, TLS
refused), with the reason on stderr (Kubernetes shows it in the pod's
events); 2 invalid configuration. Without `TOKENMESH_PKI_DIR` it probes over
plaintext, like the server serves.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2

from services.core import contract, identity
from services.core.pki import IdentityFiles
from services.core.settings import ServerSettings, SettingsError, load

SERVING = health_pb2.HealthCheckResponse.SERVING
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def peer_identity(service_name: str, settings: ServerSettings) -> str:
    """Returns the identity the server of `service_name` presents (as `server.identity_files`)."""
    return settings.identity or contract.SERVICE_IDENTITY.get(service_name, service_name)


def check(
    address: str, files: IdentityFiles | None, peer: str, service: str, timeout_s: float
) -> int:
    """Asks the server at `address` for the health of `service`; returns its status.

    Args:
        files: the identity to present (None: plaintext).
        peer: the identity the server must prove (its certificate's DNS name).

    Raises:
        grpc.RpcError: the call failed (unreachable, TLS refused, deadline).
    """
    channel = (
        grpc.insecure_channel(address)
        if files is None
        else grpc.secure_channel(
            address, identity.channel_credentials(files), identity.channel_options(peer)
        )
    )
    with channel:
        # NOTE: the method by hand: the grpc_health stubs do not type HealthStub's methods.
        call = channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = call(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return int(response.status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.core.probe")
    parser.add_argument(
        "service", choices=sorted(contract.SERVICE_IDENTITY), help="the service in this pod"
    )
    parser.add_argument("--grpc-service", default="", help='health service name ("": overall)')
    parser.add_argument(
        "--address", default=None, help="host:port (default: 127.0.0.1:$TOKENMESH_GRPC_PORT)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Probes this pod's server; exits 0 when it is SERVING."""
    args = _parser().parse_args(argv)
    try:
        settings = load(ServerSettings, os.environ)
    except SettingsError as exc:
        print(f"tokenmesh-probe: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.address is None and settings.port == 0:
        print("tokenmesh-probe: pass --address or set TOKENMESH_GRPC_PORT", file=sys.stderr)
        raise SystemExit(2)
    address = args.address or f"127.0.0.1:{settings.port}"
    peer = peer_identity(args.service, settings)
    files = None if settings.pki_dir is None else IdentityFiles.of(settings.pki_dir, peer)
    try:
        status = check(address, files, peer, args.grpc_service, args.timeout)
    except grpc.RpcError as exc:
        print(f"tokenmesh-probe: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:  # the identity's files are missing or unreadable
        print(f"tokenmesh-probe: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if status != SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(f"tokenmesh-probe: {address} {args.grpc_service or '(overall)'}: {name}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
