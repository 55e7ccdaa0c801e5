"""Usage per tenant as Prometheus metrics, with a bounded set of tenant labels.

The meter observes every usage event it applies (so each request counts once,
whichever usage replica applied it). A process labels at most `MAX_TENANTS`
distinct tenants; later ones count under "_other" (reports in Redis keep
every tenant: these metrics are for dashboards and alerts, not billing).
"""

from __future__ import annotations

from prometheus_client import Counter

from tokenmesh.inference.v1 import inference_pb2

MAX_TENANTS = 200
OTHER = "_other"
NO_TENANT = "_none"

REQUESTS = Counter(
    "tokenmesh_tenant_requests_total",
    "Metered requests per tenant and finish reason (quota: ended by a token budget); "
    "a job item's cut attempt is not one (as in the usage reports).",
    ["tenant", "finish_reason"],
)
TOKENS = Counter(
    "tokenmesh_tenant_tokens_total",
    "Metered tokens per tenant, by kind (prompt, completion).",
    ["tenant", "kind"],
)


class BoundedLabels:
    """BoundedLabels hands out label values, at most `limit` distinct ones, then `other`."""

    def __init__(self, limit: int, other: str = OTHER) -> None:
        self.limit = limit
        self.other = other
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return self.other
        self._seen.add(value)
        return value


_TENANTS = BoundedLabels(MAX_TENANTS)


def observe(event: inference_pb2.UsageEvent) -> None:
    """Counts one applied usage event under its tenant."""
    tenant = _TENANTS(event.tenant or NO_TENANT)
    REQUESTS.labels(tenant, event.finish_reason or "unknown").inc()
    TOKENS.labels(tenant, "prompt").inc(event.usage.prompt_tokens)
    TOKENS.labels(tenant, "completion").inc(event.usage.completion_tokens)
