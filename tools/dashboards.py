"""Builds the Grafana dashboards in deploy/observability/grafana/dashboards/.

`python -m tools.dashboards` rewrites the JSON files; tests/unit/test_observability.py
fails when they differ from what this builds, and checks that every expression
names only metrics the services or Envoy export.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "deploy" / "observability" / "grafana" / "dashboards"
RATE = "$__rate_interval"
MV = 'model=~"$model", version=~"$version"'
INFERENCE_RPC = (
    'method=~"/tokenmesh\\\\.(inference\\\\.v[0-9]+\\\\.InferenceService'
    '|openai\\\\.v1\\\\.OpenAIService)/.*"'
)


@dataclass(frozen=True)
class Panel:
    """Panel is one time series (or stat) panel: a title, its queries and a unit."""

    title: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    """Dashboard is rows of panels plus the template variables its queries use."""

    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]
    variables: tuple[str, ...] = ()  # label names, from tokenmesh_requests_total
    variable_metric: str = "tokenmesh_requests_total"
    extra: dict[str, Any] = field(default_factory=dict)


def _p99(metric: str, by: str, selector: str = "", q: str = "0.99") -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"
    )


def _latency(metric: str, by: str, selector: str, legend: str) -> tuple[tuple[str, str], ...]:
    return (
        (_p99(metric, by, selector, "0.5"), f"p50 {legend}"),
        (_p99(metric, by, selector), f"p99 {legend}"),
    )


EDGE = Dashboard(
    uid="tokenmesh-edge",
    title="tokenmesh / edge",
    description="Envoy's view: requests, latency and statuses by listener and by route "
    "(upstream cluster: model_<name>_<version> in Envoy's stats, auth, usage, ...).",
    rows=(
        (
            "Traffic",
            (
                Panel(
                    "Requests per second by listener",
                    (
                        (
                            "sum by (envoy_http_conn_manager_prefix) "
                            f"(rate(envoy_http_downstream_rq_total[{RATE}]))",
                            "{{envoy_http_conn_manager_prefix}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Responses by status class",
                    (
                        (
                            "sum by (envoy_response_code_class) "
                            f"(rate(envoy_http_downstream_rq_xx[{RATE}]))",
                            "{{envoy_response_code_class}}xx",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Edge latency (downstream, whole request)",
                    _latency(
                        "envoy_http_downstream_rq_time",
                        "envoy_http_conn_manager_prefix",
                        "",
                        "{{envoy_http_conn_manager_prefix}}",
                    ),
                    "ms",
                ),
                Panel(
                    "Requests in flight",
                    (("sum(envoy_http_downstream_rq_active)", "active"),),
                ),
            ),
        ),
        (
            "By route",
            (
                Panel(
                    "Requests per second by route",
                    (
                        (
                            "sum by (envoy_cluster_name) "
                            f"(rate(envoy_cluster_upstream_rq_total[{RATE}]))",
                            "{{envoy_cluster_name}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Statuses by route",
                    (
                        (
                            "sum by (envoy_cluster_name, envoy_response_code_class) "
                            f"(rate(envoy_cluster_upstream_rq_xx[{RATE}]))",
                            "{{envoy_cluster_name}} {{envoy_response_code_class}}xx",
                        ),
                    ),
                    "reqps",
                    description="HTTP statuses; a native gRPC error is a 200 with "
                    "grpc-status in trailers: the workers dashboard shows gRPC codes.",
                ),
                Panel(
                    "Upstream latency p99 by route",
                    (
                        (
                            _p99("envoy_cluster_upstream_rq_time", "envoy_cluster_name"),
                            "{{envoy_cluster_name}}",
                        ),
                    ),
                    "ms",
                ),
                Panel(
                    "Healthy workers by model version",
                    (
                        (
                            "sum by (envoy_cluster_name) "
                            '(envoy_cluster_membership_healthy{envoy_cluster_name=~"model_.*"})',
                            "{{envoy_cluster_name}}",
                        ),
                    ),
                ),
            ),
        ),
    ),
)

WORKERS = Dashboard(
    uid="tokenmesh-workers",
    title="tokenmesh / workers",
    description="Inference workers per model version: latency, throughput, queue, batch, "
    "KV cache and prefix cache.",
    variables=("model", "version"),
    rows=(
        (
            "Latency",
            (
                Panel(
                    "Time to first token",
                    _latency(
                        "tokenmesh_time_to_first_token_seconds",
                        "model, version, priority",
                        MV,
                        "{{model}}:{{version}} {{priority}}",
                    ),
                    "s",
                    description="By priority class: batch work (job items, shadow copies) "
                    "waits behind interactive requests by design; the TTFT SLO and the "
                    "autoscalers read interactive only.",
                ),
                Panel(
                    "Inter-token latency",
                    _latency(
                        "tokenmesh_inter_token_latency_seconds",
                        "model, version",
                        MV,
                        "{{model}}:{{version}}",
                    ),
                    "s",
                ),
                Panel(
                    "Request duration p99",
                    (
                        (
                            _p99("tokenmesh_request_duration_seconds", "model, version", MV),
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "s",
                ),
            ),
        ),
        (
            "Throughput",
            (
                Panel(
                    "Tokens per second",
                    (
                        (
                            f"sum by (model, version, kind) (rate(tokenmesh_tokens_total{{{MV}}}"
                            f"[{RATE}]))",
                            "{{model}}:{{version}} {{kind}}",
                        ),
                    ),
                ),
                Panel(
                    "Finished requests by finish reason",
                    (
                        (
                            f"sum by (finish_reason) (rate(tokenmesh_requests_total{{{MV}}}"
                            f"[{RATE}]))",
                            "{{finish_reason}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "gRPC codes of inference RPCs",
                    (
                        (
                            f"sum by (code) (rate(tokenmesh_rpc_total{{{INFERENCE_RPC}}}[{RATE}]))",
                            "{{code}}",
                        ),
                    ),
                    "reqps",
                ),
            ),
        ),
        (
            "Scheduler and caches",
            (
                Panel(
                    "Queue depth",
                    (
                        (
                            f"sum by (model, version, priority) (tokenmesh_queue_depth{{{MV}}})",
                            "{{model}}:{{version}} {{priority}}",
                        ),
                    ),
                    description="Requests waiting for a slot, by priority class (the "
                    "autoscalers and TokenmeshQueueSaturated read interactive only).",
                ),
                Panel(
                    "Running batch",
                    (
                        (
                            f"sum by (model, version) (tokenmesh_running_sequences{{{MV}}})",
                            "{{model}}:{{version}}",
                        ),
                    ),
                ),
                Panel(
                    "KV cache: slots used and tokens reserved",
                    (
                        (
                            f"sum by (model, version) (tokenmesh_kv_slots_used{{{MV}}})",
                            "slots {{model}}:{{version}}",
                        ),
                        (
                            f"sum by (model, version) (tokenmesh_kv_tokens_reserved{{{MV}}})",
                            "tokens {{model}}:{{version}}",
                        ),
                    ),
                ),
                Panel(
                    "Prefix-cache hit rate (prompt tokens reused)",
                    (
                        (
                            "sum by (model, version) (rate(tokenmesh_prefix_cache_tokens_total"
                            f'{{{MV}, outcome="reused"}}[{RATE}])) / sum by (model, version) '
                            f"(rate(tokenmesh_prefix_cache_tokens_total{{{MV}}}[{RATE}]))",
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Prefix cache: tokens held",
                    (
                        (
                            f"sum by (model, version) (tokenmesh_prefix_cache_held_tokens{{{MV}}})",
                            "{{model}}:{{version}}",
                        ),
                    ),
                ),
                Panel(
                    "Cancellations",
                    (
                        (
                            f"sum by (model, version) (rate(tokenmesh_cancellations_total{{{MV}}}"
                            f"[{RATE}]))",
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "ops",
                ),
            ),
        ),
    ),
)

TENANTS = Dashboard(
    uid="tokenmesh-tenants",
    title="tokenmesh / tenants",
    description="Usage per tenant (from the meter; at most 200 tenant labels per usage "
    "process, then _other), limits hit and budgets.",
    variables=("tenant",),
    variable_metric="tokenmesh_tenant_requests_total",
    rows=(
        (
            "Usage",
            (
                Panel(
                    "Tokens per second by tenant",
                    (
                        (
                            "sum by (tenant, kind) (rate(tokenmesh_tenant_tokens_total"
                            f'{{tenant=~"$tenant"}}[{RATE}]))',
                            "{{tenant}} {{kind}}",
                        ),
                    ),
                ),
                Panel(
                    "Requests per second by tenant",
                    (
                        (
                            "sum by (tenant) (rate(tokenmesh_tenant_requests_total"
                            f'{{tenant=~"$tenant"}}[{RATE}]))',
                            "{{tenant}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Top tenants by tokens (24 h)",
                    (
                        (
                            "topk(10, sum by (tenant) (increase(tokenmesh_tenant_tokens_total"
                            '{tenant=~"$tenant"}[24h])))',
                            "{{tenant}}",
                        ),
                    ),
                    kind="bargauge",
                ),
            ),
        ),
        (
            "Fair sharing on the workers",
            (
                Panel(
                    "Waiting requests by tenant",
                    (
                        (
                            'sum by (tenant) (tokenmesh_tenant_queue_depth{tenant=~"$tenant"})',
                            "{{tenant}}",
                        ),
                    ),
                    description="The scheduler's per-tenant queues (deepest tenants; "
                    "the rest as _other).",
                ),
                Panel(
                    "Tokens served per second by tenant (scheduler)",
                    (
                        (
                            "sum by (tenant, kind) (rate(tokenmesh_tenant_service_tokens_total"
                            f'{{tenant=~"$tenant"}}[{RATE}]))',
                            "{{tenant}} {{kind}}",
                        ),
                    ),
                ),
            ),
        ),
        (
            "Limits and budgets",
            (
                Panel(
                    "Rate-limit refusals by limit",
                    (
                        (
                            f"sum by (limit) (rate(tokenmesh_ratelimit_over_limit_total[{RATE}]))",
                            "{{limit}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Rate-limit decisions (window lease vs Redis), fail-open and fail-closed",
                    (
                        (
                            f"sum by (path) (rate(tokenmesh_ratelimit_decisions_total[{RATE}]))",
                            "{{path}}",
                        ),
                        (f"sum(rate(tokenmesh_ratelimit_fail_open_total[{RATE}]))", "fail open"),
                        (
                            f"sum(rate(tokenmesh_ratelimit_fail_closed_total[{RATE}]))",
                            "fail closed",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Requests ended by a token budget, by tenant",
                    (
                        (
                            "sum by (tenant) (rate(tokenmesh_tenant_requests_total"
                            f'{{tenant=~"$tenant", finish_reason="quota"}}[{RATE}]))',
                            "{{tenant}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    # Any RESOURCE_EXHAUSTED of an inference RPC: the rate-limit
                    # refusals (by limit, beside) are among them.
                    "Inference RPCs refused RESOURCE_EXHAUSTED (budgets, rate limits, queues)",
                    (
                        (
                            "sum by (method) (rate(tokenmesh_rpc_total"
                            f'{{code="RESOURCE_EXHAUSTED",{INFERENCE_RPC}}}[{RATE}]))',
                            "{{method}}",
                        ),
                    ),
                    "reqps",
                ),
            ),
        ),
    ),
)

VERSIONS = Dashboard(
    uid="tokenmesh-versions",
    title="tokenmesh / model versions",
    description="Traffic split, rollout state and quality signals per model version.",
    variables=("model",),
    rows=(
        (
            "Traffic and rollouts",
            (
                Panel(
                    "Traffic split (share of finished requests)",
                    (
                        (
                            "sum by (model, version) (rate(tokenmesh_requests_total"
                            f'{{model=~"$model"}}[{RATE}])) / ignoring(version) group_left '
                            "sum by (model) (rate(tokenmesh_requests_total"
                            f'{{model=~"$model"}}[{RATE}]))',
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Rollout step (percent of traffic)",
                    (
                        (
                            "max by (model, version) "
                            '(tokenmesh_rollout_step_percent{model=~"$model"})',
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "percent",
                    description="Exported by the router's rollout controller.",
                ),
                Panel(
                    "Rollouts rolled back",
                    (
                        (
                            # A series first seen within the hour counts as it is: one
                            # born at 1 (a rollback before the first scrape) has no
                            # increase to read (the TokenmeshRolloutRolledBack alert's rule).
                            "sum by (model) (increase(tokenmesh_rollouts_rolled_back_total"
                            '{model=~"$model"}[1h])) or sum by (model) '
                            '(tokenmesh_rollouts_rolled_back_total{model=~"$model"} unless '
                            'tokenmesh_rollouts_rolled_back_total{model=~"$model"} offset 1h)',
                            "{{model}}",
                        ),
                    ),
                    description="Exported from Redis by every router replica.",
                ),
                Panel(
                    "Error ratio by version (server faults)",
                    (
                        (
                            "sum by (model, version) (rate(tokenmesh_requests_total"
                            f'{{model=~"$model", finish_reason="error"}}[{RATE}])) / '
                            "sum by (model, version) (rate(tokenmesh_requests_total"
                            f'{{model=~"$model"}}[{RATE}]))',
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "TTFT p99 by version",
                    (
                        (
                            _p99(
                                "tokenmesh_time_to_first_token_seconds",
                                "model, version",
                                'model=~"$model", priority="interactive"',
                            ),
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "s",
                ),
            ),
        ),
        (
            "Generation quality",
            (
                Panel(
                    "Mean -log-probability per token (avg of choices)",
                    (
                        (
                            "sum by (model, version) (rate(tokenmesh_choice_mean_neg_logprob_sum"
                            f'{{model=~"$model"}}[{RATE}])) / sum by (model, version) '
                            "(rate(tokenmesh_choice_mean_neg_logprob_count"
                            f'{{model=~"$model"}}[{RATE}]))',
                            "{{model}}:{{version}}",
                        ),
                    ),
                    description="exp() of it is the perplexity. v2 and OpenAI choices only "
                    "(v1 computes no log-probabilities).",
                ),
                Panel(
                    "Confidence p10 / p50",
                    (
                        (
                            _p99(
                                "tokenmesh_choice_confidence",
                                "model, version",
                                'model=~"$model"',
                                "0.1",
                            ),
                            "p10 {{model}}:{{version}}",
                        ),
                        (
                            _p99(
                                "tokenmesh_choice_confidence",
                                "model, version",
                                'model=~"$model"',
                                "0.5",
                            ),
                            "p50 {{model}}:{{version}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Output length p50 / p99 (tokens per choice)",
                    (
                        (
                            _p99(
                                "tokenmesh_choice_output_tokens",
                                "model, version",
                                'model=~"$model"',
                                "0.5",
                            ),
                            "p50 {{model}}:{{version}}",
                        ),
                        (
                            _p99(
                                "tokenmesh_choice_output_tokens",
                                "model, version",
                                'model=~"$model"',
                            ),
                            "p99 {{model}}:{{version}}",
                        ),
                    ),
                ),
                Panel(
                    "Finish reasons by version (share of choices)",
                    (
                        (
                            "sum by (model, version, finish_reason) (rate(tokenmesh_choices_total"
                            f'{{model=~"$model"}}[{RATE}])) / ignoring(finish_reason) group_left '
                            "sum by (model, version) (rate(tokenmesh_choices_total"
                            f'{{model=~"$model"}}[{RATE}]))',
                            "{{model}}:{{version}} {{finish_reason}}",
                        ),
                    ),
                    "percentunit",
                ),
            ),
        ),
        (
            "Embedding quality",
            (
                Panel(
                    "Drift: cosine distance of the recent mean vector from the reference",
                    (
                        (
                            'max by (model, version) (tokenmesh_embedding_drift{model=~"$model"})',
                            "{{model}}:{{version}}",
                        ),
                    ),
                ),
                Panel(
                    "Recent mean vector norm",
                    (
                        (
                            "max by (model, version) "
                            '(tokenmesh_embedding_recent_mean_norm{model=~"$model"})',
                            "{{model}}:{{version}}",
                        ),
                    ),
                ),
                Panel(
                    "Vector norms off unit (share)",
                    (
                        (
                            "1 - (sum by (model, version) (rate(tokenmesh_embedding_norm_bucket"
                            f'{{model=~"$model", le="1.001"}}[{RATE}])) - sum by (model, version) '
                            "(rate(tokenmesh_embedding_norm_bucket"
                            f'{{model=~"$model", le="0.999"}}[{RATE}]))) / sum by (model, version) '
                            f'(rate(tokenmesh_embedding_norm_count{{model=~"$model"}}[{RATE}]))',
                            "{{model}}:{{version}}",
                        ),
                    ),
                    "percentunit",
                ),
            ),
        ),
    ),
)

CONTROL_PLANE = Dashboard(
    uid="tokenmesh-control-plane",
    title="tokenmesh / control plane",
    description="xDS as the edges see it, the worker registry and the services' health.",
    rows=(
        (
            "xDS",
            (
                Panel(
                    "Edges connected to the control plane",
                    (("sum(envoy_control_plane_connected_state)", "connected"),),
                ),
                Panel(
                    "Config pushes accepted / rejected (CDS, RDS)",
                    (
                        (
                            f"sum(rate(envoy_cluster_manager_cds_update_success[{RATE}]))",
                            "CDS accepted",
                        ),
                        (
                            f"sum(rate(envoy_cluster_manager_cds_update_rejected[{RATE}]))",
                            "CDS rejected",
                        ),
                        (f"sum(rate(envoy_http_rds_update_success[{RATE}]))", "RDS accepted"),
                        (f"sum(rate(envoy_http_rds_update_rejected[{RATE}]))", "RDS rejected"),
                    ),
                    "ops",
                ),
                Panel(
                    "Endpoint updates by cluster (EDS)",
                    (
                        (
                            "sum by (envoy_cluster_name) "
                            f"(rate(envoy_cluster_update_success[{RATE}]))",
                            "{{envoy_cluster_name}}",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Clusters and workers known to the edge",
                    (
                        ("sum(envoy_cluster_manager_active_clusters)", "clusters"),
                        (
                            'sum(envoy_cluster_membership_total{envoy_cluster_name=~"model_.*"})',
                            "worker endpoints",
                        ),
                    ),
                ),
            ),
        ),
        (
            "Registry and services",
            (
                Panel(
                    "Registry RPCs (register, renew, drain) by code",
                    (
                        (
                            "sum by (method, code) (rate(tokenmesh_rpc_total"
                            '{method=~"/tokenmesh\\\\.router\\\\.v1\\\\.WorkerRegistryService/.*"}'
                            f"[{RATE}]))",
                            "{{method}} {{code}}",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Catalogue and admin RPCs by code",
                    (
                        (
                            "sum by (method, code) (rate(tokenmesh_rpc_total"
                            '{method=~"/tokenmesh\\\\.router\\\\.v1\\\\.RouterService/.*"}'
                            f"[{RATE}]))",
                            "{{method}} {{code}}",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Background task restarts",
                    (
                        (
                            "sum by (service, task) "
                            f"(increase(tokenmesh_background_task_restarts_total[{RATE}]))",
                            "{{service}} {{task}}",
                        ),
                    ),
                ),
                Panel(
                    "Usage metering: events applied and p99 delay",
                    (
                        (f"sum(rate(tokenmesh_usage_events_applied_total[{RATE}]))", "applied/s"),
                        (
                            "histogram_quantile(0.99, sum by (le) "
                            f"(rate(tokenmesh_usage_meter_delay_seconds_bucket[{RATE}])))",
                            "p99 delay (s)",
                        ),
                    ),
                ),
                Panel(
                    "Usage entries set aside (dead letters)",
                    (
                        (
                            "sum by (reason) "
                            f"(increase(tokenmesh_usage_dead_letters_total[{RATE}]))",
                            "{{reason}}",
                        ),
                    ),
                ),
            ),
        ),
        (
            "Jobs",
            (
                Panel(
                    "Job items running and held back",
                    (
                        ("sum(tokenmesh_job_items_running)", "running"),
                        ("sum(tokenmesh_job_items_waiting)", "held back (no worker, retry later)"),
                    ),
                ),
                Panel(
                    "Job items finished by result",
                    (
                        (
                            f"sum by (result) (rate(tokenmesh_job_items_finished_total[{RATE}]))",
                            "{{result}}",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Webhook attempts by outcome",
                    (
                        (
                            "sum by (outcome) "
                            f"(increase(tokenmesh_job_webhook_attempts_total[{RATE}]))",
                            "{{outcome}}",
                        ),
                    ),
                ),
            ),
        ),
    ),
)

DASHBOARDS = (EDGE, WORKERS, TENANTS, VERSIONS, CONTROL_PLANE)


def _variable(label: str, metric: str) -> dict[str, Any]:
    query = f"label_values({metric}, {label})"
    return {
        "name": label,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{label}-values"},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def build(dashboard: Dashboard) -> dict[str, Any]:
    """Returns the dashboard as Grafana's JSON model."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in dashboard.rows:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        y += 1
        for i, panel in enumerate(row):
            panels.append(_panel(panel, len(panels) + 1, (i % 3) * 8, y + (i // 3) * 8))
        y += ((len(row) + 2) // 3) * 8
    datasource = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"text": "Prometheus", "value": "prometheus"},
    }
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["tokenmesh"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                datasource,
                *(_variable(v, dashboard.variable_metric) for v in dashboard.variables),
            ]
        },
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["tokenmesh"], "asDropdown": True, "title": "tokenmesh"}
        ],
        "panels": panels,
    }


def render(dashboard: Dashboard) -> str:
    """Returns the dashboard's file content."""
    return json.dumps(build(dashboard), indent=2, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for dashboard in DASHBOARDS:
        (args.out / f"{dashboard.uid}.json").write_text(render(dashboard))


if __name__ == "__main__":
    main()
