"""The jobs service's own signals: items running, waiting and finished, webhook attempts.

Without them a backlog of items, a run of failing items or webhooks that
nobody receives showed only through the API and the logs (the service
exported its RPC counters and nothing about its work).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ITEMS_RUNNING = Gauge(
    "tokenmesh_job_items_running",
    "Job items this replica runs now (calling a worker or waiting to call one again).",
)
ITEMS_WAITING = Gauge(
    "tokenmesh_job_items_waiting",
    "Job items this replica holds back before calling again (no worker for their model, "
    "a refusal to retry later).",
)
ITEMS_FINISHED = Counter(
    "tokenmesh_job_items_finished_total",
    "Job items whose result was stored (counted once, by the replica that stored it), "
    "by result: succeeded or failed.",
    ["result"],
)
WEBHOOK_ATTEMPTS = Counter(
    "tokenmesh_job_webhook_attempts_total",
    "Webhook deliveries attempted, by what followed: delivered, retrying (a later "
    "attempt is due) or dead (the retry schedule is spent).",
    ["outcome"],
)
SUCCEEDED, FAILED = "succeeded", "failed"
DELIVERED, RETRYING, DEAD = "delivered", "retrying", "dead"
# Each series from 0: increase() sees its first event (one born at 1 reads as none).
for _result in (SUCCEEDED, FAILED):
    ITEMS_FINISHED.labels(_result)
for _outcome in (DELIVERED, RETRYING, DEAD):
    WEBHOOK_ATTEMPTS.labels(_outcome)
