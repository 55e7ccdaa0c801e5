"""A local certificate authority and the mesh's component identities.

Every component (edge, auth, router, usage, worker, jobs, operator) has an
X.509 identity: a short-lived leaf certificate whose URI SAN is its SPIFFE
id, `spiffe://tokenmesh.local/<identity>`, signed by one CA. Layout under a
PKI directory (what `make run` keeps in `<state dir>/pki`, and what a
cert-manager or SPIRE mount provides in Kubernetes)::

    ca.pem                       the trust bundle (CA certificate)
    ca-key.pem                   the CA's key (local CA only; 0600)
    <identity>.pem               the leaf certificate
    <identity>-key.pem           its key (0600)

The issuing directory holds every identity; a component must be given only
its own three files (`export_identity`: compose's per-identity volumes), or it
could present any identity or mint one with the CA's key.

Keys are written with their final mode from creation (never chmod-ed
afterwards), and every file is replaced atomically, so a server that
reloads certificates never reads half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.core import contract
from services.core.secret_files import replace_secret

TRUST_DOMAIN = "tokenmesh.local"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
#: IDENTITIES are the component identities `make run` issues.
IDENTITIES = ("edge", "auth", "router", "usage", "worker", "jobs", "operator")
CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(hours=24)
#: A leaf is renewed once less than this share of its lifetime is left.
RENEW_WHEN_LEFT = 1 / 3
# Names every local leaf answers to: the loopback address the mesh listens on.
LOCAL_NAMES = ("localhost", "127.0.0.1")


def spiffe_id(identity: str) -> str:
    """Returns the SPIFFE id of a component identity, e.g. spiffe://tokenmesh.local/edge."""
    return SPIFFE_PREFIX + identity


def identity_of(spiffe: str) -> str | None:
    """Returns the component identity in a SPIFFE id of our trust domain, else None."""
    if not spiffe.startswith(SPIFFE_PREFIX):
        return None
    name = spiffe[len(SPIFFE_PREFIX) :]
    return name if name and "/" not in name else None


@dataclass(frozen=True)
class IdentityFiles:
    """IdentityFiles are the paths of one identity's certificate, key and trust bundle."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, pki_dir: Path, identity: str) -> IdentityFiles:
        """Returns the standard paths of `identity` under `pki_dir`."""
        return cls(pki_dir / "ca.pem", pki_dir / f"{identity}.pem", pki_dir / f"{identity}-key.pem")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Returns (ca, cert, key) PEM bytes."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def version(self) -> tuple[int, int, int]:
        """Returns a stamp that changes whenever the trust bundle, certificate or key is
        replaced (a bundle gaining a new CA, during CA rotation, changes no leaf)."""
        return self.ca.stat().st_mtime_ns, self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class LocalCA:
    """LocalCA is the development CA `make run` keeps under `<state dir>/pki`.

    In production a cert-manager Issuer or SPIRE plays this part; services only
    read the files (see `IdentityFiles`).
    """

    def __init__(self, pki_dir: Path) -> None:
        self.dir = pki_dir
        self.cert_path = pki_dir / "ca.pem"
        self.key_path = pki_dir / "ca-key.pem"

    def ensure(self) -> None:
        """Creates the CA once (keeps an existing one: clients already trust it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if self.cert_path.exists() and self.key_path.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenmesh local CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        replace_secret(self.key_path, _key_pem(key))
        _write_public(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        identity: str,
        lifetime: datetime.timedelta = LEAF_LIFETIME,
        dns_names: Sequence[str] = (),
    ) -> IdentityFiles:
        """Issues (or replaces) the leaf certificate of `identity`; returns its files."""
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.SubjectAlternativeName(_san(identity, dns_names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        files = IdentityFiles.of(self.dir, identity)
        # Key first: a reader that sees the new certificate also finds its key.
        replace_secret(files.key, _key_pem(key))
        _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
        return files

    def ensure_identity(
        self, identity: str, lifetime: datetime.timedelta = LEAF_LIFETIME
    ) -> IdentityFiles:
        """Issues `identity`'s leaf unless a valid one with enough life left exists."""
        files = IdentityFiles.of(self.dir, identity)
        if needs_renewal(files.cert):
            return self.issue(identity, lifetime)
        return files

    def renew_due(self, identities: Sequence[str] = IDENTITIES) -> list[str]:
        """Re-issues every leaf that is due for renewal; returns the renewed identities."""
        renewed = [i for i in identities if needs_renewal(self.dir / f"{i}.pem")]
        for identity in renewed:
            self.issue(identity)
        return renewed


def _san(identity: str, dns_names: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(identity)),
        # Python clients verify a server's identity through this name.
        x509.DNSName(f"{identity}.{TRUST_DOMAIN}"),
    ]
    if contract.worker_pool_of(identity):
        # A pool's worker is a worker to a Python client that names no pool (the
        # jobs service dials it by its pool's name, which only that pool's leaves
        # carry); the edge verifies its pool's SPIFFE id (services.router.snapshot).
        names.append(x509.DNSName(f"{contract.WORKER}.{TRUST_DOMAIN}"))
    for name in (*LOCAL_NAMES, *dns_names):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def needs_renewal(cert_path: Path, now: datetime.datetime | None = None) -> bool:
    """Tells whether the leaf at `cert_path` is missing or has < RENEW_WHEN_LEFT of life left."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (FileNotFoundError, ValueError):
        return True
    now = now or _now()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) * RENEW_WHEN_LEFT


def ensure_local_pki(pki_dir: Path, identities: Sequence[str] = IDENTITIES) -> LocalCA:
    """Creates the local CA and every identity's leaf where missing or due; returns the CA."""
    ca = LocalCA(pki_dir)
    ca.ensure()
    for identity in identities:
        ca.ensure_identity(identity)
    return ca


def export_identity(pki_dir: Path, identity: str, out_dir: Path) -> bool:
    """Copies `identity`'s own files (ca.pem, <identity>.pem, <identity>-key.pem) from
    the issuing directory `pki_dir` into `out_dir`; returns whether any changed.

    Never ca-key.pem or another identity's files: `out_dir` is what that one
    component mounts. Only changed files are replaced, so a reader's
    `IdentityFiles.version()` moves (and it reloads) only on a real change.
    """
    source, target = IdentityFiles.of(pki_dir, identity), IdentityFiles.of(out_dir, identity)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    changed = False
    # The bundle first (a new CA is trusted before a leaf it signed is shown),
    # then key before certificate as `LocalCA.issue` writes them.
    for src, dst, write in (
        (source.ca, target.ca, _write_public),
        (source.key, target.key, replace_secret),
        (source.cert, target.cert, _write_public),
    ):
        data = src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            write(dst, data)
            changed = True
    return changed


def main(argv: Sequence[str] | None = None) -> None:
    """Creates the local CA in a directory and issues every leaf that is missing or due.

    `python -m services.core.pki DIR [--dns IDENTITY=NAME ...] [--export ROOT]`:
    what a container setup (deploy/compose.yaml) runs once at start and then
    periodically; `--dns` adds names a leaf answers to; `--export` then copies
    each identity's own files into ROOT/<identity>/ (one volume per identity,
    mounted by that component alone; DIR, with ca-key.pem, stays the issuer's).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.core.pki")
    parser.add_argument("dir", type=Path, help="the PKI directory (ca.pem, <identity>.pem, ...)")
    parser.add_argument("--dns", action="append", default=[], metavar="IDENTITY=NAME")
    parser.add_argument(
        "--worker-pool",
        action="append",
        default=[],
        metavar="POOL",
        help="also issue the identity worker-POOL (a worker pool's certificate)",
    )
    parser.add_argument(
        "--export", type=Path, metavar="ROOT", help="copy each identity's files to ROOT/<identity>"
    )
    args = parser.parse_args(argv)
    for pool in args.worker_pool:
        if not contract.is_worker_pool(pool):
            parser.error(f"--worker-pool {pool!r}: must be {contract.WORKER_POOL_RULE}")
    pools = [contract.worker_identity(pool) for pool in args.worker_pool]
    # Pools first, operator last: its exported leaf means all are there.
    identities = [*pools, *IDENTITIES]
    extra: dict[str, list[str]] = {}
    for item in args.dns:
        identity, _, name = item.partition("=")
        if identity not in identities or not name:
            parser.error(f"--dns {item!r}: expected IDENTITY=NAME, IDENTITY one of {identities}")
        extra.setdefault(identity, []).append(name)
    ca = LocalCA(args.dir)
    ca.ensure()
    for identity in identities:
        if needs_renewal(args.dir / f"{identity}.pem"):
            ca.issue(identity, dns_names=extra.get(identity, ()))
            print(f"issued {args.dir / identity}.pem", flush=True)
    if args.export is not None:
        for identity in identities:
            if export_identity(args.dir, identity, args.export / identity):
                print(f"exported {args.export / identity}", flush=True)


if __name__ == "__main__":
    main()
