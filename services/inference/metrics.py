"""Prometheus metrics of the inference worker, labelled by model and version."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ("model", "version")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: The `priority` label's values, indexed by the scheduler's priority class
#: (PRIORITY_INTERACTIVE = 0, PRIORITY_BATCH = 1): two values, never the client's
#: string. Batch work (job items, shadow copies, v2 PRIORITY_BATCH) waits behind
#: every interactive request by design: the TTFT SLO and the autoscalers read
#: priority="interactive" only, or a batch backlog would page and scale out.
PRIORITY_LABELS = ("interactive", "batch")

TIME_TO_FIRST_TOKEN = Histogram(
    "tokenmesh_time_to_first_token_seconds",
    "Admission to first generated token, by priority class (interactive or batch).",
    (*_LABELS, "priority"),
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "tokenmesh_inter_token_latency_seconds",
    "Time between consecutive tokens of a sequence.",
    _LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1),
)
REQUEST_LATENCY = Histogram(
    "tokenmesh_request_duration_seconds",
    "Admission to last token (or end of an embed).",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "tokenmesh_queue_depth",
    "Requests admitted but waiting for a slot, by priority class (interactive or batch).",
    (*_LABELS, "priority"),
)
RUNNING = Gauge("tokenmesh_running_sequences", "Sequences in the running batch.", _LABELS)
KV_SLOTS_USED = Gauge("tokenmesh_kv_slots_used", "KV-cache slots holding a sequence.", _LABELS)
ENGINE_FAILING = Gauge(
    "tokenmesh_engine_failing",
    "1 while a version's engine steps keep failing: NOT_SERVING until a retry succeeds.",
    _LABELS,
)
KV_TOKENS_RESERVED = Gauge(
    "tokenmesh_kv_tokens_reserved",
    "KV tokens reserved (prompt + max_tokens) by running sequences.",
    _LABELS,
)
# Engine work, not usage: counted per step (no per-token Python on the engine
# thread). Billed tokens are the usage meter's tokenmesh_tenant_tokens_total.
TOKENS = Counter(
    "tokenmesh_tokens_total",
    "Tokens the engine processed, by kind: prompt (prompts admitted to the batch, "
    "prefix-cache hits included) and completion (every token sampled: EOS, tokens "
    "past a stop sequence and those of cancelled sequences included). Engine "
    "throughput, not billed usage.",
    (*_LABELS, "kind"),
)
CANCELLATIONS = Counter(
    "tokenmesh_cancellations_total", "Sequences cancelled (client gone, deadline, stop).", _LABELS
)
REQUESTS = Counter(
    "tokenmesh_requests_total", "Finished requests by finish_reason.", (*_LABELS, "finish_reason")
)
PREFIX_CACHE_TOKENS = Counter(
    "tokenmesh_prefix_cache_tokens_total",
    "Prompt tokens at prefill, by outcome: reused from the prefix cache or computed.",
    (*_LABELS, "outcome"),
)
PREFIX_CACHE_HELD = Gauge(
    "tokenmesh_prefix_cache_held_tokens",
    "KV tokens' worth of memory the prefix cache holds (prompt KV and kept logits).",
    _LABELS,
)


def remove_version_gauges(labels: tuple[str, str]) -> None:
    """Removes a version's scheduler gauges (it stopped: an unloaded version exports none).

    Their last values would otherwise stay exported until the process ends,
    read as live by the queue-depth autoscalers, alerts and dashboards; a
    version loaded again starts from fresh series. Counters and histograms stay:
    rate() reads them as idle.
    """
    for gauge in (RUNNING, KV_SLOTS_USED, KV_TOKENS_RESERVED, PREFIX_CACHE_HELD, ENGINE_FAILING):
        gauge.remove(*labels)
    for priority in PRIORITY_LABELS:
        QUEUE_DEPTH.remove(*labels, priority)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """Observes every amount in `histogram` (a labelled child), one update per bucket.

    The engine thread measures a whole step's inter-token latencies at once:
    `observe` per token takes two locks each (~1 µs, a 32-row step's ~37 µs);
    here each touched bucket and the sum are updated once. The same counts and
    sum as observing one by one; a child without prometheus_client's bucket
    values (another implementation) is observed one by one.
    """
    if not amounts:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for amount in amounts:
            histogram.observe(amount)
        return
    counts: dict[int, int] = {}
    for amount in amounts:  # the first bound >= amount, as observe() picks it
        index = bisect.bisect_left(bounds, amount)
        counts[index] = counts.get(index, 0) + 1
    total.inc(sum(amounts))
    for index, count in counts.items():
        if index < len(buckets):
            buckets[index].inc(count)
