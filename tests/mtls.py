"""The tests' mesh PKI: one local CA per test run, and mTLS channels as any identity.

Servers in tests run exactly as in production: they require a client
certificate, and authorize by the caller's identity. Tests call them as the
identity a real caller has (usually the edge).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import grpc
import grpc.aio

from services.core import contract, identity, pki

#: Metadata the edge sends for a caller whose verified scopes hold admin.
EDGE_FOR_ADMIN = (("x-tokenmesh-scopes", "admin"),)
#: Worker pools with a leaf of their own (`worker-<pool>`), besides the shared `worker`.
WORKER_POOLS = ("gpu", "cpu")


@functools.cache
def pki_dir() -> Path:
    """Returns a directory holding a fresh CA and a leaf for every identity (and for
    each of WORKER_POOLS)."""
    directory = Path(tempfile.mkdtemp(prefix="tokenmesh-test-pki-")) / "pki"
    pools = tuple(contract.worker_identity(pool) for pool in WORKER_POOLS)
    pki.ensure_local_pki(directory, (*pki.IDENTITIES, *pools))
    return directory


def files(name: str) -> pki.IdentityFiles:
    """Returns the certificate files of identity `name`."""
    return pki.IdentityFiles.of(pki_dir(), name)


def aio_channel(port: int | str, peer: str, caller: str = "edge") -> grpc.aio.Channel:
    """Returns an mTLS grpc.aio channel to `peer` on 127.0.0.1, presenting `caller`'s cert."""
    target = port if isinstance(port, str) else f"127.0.0.1:{port}"
    return identity.secure_channel(target, files(caller), peer)


def channel(port: int | str, peer: str, caller: str = "edge") -> grpc.Channel:
    """Returns a blocking mTLS channel to `peer`, presenting `caller`'s certificate."""
    target = port if isinstance(port, str) else f"127.0.0.1:{port}"
    return identity.blocking_channel(target, files(caller), peer)
