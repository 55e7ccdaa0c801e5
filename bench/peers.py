"""How the benchmarks reach a server: over mTLS as the edge, as a real caller does.

Every service requires a client certificate from the mesh CA and authorizes
by the caller's identity (`services.core.contract.CALLER_RULES`); the callers
of a worker and of the rate limiter are the edge. So every direct call in the
benchmarks presents the edge's certificate from a PKI of the run's own
(`bench_pki`), and the bare grpc.aio baselines serve the same mTLS, so a
ratio against them still measures the service, not the transport. The one
plaintext server is the mTLS-cost scenario's (`bench.mtls`): the same worker
without a PKI, which gives every caller the edge identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from services.core import contract, identity, pki

#: CALLER is the identity every direct call presents: the edge's.
CALLER = contract.EDGE


@dataclass(frozen=True)
class Peer:
    """Peer is one server the benchmarks call: its address and how to reach it.

    Picklable, so the streaming clients' processes get it as it is.
    """

    address: str  # host:port
    identity: str = contract.WORKER  # the identity the server's certificate must carry
    pki_dir: Path | None = None  # None: plaintext (the server trusts every caller as the edge)

    @property
    def tls(self) -> bool:
        """Returns whether calls to this peer use mTLS."""
        return self.pki_dir is not None

    def caller_files(self) -> pki.IdentityFiles:
        """Returns the certificate files the caller presents (the edge's)."""
        if self.pki_dir is None:
            raise ValueError(f"{self.address} is plaintext: no certificate to present")
        return pki.IdentityFiles.of(self.pki_dir, CALLER)

    def aio_channel(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """Returns a grpc.aio channel to the peer (mTLS as the edge when it has a PKI)."""
        if self.pki_dir is None:
            return grpc.aio.insecure_channel(self.address, options=list(options))
        return identity.secure_channel(self.address, self.caller_files(), self.identity, options)

    def channel(self) -> grpc.Channel:
        """Returns a blocking channel to the peer (mTLS as the edge when it has a PKI)."""
        if self.pki_dir is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(
            self.address,
            identity.channel_credentials(self.caller_files()),
            identity.channel_options(self.identity),
        )


def bench_pki(state: Path) -> Path:
    """Returns the run's PKI directory (a local CA and every identity's leaf), made once."""
    directory = state / "pki"
    pki.ensure_local_pki(directory)
    return directory


def server_env(pki_dir: Path | None) -> dict[str, str]:
    """Returns a service's environment for mTLS with `pki_dir`, or plaintext without one.

    Plaintext (benchmarks only) gives every caller the edge identity, so the
    same calls are authorized either way.
    """
    if pki_dir is None:
        return {"TOKENMESH_INSECURE_PEER_IDENTITY": CALLER}
    return {"TOKENMESH_PKI_DIR": str(pki_dir)}


def bare_server_credentials(pki_dir: Path) -> grpc.ServerCredentials:
    """Returns the credentials a bare baseline serves: a worker's, client certificate required."""
    return identity.server_credentials(pki.IdentityFiles.of(pki_dir, contract.WORKER))
