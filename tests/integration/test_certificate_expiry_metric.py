"""Each service exports when its mesh certificate expires (services/core/cert_metrics.py).

Nothing told an operator that renewal had stopped: every mTLS call failed at once
when the 24 h leaves expired.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from prometheus_client import REGISTRY

from services.core.cert_metrics import METRIC
from services.core.pki import LocalCA
from services.core.server import serving
from services.usage.service import UsageService, UsageSettings


def _expiry(identity: str) -> float | None:
    return REGISTRY.get_sample_value(METRIC, {"identity": identity})


async def test_a_service_exports_its_certificates_expiry_and_follows_a_renewal(
    tmp_path: Path, redis_url: str
) -> None:
    ca = LocalCA(tmp_path / "pki")
    ca.ensure()
    ca.issue("usage", lifetime=datetime.timedelta(hours=2))
    settings = UsageSettings(
        pki_dir=tmp_path / "pki",
        metrics_port=-1,
        grace_s=0.5,
        redis_url=redis_url,
        usage_stream=f"usage-test:{tmp_path.name}",
    )
    async with serving(UsageService(settings), settings):
        first = _expiry("usage")
        assert first is not None
        assert abs(first - (time.time() + 2 * 3600)) < 120
        ca.issue("usage", lifetime=datetime.timedelta(hours=24))  # renewed
        renewed = _expiry("usage")
        assert renewed is not None
        assert abs(renewed - (time.time() + 24 * 3600)) < 120
