"""When each component's mesh certificate expires, as a metric an alert can read.

Leaves live 24 h and are renewed with a third of their life left (the launcher,
cert-manager in Kubernetes); servers and Envoy pick up the new files at the next
handshake. Nothing told an operator when renewal stopped (the renewal loop died,
cert-manager lost its issuer): every mTLS call failed at once when the leaves
expired. Each service exports `tokenmesh_certificate_expiry_timestamp_seconds`
for the certificate it serves with, read from its file at each scrape (a
renewed file shows at once); alert TokenmeshCertificateExpiringSoon reads it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from cryptography import x509
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.core.pki import IdentityFiles

logger = logging.getLogger(__name__)

METRIC = "tokenmesh_certificate_expiry_timestamp_seconds"


class CertificateExpiry(Collector):
    """CertificateExpiry reports the expiry of every identity certificate it watches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes run on the metrics server's thread
        self._watched: dict[str, IdentityFiles] = {}

    def watch(self, identity: str, files: IdentityFiles) -> None:
        """Reports `identity`'s certificate (files.cert) from now on."""
        with self._lock:
            self._watched[identity] = files

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            METRIC,
            "When the certificate this component serves mTLS with expires (Unix seconds).",
            labels=["identity"],
        )
        with self._lock:
            watched = sorted(self._watched.items())
        for identity, files in watched:
            expiry = _expiry(files)
            if expiry is not None:
                family.add_metric([identity], expiry)
        yield family


def _expiry(files: IdentityFiles) -> float | None:
    """Returns the certificate's notAfter (Unix seconds); None when it cannot be read
    (mid-replacement, or gone: the server logs its own failures)."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError) as exc:
        logger.debug("certificate %s unreadable: %s", files.cert, exc)
        return None
    return cert.not_valid_after_utc.timestamp()


EXPIRY = CertificateExpiry()
REGISTRY.register(EXPIRY)
