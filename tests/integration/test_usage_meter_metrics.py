"""The meter says how far behind it runs: events applied, finish-to-applied delay."""

from __future__ import annotations

import time
import uuid

from prometheus_client import REGISTRY

from tests.integration.test_usage_dead_letters import _event, _until, usage  # noqa: F401


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_applied_events_are_counted_with_their_delay(usage):  # noqa: F811
    service, client = usage
    applied = _value("tokenmesh_usage_events_applied_total")
    delays = _value("tokenmesh_usage_meter_delay_seconds_count")
    late = _value("tokenmesh_usage_meter_delay_seconds_bucket", {"le": "300.0"})
    event = _event(f"req-late-{uuid.uuid4().hex[:8]}", completion=1)
    # Finished ten minutes ago (a worker's spool shipped after an outage).
    event.finish_unix_ms = int((time.time() - 600) * 1000)
    await client.xadd(
        service.settings.usage_stream,
        {"request_id": event.request_id, "event": event.SerializeToString()},
    )
    await _until(lambda: service.meter.applied_total == 1)
    assert _value("tokenmesh_usage_events_applied_total") == applied + 1
    assert _value("tokenmesh_usage_meter_delay_seconds_count") == delays + 1
    # Observed above 300 s (cumulative buckets: le=300 did not move, +Inf did).
    assert _value("tokenmesh_usage_meter_delay_seconds_bucket", {"le": "300.0"}) == late


async def test_applied_events_count_per_tenant(usage):  # noqa: F811
    service, client = usage
    tenant = "t-dead"  # _event's tenant
    labels = {"tenant": tenant, "finish_reason": "length"}
    requests = _value("tokenmesh_tenant_requests_total", labels)
    completion = _value("tokenmesh_tenant_tokens_total", {"tenant": tenant, "kind": "completion"})
    event = _event(f"req-tenant-{uuid.uuid4().hex[:8]}", completion=7)
    await client.xadd(
        service.settings.usage_stream,
        {"request_id": event.request_id, "event": event.SerializeToString()},
    )
    await _until(lambda: service.meter.applied_total == 1)
    assert _value("tokenmesh_tenant_requests_total", labels) == requests + 1
    moved = _value("tokenmesh_tenant_tokens_total", {"tenant": tenant, "kind": "completion"})
    assert moved == completion + 7
